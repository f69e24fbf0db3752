"""What a client keeps from one round to the next: its own BatchNorm (FEDBN), its own model parts (SHARE), its
optimizer state (KEEP_OPTIMIZER).

Flower builds a new client object for every message; what outlives a round is the node's Context state (in memory,
for the life of the process) and the client's own files: the simulation's SAVE_DIR/clients, a SuperNode's node
config `save-dir`. Files serve a resumed run (a new process) and cost no memory between rounds; a client with no
folder (a SuperNode without save-dir) keeps everything in its Context state.
"""

import time
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common import ArrayRecord, ConfigRecord

from utils.atomic import atomic_open
from utils.checkpoint import write_checkpoint
from utils.console import log
from utils.datasets import client_name
from utils.model import bn_entries
from utils.params import get_weights, load_npz
from utils.share import expand, own_entries


class KeptState:
    """One client's state between rounds.

    Args:
        state (flwr.common.RecordDict | None): the node's Context state (None: nothing is kept in memory).
        folder (str | Path | None): where the client writes its own files; None: it has none.
        label (str): the client's name (its files are `<label>.pt`, `<label>.optimizer`).
        resumed (bool): this round continues a run (not its round 1): files an earlier process wrote count.
    """

    def __init__(self, state, folder, label, resumed):
        """Keep where the state lives."""
        self.state, self.label, self.resumed = state, label, resumed
        self.folder = Path(folder) if folder else None
        self.seconds = 0.0  # spent reading and writing the optimizer state (metrics.csv: train_time_state)

    def file(self, suffix=".pt"):
        """Return this client's file with `suffix` (None without a folder): its personalized model under SHARE
        (`.pt`), its optimizer state under KEEP_OPTIMIZER (`.optimizer`)."""
        return self.folder / f"{self.label}{suffix}" if self.folder else None

    def _saved(self, suffix):
        """Return this client's file with `suffix` when a resumed round may read it, else None."""
        path = self.file(suffix)
        return path if self.resumed and path is not None and path.is_file() else None

    def has(self, key):
        """Return whether the Context state holds `key`."""
        return self.state is not None and key in self.state

    # FEDBN: BatchNorm weights and statistics stay local
    def own_bn(self, parameters, bn):
        """Return `parameters` with this client's own BatchNorm entries `bn` from its last round; None in its first."""
        if not self.has("fedbn"):
            return None
        out = list(parameters)
        for i, a in zip(bn, self.state["fedbn"].to_numpy_ndarrays()):
            out[i] = a
        return out

    def keep_bn(self, weights, bn):
        """Keep this round's BatchNorm entries `bn` of `weights` for the next round."""
        self.state["fedbn"] = ArrayRecord(numpy_ndarrays=[weights[i] for i in bn])

    # SHARE: the parts not shared stay with the client
    def own_parts(self, parameters, model, shared):
        """Return the full weights of this client under SHARE: the `shared` entries as sent, the others its own.

        Its own parts come from its Context state (kept from its last round), else, when the run is resumed, its
        personalized model file, else what the server sent in its first round (everything), else its model's starting
        weights: its own base model's under CLIENT_MODELS (mixed tasks: the server never sends them), the seeded
        initial weights of the architecture for a client that joins after round 1 with no state of its own.
        """
        n = len(model.state_dict())
        full = list(parameters) if len(parameters) == n else expand(parameters, shared, get_weights(model))
        own = own_entries(n, shared)
        local = self.state["share"].to_numpy_ndarrays() if self.has("share") else None
        path = self._saved(".pt")
        if local is None and path is not None:
            saved = list(torch.load(path, weights_only=False)["model"].float().state_dict().values())
            local = [saved[i].detach().cpu().numpy() for i in own] if len(saved) == n else None
        for i, a in zip(own, local or []):
            full[i] = a
        return full

    def keep_parts(self, model, weights, shared, args, info):
        """Keep this round's own parts (Context state) and write the personalized model `<label>.pt` where the client
        has a folder; `args` and `info` go into the checkpoint."""
        self.state["share"] = ArrayRecord(numpy_ndarrays=[weights[i] for i in own_entries(len(weights), shared)])
        path = self.file(".pt")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_checkpoint(model, path, args, info)

    def outgoing(self, model, weights, parameters, shared, spec, imgsz, server_round):
        """Keep what stays with this client after training (SHARE: its own parts and personalized model; FEDBN: its
        BatchNorm) and return (the weights it sends, the sent parameters they are a change of)."""
        if shared is not None:  # partial sharing: keep its own parts, send the shared ones
            self.keep_parts(model, weights, shared, {"imgsz": imgsz}, {"round": server_round, "share": spec["share"]})
            if len(parameters) == len(weights):  # round 1 sent everything: its change is taken on the shared part
                parameters = [parameters[i] for i in shared]
            weights = [weights[i] for i in shared]
        if spec["fedbn"] and self.state is not None:
            self.keep_bn(weights, bn_entries(model))
        return weights, parameters

    # KEEP_OPTIMIZER: the optimizer state (Adam moments) continues
    def optimizer(self):
        """Return (keys, arrays) of this client's optimizer state at the end of its last round, or None (a fresh
        optimizer): from its file, else from its Context state; a file that cannot be read counts as none."""
        path = self._saved(".optimizer") or self._saved(".optimizer.npz")  # .npz: a run of an earlier version
        if path is not None:
            t0 = time.time()
            try:
                return read_state(path)
            except ValueError as e:
                log(WARNING, "%s: its optimizer starts fresh: %s", client_name(self.label), e)
                return None
            finally:
                self.seconds += time.time() - t0
        if self.has("optimizer"):
            return self.state["optimizer-keys"]["keys"].split(","), self.state["optimizer"].to_numpy_ndarrays()
        if self.has("optimizer-file"):  # this run wrote one for this client, and it is gone: say so, not silently
            log(WARNING, "%s: its optimizer state %s is gone (removed during the run?); it starts fresh",
                client_name(self.label), self.file(".optimizer"))
        return None

    def keep_optimizer(self, keys, arrays):
        """Keep this round's optimizer state for the next round: in the client's file where it has a folder, so that
        the state costs no memory between rounds and a resumed run continues with it (a fresh run removes the files it
        finds, see federated.make_strategy); else in its Context state, in memory."""
        path = self.file(".optimizer")
        if path is not None:
            t0 = time.time()
            path.parent.mkdir(parents=True, exist_ok=True)
            write_state(path, keys, arrays)
            self.seconds += time.time() - t0
            if self.state is not None:  # what `optimizer` expects to find in the next round
                self.state["optimizer-file"] = ConfigRecord({"written": True})  # its path: `file`
            return
        self.state["optimizer"] = ArrayRecord(numpy_ndarrays=arrays)
        self.state["optimizer-keys"] = ConfigRecord({"keys": ",".join(keys)})


def write_state(path, keys, arrays):
    """Write an optimizer state (keys, arrays) to `path`: four .npy records, one after the other (the keys, each
    array's dtype, each array's rank and dimensions, then all their bytes as one uint8 array).

    A client writes and reads it every round (yolov8n's AdamW: 552 arrays, 24 MB): one record of bytes, written
    array by array without a copy, read in one call, with no header per array and no zip checksum; and no wait for
    the disk (the reader treats a damaged file as no state). As an npz with fsync it took 18% of a 64-client
    federation's client time (bench/round_time.md).
    """
    arrays = [a if a.flags.c_contiguous else a.copy(order="C") for a in map(np.asarray, arrays)]  # 0-d stays 0-d
    with atomic_open(path, durable=False) as f:
        np.save(f, np.array(keys, dtype=str))
        np.save(f, np.array([a.dtype.str for a in arrays], dtype=str))
        np.save(f, np.array([d for a in arrays for d in (a.ndim, *a.shape)], dtype=np.int64))
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (sum(a.nbytes for a in arrays),)})
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))


def read_state(path):
    """Return (keys, arrays) written by `write_state`, or by earlier versions (an npz: the keys, then one array
    each); the arrays are views of one buffer. ValueError naming the file when it cannot be read."""
    if Path(path).suffix == ".npz":
        keys, *arrays = load_npz(path)
        return [str(k) for k in keys], arrays
    try:
        with open(path, "rb") as f:
            keys, dtypes, shapes = (np.load(f, allow_pickle=False) for _ in range(3))
            np.lib.format.read_magic(f)
            (size,), _, _ = np.lib.format.read_array_header_1_0(f)
            data = np.fromfile(f, dtype=np.uint8, count=size)
        arrays, at, offset = [], 0, 0
        for dtype in map(np.dtype, dtypes):
            ndim = int(shapes[at])
            shape, at = tuple(int(d) for d in shapes[at + 1:at + 1 + ndim]), at + 1 + ndim
            count = int(np.prod(shape, dtype=np.int64))
            arrays.append(np.frombuffer(data, dtype, count, offset).reshape(shape))
            offset += count * dtype.itemsize
    except (OSError, EOFError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{path} cannot be read as an optimizer state (truncated or damaged?): {e}") from None
    if offset != data.size:
        raise ValueError(f"{path} cannot be read as an optimizer state: {data.size - offset} bytes left over")
    return [str(k) for k in keys], arrays

"""What a client keeps from one round to the next: its own BatchNorm (FEDBN), its own model parts (SHARE), its
optimizer state (KEEP_OPTIMIZER).

Flower builds a new client object for every message; what outlives a round is the node's Context state (in memory,
for the life of the process) and the client's own files: the simulation's SAVE_DIR/clients, a SuperNode's node
config `save-dir`. Files serve a resumed run (a new process) and cost no memory between rounds; a client with no
folder (a SuperNode without save-dir) keeps everything in its Context state.
"""

from pathlib import Path

import numpy as np
import torch
from flwr.common import ArrayRecord, ConfigRecord

from utils.checkpoint import write_checkpoint
from utils.model import bn_entries
from utils.params import get_weights, load_npz, save_npz
from utils.share import expand, own_entries


class KeptState:
    """One client's state between rounds.

    Args:
        state (flwr.common.RecordDict | None): the node's Context state (None: nothing is kept in memory).
        folder (str | Path | None): where the client writes its own files; None: it has none.
        label (str): the client's name (its files are `<label>.pt`, `<label>.optimizer.npz`).
        resumed (bool): this round continues a run (not its round 1): files an earlier process wrote count.
    """

    def __init__(self, state, folder, label, resumed):
        """Keep where the state lives."""
        self.state, self.label, self.resumed = state, label, resumed
        self.folder = Path(folder) if folder else None

    def file(self, suffix=".pt"):
        """Return this client's file with `suffix` (None without a folder): its personalized model under SHARE
        (`.pt`), its optimizer state under KEEP_OPTIMIZER (`.optimizer.npz`)."""
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
        optimizer): from its file, else from its Context state."""
        path = self._saved(".optimizer.npz")
        if path is not None:
            keys, *arrays = load_npz(path)
            return [str(k) for k in keys], arrays
        if self.has("optimizer"):
            return self.state["optimizer-keys"]["keys"].split(","), self.state["optimizer"].to_numpy_ndarrays()
        return None

    def keep_optimizer(self, keys, arrays):
        """Keep this round's optimizer state for the next round: in the client's file where it has a folder, so that
        the state costs no memory between rounds and a resumed run continues with it (a fresh run removes the files it
        finds, see federated.make_strategy); else in its Context state, in memory."""
        path = self.file(".optimizer.npz")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npz(path, [np.array(keys), *arrays])
            return
        self.state["optimizer"] = ArrayRecord(numpy_ndarrays=arrays)
        self.state["optimizer-keys"] = ConfigRecord({"keys": ",".join(keys)})

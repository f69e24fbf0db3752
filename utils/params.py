"""The one parameter-order contract: a model's state_dict, in order, as numpy arrays (client, server, exporter)."""

import io
import math
import zipfile
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.client import Client
from flwr.common import Code, EvaluateRes, FitRes, GetPropertiesRes, Parameters, Status

from utils.atomic import atomic_open
from utils.console import log


def get_weights(model):
    """Return the model's state_dict as numpy arrays in state_dict order: floats as float32, integers as they are."""
    out = []
    for v in model.state_dict().values():
        v = v.detach().cpu()
        out.append((v.float() if v.is_floating_point() else v).numpy().copy())
    return out


_HEADERS = {}  # the bytes of an .npy header -> (dtype, shape), parsed once


def parameters_to_arrays(parameters):
    """Return the arrays of Flower `parameters` (an .npy file each), as flwr's `parameters_to_ndarrays` does, with
    each distinct header parsed once: `np.load` parses every header with `ast.literal_eval`, 36 ms of each yolov8n
    update (355 arrays) on the server, the same header strings in every update."""
    out = []
    for b in parameters.tensors:
        if b[:6] != b"\x93NUMPY":
            raise ValueError("an update's array is not in .npy format")
        size = 2 if b[6] == 1 else 4  # format 1.0: a 2-byte header length; 2.0 and 3.0: 4 bytes
        start = 8 + size + int.from_bytes(b[8:8 + size], "little")
        key = bytes(b[:start])
        if key not in _HEADERS:
            f = io.BytesIO(key)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(f),
                                                                     np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            _HEADERS[key] = None if fortran or dtype.hasobject else (dtype, shape)
        if _HEADERS[key] is None:  # what np.load reads its own way
            out.append(np.load(io.BytesIO(b), allow_pickle=False))
            continue
        dtype, shape = _HEADERS[key]
        out.append(np.frombuffer(b, dtype, count=math.prod(shape), offset=start).reshape(shape).copy())
    return out


_WRITTEN = {}  # (dtype, shape, Fortran order) -> the .npy header np.save writes for such an array


def arrays_to_parameters(arrays):
    """Return Flower `parameters` of `arrays` byte for byte as flwr's `ndarrays_to_parameters` writes them (np.save
    each), with each distinct header written once (9 -> 7 ms for yolov8n's 355 arrays)."""
    tensors = []
    for a in arrays:
        a = np.asarray(a)
        fortran = a.flags.f_contiguous and not a.flags.c_contiguous  # as np.save decides it
        key = (a.dtype, a.shape, fortran)
        if key not in _WRITTEN or a.dtype.hasobject:
            f = io.BytesIO()
            np.save(f, a, allow_pickle=False)
            tensors.append(f.getvalue())
            _WRITTEN[key] = tensors[-1][:len(tensors[-1]) - a.nbytes]
            continue
        tensors.append(_WRITTEN[key] + a.tobytes("F" if fortran else "C"))
    return Parameters(tensors=tensors, tensor_type="numpy.ndarray")


class ArraysClient(Client):
    """A NumPyClient as Flower's own `to_client()` runs it, with the weights decoded and encoded by
    `parameters_to_arrays` and `arrays_to_parameters`: the same arrays and bytes, 27 -> 14 ms of every yolov8n fit
    message on the client (flwr parses all 355 .npy headers of every message)."""

    def __init__(self, numpy_client):
        self.numpy_client = numpy_client

    def get_properties(self, ins):
        return GetPropertiesRes(status=Status(code=Code.OK, message="Success"),
                                properties=self.numpy_client.get_properties(ins.config))

    def fit(self, ins):
        arrays, n, metrics = self.numpy_client.fit(parameters_to_arrays(ins.parameters), ins.config)
        return FitRes(status=Status(code=Code.OK, message="Success"), parameters=arrays_to_parameters(arrays),
                      num_examples=n, metrics=metrics)

    def evaluate(self, ins):
        loss, n, metrics = self.numpy_client.evaluate(parameters_to_arrays(ins.parameters), ins.config)
        return EvaluateRes(status=Status(code=Code.OK, message="Success"), loss=loss, num_examples=n, metrics=metrics)


def entry_mismatch(arrays, expected, names=None):
    """Return None if every array has its expected shape and dtype kind, else one phrase naming the first that differs.

    Args:
        arrays (list[np.ndarray]): the arrays to check, as many as `expected`.
        expected (list[tuple[tuple, str]]): (shape, dtype kind: "f" float, "i" integer) per entry.
        names (list[str] | None): state_dict keys, to name the entry.
    """
    for i, (a, (shape, kind)) in enumerate(zip(arrays, expected)):
        name = f"entry {i} ({names[i]})" if names else f"entry {i}"
        if tuple(a.shape) != tuple(shape):
            return f"{name} has shape {tuple(a.shape)}, the model expects {tuple(shape)}"
        if a.dtype.kind != kind:
            return f"{name} has dtype {a.dtype}, the model expects {'a float' if kind == 'f' else 'an integer'} array"
    return None


def check_weights(model, arrays, source="parameters"):
    """Raise ValueError naming the first entry of `arrays` whose count, shape or dtype kind does not fit `model`."""
    sd = model.state_dict()
    if len(arrays) != len(sd):
        raise ValueError(f"{source} holds {len(arrays)} arrays but the model has {len(sd)} state_dict entries")
    expected = [(tuple(t.shape), "f" if t.is_floating_point() else "i") for t in sd.values()]
    problem = entry_mismatch(arrays, expected, list(sd))
    if problem:
        raise ValueError(f"{source} {problem}")


def set_weights(model, arrays, source="parameters"):
    """Load arrays (state_dict order) into the model exactly, casting each to its tensor's dtype."""
    check_weights(model, arrays, source)
    with torch.no_grad():  # what load_state_dict does, less its per-module bookkeeping (a third of its 9 ms)
        for t, a in zip(model.state_dict().values(), arrays):
            t.copy_(torch.as_tensor(np.asarray(a)))  # cast to the tensor's dtype


def save_npz(path, arrays):
    """Write arrays as arr_0..arr_{n-1} to path atomically (temp file in the same folder, then rename)."""
    with atomic_open(path) as f:  # a file object, so np.savez does not append '.npz' to the temp name
        np.savez(f, *arrays)


def save_round_state(path, r, arrays):
    """Write state that round `r` left for the next one (`arrays`) to `path`, tagged with `r` (read by
    `load_round_state`)."""
    save_npz(path, [np.array(r, np.int64), *arrays])


def load_round_state(path, resumed, what):
    """Return the arrays `save_round_state` wrote to `path` if they are round `resumed`'s, else None (a missing file
    quietly; a damaged file or another round's with a warning naming `what` starts from nothing)."""
    if not resumed or path is None or not Path(path).is_file():
        return None
    try:
        r, *arrays = load_npz(path)
    except ValueError as e:
        log(WARNING, "%s is not resumed and starts afresh: %s", what, e)
        return None
    if int(r) != resumed:
        log(WARNING, "%s holds round %d's %s, not round %d's; it starts afresh", path, int(r), what, resumed)
        return None
    return arrays


def load_npz(path):
    """Return the positional arrays of an npz written by save_npz; ValueError on a damaged or foreign file.

    Never unpickles: an npz holding object arrays (which would run code when loaded with pickle) is refused.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            arrays = [z[k] for k in names]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as a round npz file (truncated, damaged or pickled?): {e}") from None
    if names != [f"arr_{i}" for i in range(len(names))]:
        raise ValueError(f"{path} is not a round file: its arrays are not named arr_0..arr_{len(names) - 1}")
    return arrays


def to_half(arrays):
    """Return the arrays with float entries as float16 (integer buffers unchanged): what FP16 transfer sends."""
    return [a.astype(np.float16) if a.dtype.kind == "f" else a for a in arrays]


def change_since(trained, received, dtype=np.float32):
    """Return a client's change since the arrays it received, trained - received in `dtype`, per entry; None for an
    integer entry (BatchNorm's num_batches_tracked: no change is taken of it). The one place the change is computed
    (FP16 uplink, SecAgg+, DP clipping)."""
    return [t.astype(dtype) - r.astype(dtype) if t.dtype.kind == "f" else None for t, r in zip(trained, received)]


def encode_update(trained, received):
    """Return a client's update for FP16 uplink: float entries as float16 (trained - received), integers as they are.

    Sending the change instead of the weights keeps float16's 11-bit precision for the small per-round moves.
    """
    return [t if c is None else c.astype(np.float16) for t, c in zip(trained, change_since(trained, received))]


def decode_update(update, sent):
    """Return the client's trained float32 weights from an FP16 update and the arrays it was sent."""
    return [s.astype(np.float32) + u.astype(np.float32) if u.dtype.kind == "f" else u for u, s in zip(update, sent)]

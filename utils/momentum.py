"""AVG_MOMENTUM: the clients start each round from the federation's mean momentum instead of their own.

With KEEP_OPTIMIZER every client continues its own optimizer state from round to round. Its first moment (Adam's and
AdamW's `exp_avg`, SGD's `momentum_buffer`) then points where the client's own images pulled the model at the end of
its last round, and its first steps of the next round keep going there: each client drifts towards its own kind of
images. With AVG_MOMENTUM each client also sends the first moment it ended its round with, the server averages them
weighted by train images, and every client starts its next round from that mean (clipped per weight to what its own
second moment allows, see `receive`), keeping its own second moments and step count (a client without a state of its
own, in its first round, starts fresh as before). The idea is MimeLite's and FedCM's (Karimireddy et al. 2020; Xu et
al. 2021): local steps that follow the federation's momentum.

It costs half a copy of the trainable weights in every fit message and reply (the moments travel in bfloat16:
`pack`). Measured: bench/learning.md ("The federation's mean momentum").

AVG_SECOND_MOMENT = N (with Adam or AdamW) also replaces each client's second moment. Adam divides a step by the
root of the second moment of the client's own small batches' gradients; where those batches disagree (noise), that
second moment is large and the client's steps small, and the server then averages steps that were already shrunk.
The federation's step is the mean gradient of many clients' batches, whose second moment is smaller: the mean
first moment squared plus the clients' spread around it divided by N, m^2 + (v - m^2) / N (from the mean
bias-corrected m and v of the round's clients). Every client starts its next round from that second moment and from
the mean first moment (both at its own step count's bias correction): larger steps where the clients' batches
disagree, so that the averaged step comes closer to the one a single optimizer would take on their combined batch.
The second moment adds another half copy to every message each way. Measured: bench/learning.md ("The
second moment of the averaged gradient").
"""

from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch

from utils.aggregate import MOMENTS, WeightedMean
from utils.console import log
from utils.params import load_round_state, save_round_state

KEYS = ("exp_avg", "momentum_buffer")  # an optimizer state's first moment: Adam/AdamW, SGD
BETA2 = 0.999  # Adam's second-moment decay as Ultralytics builds Adam and AdamW (its first is the `momentum` setting)
FILE = "momentum.npz"  # in SAVE_DIR: the mean the next round's clients start from, and the round that made it


def _adam(optimizer):
    """Whether `optimizer` (a name, or auto before it is resolved) keeps Adam's moments."""
    return "adam" in optimizer.lower() or optimizer.lower() == "auto"


def in_the_way(cfg, optimizer=None):
    """Return what keeps the default AVG_MOMENTUM from this run (a clause naming the setting), or None; `optimizer`:
    the one OPTIMIZER=auto resolved to, once known."""
    from utils.strategies import ROBUST  # here: strategies.py imports this module

    optimizer = optimizer or cfg["OPTIMIZER"]
    for problem, why in (
            (not cfg["KEEP_OPTIMIZER"], "keep-optimizer is off"),
            (cfg["SECAGG"] or cfg["DP_CLIP"], "secagg and dp-clip protect the updates, and the moments would travel "
             "in the clear"),
            (cfg["FEDBN"] or cfg["SHARE"] != "all", "fedbn and share keep weights local that the mean would cover"),
            (cfg["STRATEGY"].lower() in ROBUST, f"strategy {cfg['STRATEGY']} must not average the clients plainly"),
            (not _adam(optimizer), f"optimizer {optimizer} has no Adam moments (the default was measured with AdamW)")):
        if problem:
            return why
    return None


def defaults_off(cfg, given, optimizer=None):
    """Turn AVG_MOMENTUM and AVG_SECOND_MOMENT off where they are on by default (the user did not set them: `given`)
    and another setting is in their way (`in_the_way`), saying so in one line; a value the user set stays, for `check`
    to refuse. They are on by default because they learned more than without in all 18 runs measured (3, 8 and 16
    clients, from a trained start and from scratch, 3 seeds: bench/learning.md), at the price of the weights' bytes
    once more in every message each way (the two moments, in bfloat16; docs/training-schedule.md)."""
    why = "AVG_MOMENTUM" not in given and cfg["AVG_MOMENTUM"] and in_the_way(cfg, optimizer)
    if why:
        cfg["AVG_MOMENTUM"] = False
        log(INFO, "avg-momentum and avg-second-moment (on by default) are off for this run: %s", why)
    if "AVG_SECOND_MOMENT" not in given and not (cfg["AVG_MOMENTUM"] and _adam(optimizer or cfg["OPTIMIZER"])):
        cfg["AVG_SECOND_MOMENT"] = 0  # it travels with avg-momentum's mean, and replaces Adam's second moment


def check(cfg):
    """Return None if AVG_MOMENTUM fits the run's other settings, else one sentence naming the one in the way."""
    if cfg["AVG_SECOND_MOMENT"] < 0:
        return f"avg-second-moment must be 0 (off) or more (got {cfg['AVG_SECOND_MOMENT']})"
    if not cfg["AVG_MOMENTUM"]:
        why = cfg["AVG_SECOND_MOMENT"] and in_the_way(cfg)
        return (f"avg-second-moment travels with avg-momentum's mean, which does not run here: {why}" if why else
                "avg-second-moment travels with avg-momentum's mean: it needs avg-momentum" if cfg[
                    "AVG_SECOND_MOMENT"] else None)
    if not cfg["KEEP_OPTIMIZER"]:
        return ("avg-momentum gives each client the clients' mean momentum beside its own kept optimizer state: it "
                "needs keep-optimizer")
    if cfg["SECAGG"] or cfg["DP_CLIP"]:
        return ("avg-momentum sends each client's momentum in the clear beside its update, which secagg and dp-clip "
                "exist to protect; turn one of them off")
    if cfg["AVG_SECOND_MOMENT"] and not _adam(cfg["OPTIMIZER"]):
        return f"avg-second-moment replaces Adam's second moment, which optimizer {cfg['OPTIMIZER']} does not keep"
    if cfg["FEDBN"] or cfg["SHARE"] != "all":
        return "avg-momentum averages the momentum of every trainable weight, which fedbn and share keep local"
    from utils.strategies import ROBUST  # here: strategies.py imports this module

    if cfg["STRATEGY"].lower() in ROBUST:
        return (f"avg-momentum averages the clients' momentum plainly, which strategy {cfg['STRATEGY']} exists to "
                "prevent for their weights")
    return None


def pack(values):
    """Return float32 `values` as the bytes of bfloat16 numbers (float32's upper half, rounded to nearest even): what
    the moments travel as, half float32's size. A moment is a running estimate whose 3 significant digits (bfloat16
    keeps 8 bits of mantissa and float32's range, so no small second moment flushes to 0 as in float16) are more than
    it is known to; the weights themselves travel in float32. torch's own conversion (one pass: 4x faster than the
    same rounding in numpy's integer operations, 1.3 ms for yolov8n's 3M values)."""
    flat = torch.from_numpy(np.ascontiguousarray(values, np.float32).reshape(-1))
    return flat.to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def unpack(data):
    """Return the float32 values of bfloat16 bytes from `pack`."""
    return (np.frombuffer(data, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _first(keys):
    """Return the index in `keys` of the state's first moment; None for an optimizer without momentum."""
    return next((keys.index(k) for k in KEYS if k in keys), None)


def encode(keys, arrays, beta1=0.9, second=False):
    """Return what a client sends of its optimizer state (utils/train.py `get_optimizer_state`: `keys`, then per
    weight one array per key): {"momentum": its first moments as one bfloat16 buffer (`pack`) in the weights'
    order}; with `second` (AVG_SECOND_MOMENT) and Adam's state, Adam's bias-corrected moments m / (1 - beta1^t) and
    v / (1 - beta2^t) as "momentum" and "momentum_sq"; {} for an optimizer without momentum."""
    j = _first(keys)
    if j is None:
        return {}
    firsts = arrays[j::len(keys)]
    if not (second and "exp_avg_sq" in keys and "step" in keys):
        return {"momentum": pack(np.concatenate([np.asarray(a, np.float32).ravel() for a in firsts]))}
    t = [float(np.asarray(a)) for a in arrays[keys.index("step")::len(keys)]]
    sq = arrays[keys.index("exp_avg_sq")::len(keys)]
    return {"momentum": _join((a, 1 - beta1**s) for a, s in zip(firsts, t)),
            "momentum_sq": _join((a, 1 - BETA2**s) for a, s in zip(sq, t))}


def _join(pairs):
    """Return the arrays of (array, divisor) pairs divided in float64 (a weight no step moved: t = 0, its moments 0)
    and flattened into one float32 array (each array's float64 quotient written straight into it: a third less time
    than concatenating the quotients first, the same values), sent as bfloat16 (`pack`)."""
    pairs = [(np.asarray(a), d) for a, d in pairs]
    out, at = np.empty(sum(a.size for a, _ in pairs), np.float32), 0
    for a, d in pairs:
        np.divide(a.reshape(-1), max(d, 1e-300), out=out[at:at + a.size], dtype=np.float64, casting="same_kind")
        at += a.size
    return pack(out)


def receive(state, data, beta1=0.9, who="a client", data_sq=None):
    """Return the optimizer state `state` (keys, arrays) with its first moments replaced by the federation's mean
    `data` (a buffer from `MomentumMean.config`); unchanged where the client has no state (it starts fresh), the
    server sent no mean (round 1, a resumed run's first round) or the mean does not fit (logged). With `data_sq`
    (AVG_SECOND_MOMENT) `data` and `data_sq` are the bias-corrected first and second moments of the federation's
    averaged gradient, and both of the client's moments are replaced (at its own step count's bias correction).

    Adam's step is m_hat / sqrt(v_hat), and in its own state |m_hat| stays about within sqrt(v_hat), so no step is much
    larger than the learning rate. The mean of the others' first moments need not: a weight this client's images barely
    move (a tiny v of its own) may be one the others' move a lot. So each received value is clipped to what this
    client's own second moment allows, |m_hat| <= sqrt(v_hat) (with Adam's bias corrections at its own step count t:
    |m| <= sqrt(v) (1 - beta1^t) / sqrt(1 - beta2^t)). Without it, one of three runs from scratch at 16 clients diverged
    in round 4 (bench/learning.md). SGD's momentum buffer, which has no second moment, is used as sent. A second moment
    sent with the mean is at least the mean's square, so no clip is needed there.
    """
    j = None if state is None or not data else _first(state[0])
    if j is None:
        return state
    keys, arrays = state
    mean, idx = unpack(data), range(j, len(arrays), len(keys))
    size = sum(arrays[i].size for i in idx)
    sq, step = (keys.index(k) - j if k in keys else None for k in ("exp_avg_sq", "step"))
    second = unpack(data_sq) if data_sq and sq is not None and step is not None else None
    if size != mean.size or (second is not None and second.size != size):
        log(WARNING, "%s: the federation's momentum has %d values, its optimizer %d; it keeps its own", who,
            mean.size if size != mean.size else second.size, size)
        return state
    out, at = list(arrays), 0
    for i in idx:
        m = mean[at:at + arrays[i].size].reshape(arrays[i].shape)
        t = float(np.asarray(arrays[i + step])) if step is not None else 0.0
        if second is not None:  # the averaged gradient's moments, bias-corrected: back to this client's step count
            out[i + sq] = (second[at:at + m.size].reshape(m.shape) * (1 - BETA2**t)).astype(arrays[i + sq].dtype)
            m = m.astype(np.float64) * (1 - beta1**t)
        elif sq is not None and step is not None:
            bound = np.sqrt(arrays[i + sq].astype(np.float64)) * (1 - beta1**t) / np.sqrt(max(1 - BETA2**t, 1e-300))
            m = np.clip(m, -bound, bound)
        at += m.size
        out[i] = m.astype(arrays[i].dtype)
    return keys, out


class MomentumMean:
    """The server's side: the image-weighted mean of a round's first moments, sent with the next round's fit (with
    AVG_SECOND_MOMENT = N, also the second moment of the N-client averaged gradient made from the mean moments).

    With a `folder` (SAVE_DIR) what is sent is also written there after every round (`save`), so a resumed run's
    first round starts from what its last complete round made, as it would have without the stop.
    """

    def __init__(self, folder=None, resumed=0, second=0):
        """Start with nothing to send; a run resumed after round `resumed` reads what that round made, if saved."""
        self.path, self.second = Path(folder) / FILE if folder else None, second
        saved = load_round_state(self.path, resumed, "the clients' mean momentum") or []
        self.sent = {k: pack(np.asarray(a, np.float32)) for k, a in zip(MOMENTS, saved)}
        self.warned = False
        self.begin()

    def begin(self):
        """Start a round with nothing added (the last round's mean is still the one sent)."""
        self.round = WeightedMean()

    def check(self, data, data_sq=None):
        """Return None if `data` (and `data_sq`) can be added to this round's mean, else one sentence."""
        if not isinstance(data, bytes) or not data or len(data) % 2:
            return "its momentum is not a bfloat16 buffer"
        if data_sq is not None and (not isinstance(data_sq, bytes) or len(data_sq) != len(data)):
            return "its second moment is not a bfloat16 buffer as long as its momentum"
        if self.round.sum is not None and len(data) // 2 != self.round.sum[0].size:
            return f"its momentum has {len(data) // 2} values, the other clients' {self.round.sum[0].size}"
        if self.round.sum is not None and (data_sq is None) != (len(self.round.sum) == 1):
            return "it sent a second moment where the other clients did not, or none where they did"
        return None

    def add(self, data, n, data_sq=None):
        """Add one client's first moments (a buffer from `encode`, checked) and its second, if sent, with weight n
        (its train images)."""
        self.round.add([unpack(x) for x in (data, data_sq) if x is not None], n)

    def close(self):
        """End the round: its mean, if any client sent a momentum, is what the next round's clients start from."""
        if self.round.total:
            means = self.round.result([np.empty(0, np.float32)] * len(self.round.sum))
            if len(means) == 2 and self.second:  # the averaged gradient's second moment: m^2 + (v - m^2) / N
                m, v = (a.astype(np.float64) for a in means)
                m2 = m**2  # in place from here: the same arithmetic with two temporaries of 8 bytes a weight, not five
                v -= m2
                np.clip(v, 0, None, out=v)
                v /= self.second
                v += m2
                means[1] = v.astype(np.float32)
            elif self.second and not self.warned:
                self.warned = True
                log(WARNING, "avg-second-moment: the clients' optimizer keeps no second moment (Adam's); they share "
                    "only their mean momentum")
            self.sent = {k: pack(a) for k, a in zip(MOMENTS, means)}
        self.begin()

    def save(self, r):
        """Write what round `r` closed with (what the next round is sent) to the folder, if any."""
        if self.path is not None and self.sent:
            save_round_state(self.path, r, [unpack(b) for b in self.sent.values()])

    def config(self):
        """Return the fit instructions' entries carrying the mean ({} before any round sent one)."""
        return dict(self.sent)

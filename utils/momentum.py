"""AVG_MOMENTUM: the clients start each round from the federation's mean momentum instead of their own.

With KEEP_OPTIMIZER every client continues its own optimizer state from round to round. Its first moment (Adam's and
AdamW's `exp_avg`, SGD's `momentum_buffer`) then points where the client's own images pulled the model at the end of
its last round, and its first steps of the next round keep going there: each client drifts towards its own kind of
images. With AVG_MOMENTUM each client also sends the first moment it ended its round with, the server averages them
weighted by train images, and every client starts its next round from that mean (clipped per weight to what its own
second moment allows, see `receive`), keeping its own second moments and step count (a client without a state of its
own, in its first round, starts fresh as before). The idea is MimeLite's and FedCM's (Karimireddy et al. 2020; Xu et
al. 2021): local steps that follow the federation's momentum.

It costs one more float32 copy of the trainable weights in every fit message and reply. Measured:
bench/learning.md ("The federation's mean momentum").
"""

from logging import WARNING
from pathlib import Path

import numpy as np

from utils.aggregate import WeightedMean
from utils.console import log
from utils.params import load_round_state, save_round_state

KEYS = ("exp_avg", "momentum_buffer")  # an optimizer state's first moment: Adam/AdamW, SGD
BETA2 = 0.999  # Adam's second-moment decay as Ultralytics builds Adam and AdamW (its first is the `momentum` setting)
FILE = "momentum.npz"  # in SAVE_DIR: the mean the next round's clients start from, and the round that made it


def check(cfg):
    """Return None if AVG_MOMENTUM fits the run's other settings, else one sentence naming the one in the way."""
    if not cfg["AVG_MOMENTUM"]:
        return None
    if not cfg["KEEP_OPTIMIZER"]:
        return ("avg-momentum gives each client the clients' mean momentum beside its own kept optimizer state: it "
                "needs keep-optimizer")
    if cfg["SECAGG"] or cfg["DP_CLIP"]:
        return ("avg-momentum sends each client's momentum in the clear beside its update, which secagg and dp-clip "
                "exist to protect; turn one of them off")
    if cfg["FEDBN"] or cfg["SHARE"] != "all":
        return "avg-momentum averages the momentum of every trainable weight, which fedbn and share keep local"
    from utils.strategies import ROBUST  # here: strategies.py imports this module

    if cfg["STRATEGY"].lower() in ROBUST:
        return (f"avg-momentum averages the clients' momentum plainly, which strategy {cfg['STRATEGY']} exists to "
                "prevent for their weights")
    return None


def _first(keys):
    """Return the index in `keys` of the state's first moment; None for an optimizer without momentum."""
    return next((keys.index(k) for k in KEYS if k in keys), None)


def encode(keys, arrays):
    """Return the first moments of an optimizer state (utils/train.py `get_optimizer_state`: `keys`, then per weight
    one array per key) as one float32 buffer in the weights' order, or None if the state has none."""
    j = _first(keys)
    if j is None:
        return None
    return np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays[j::len(keys)]]).tobytes()


def receive(state, data, beta1=0.9, who="a client"):
    """Return the optimizer state `state` (keys, arrays) with its first moments replaced by the federation's mean
    `data` (a buffer from `MomentumMean.config`); unchanged where the client has no state (it starts fresh), the
    server sent no mean (round 1, a resumed run's first round) or the mean does not fit (logged).

    Adam's step is m_hat / sqrt(v_hat), and in its own state |m_hat| stays about within sqrt(v_hat), so no step is much
    larger than the learning rate. The mean of the others' first moments need not: a weight this client's images barely
    move (a tiny v of its own) may be one the others' move a lot. So each received value is clipped to what this
    client's own second moment allows, |m_hat| <= sqrt(v_hat) (with Adam's bias corrections at its own step count t:
    |m| <= sqrt(v) (1 - beta1^t) / sqrt(1 - beta2^t)). Without it, one of three runs from scratch at 16 clients diverged
    in round 4 (bench/learning.md). SGD's momentum buffer, which has no second moment, is used as sent.
    """
    j = None if state is None or not data else _first(state[0])
    if j is None:
        return state
    keys, arrays = state
    mean, idx = np.frombuffer(data, np.float32), range(j, len(arrays), len(keys))
    size = sum(arrays[i].size for i in idx)
    if size != mean.size:
        log(WARNING, "%s: the federation's momentum has %d values, its optimizer %d; it keeps its own", who,
            mean.size, size)
        return state
    sq, step = (keys.index(k) - j if k in keys else None for k in ("exp_avg_sq", "step"))
    out, at = list(arrays), 0
    for i in idx:
        m = mean[at:at + arrays[i].size].reshape(arrays[i].shape)
        at += arrays[i].size
        if sq is not None and step is not None:
            t = float(np.asarray(arrays[i + step]))
            bound = np.sqrt(arrays[i + sq].astype(np.float64)) * (1 - beta1**t) / np.sqrt(max(1 - BETA2**t, 1e-300))
            m = np.clip(m, -bound, bound)
        out[i] = m.astype(arrays[i].dtype)
    return keys, out


class MomentumMean:
    """The server's side: the image-weighted mean of a round's first moments, sent with the next round's fit.

    With a `folder` (SAVE_DIR) the mean is also written there after every round (`save`), so a resumed run's first
    round starts from the mean its last complete round made, as it would have without the stop.
    """

    def __init__(self, folder=None, resumed=0):
        """Start with no mean to send; a run resumed after round `resumed` reads the mean that round made, if saved."""
        self.path = Path(folder) / FILE if folder else None
        saved = load_round_state(self.path, resumed, "the clients' mean momentum")
        self.mean = np.asarray(saved[0], np.float32).tobytes() if saved else None
        self.begin()

    def begin(self):
        """Start a round with nothing added (the last round's mean is still the one sent)."""
        self.round = WeightedMean()

    def check(self, data):
        """Return None if `data` can be added to this round's mean, else one sentence."""
        if not isinstance(data, bytes) or not data or len(data) % 4:
            return "its momentum is not a float32 buffer"
        if self.round.sum is not None and len(data) // 4 != self.round.sum[0].size:
            return f"its momentum has {len(data) // 4} values, the other clients' {self.round.sum[0].size}"
        return None

    def add(self, data, n):
        """Add one client's first moments (a buffer from `encode`, checked) with weight n (its train images)."""
        self.round.add([np.frombuffer(data, np.float32)], n)

    def close(self):
        """End the round: its mean, if any client sent a momentum, is what the next round's clients start from."""
        if self.round.total:
            self.mean = self.round.result([np.empty(0, np.float32)])[0].tobytes()
        self.begin()

    def save(self, r):
        """Write the mean round `r` closed with (the one the next round is sent) to the folder, if any."""
        if self.path is not None and self.mean is not None:
            save_round_state(self.path, r, [np.frombuffer(self.mean, np.float32)])

    def config(self):
        """Return the fit instructions' entry carrying the mean ({} before any round sent one)."""
        return {"momentum": self.mean} if self.mean is not None else {}

"""Server side of each strategy: how a round's client updates become the new global arrays.

Every strategy splits the state_dict into trainable weights and buffers (BatchNorm running statistics, integer
`num_batches_tracked`). Buffers always take the strategy's plain aggregate (mean, median or Krum's pick), never a
server learning rate, momentum or Adam step (on BatchNorm statistics those took a YOLO federation to 0 mAP).
Trainable weights take the server step:
- fedavg, fedprox:        w + SERVER_LR * (mean - w)              (fedprox differs on the client: proximal term)
                          With FEDEXP_MAX, SERVER_LR is instead set each round (FedExP, Jhunjhunwala et al. 2023):
                          max(1, sum_k p_k |w_k - w|^2 / (2 |mean - w|^2)), at most FEDEXP_MAX, over trainable
                          weights: where the clients' changes disagree their mean is shorter than each of them, and
                          the server gives back part of that length.
- fedavgm:                v = SERVER_MOMENTUM * v + (1 - SERVER_MOMENTUM) * (mean - w);  w + SERVER_LR * v
                          (an average of recent updates, so SERVER_LR 1 moves as far as FedAvg on a steady
                          direction; Flower's FedAvgM, v = b v + (mean - w), is this with SERVER_LR / (1 - b))
- fedadam, fedyogi:       Adam / Yogi on the pseudo-gradient (mean - w) with ADAPTIVE_LR, ADAPTIVE_BETA1/2, ADAPTIVE_TAU
- fednova:                w + SERVER_LR * tau_eff * sum_k p_k (w_k - w) / tau_k  (FedNova, Wang et al. 2020: each
                          client's change divided by its optimizer steps tau_k, p_k its share of the images,
                          tau_eff = sum_k p_k tau_k; clients that take more steps no longer pull the average harder)
- fedmedian:              coordinate-wise median of the updates (unweighted), then the SERVER_LR step
- fedtrimmedavg:          coordinate-wise mean without the TRIM_BETA largest and smallest fraction, then SERVER_LR
- krum:                   the update closest to its n - KRUM_F - 2 nearest others (distances over trainable weights)
With POOLED_BN_VAR, mean-based strategies set each BatchNorm running_var to the variance of the clients' data
taken together (mean of the variances plus the spread of the clients' running means), as one pass over the pooled
data would measure it, instead of the mean of the variances (which is too small when clients differ).
Mean-based strategies add updates into one running float64 sum; the robust ones (median, trimmed mean, Krum) need
every update of the round at once and hold them in memory. Server optimizer state (momentum, Adam moments and step
count) is written to SAVE_DIR/server_state.npz after every round, and a resumed run continues from it.
"""

from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from utils.aggregate import WeightedMean, server_step
from utils.console import log
from utils.momentum import MomentumMean
from utils.params import change_since, load_round_state, save_round_state

STRATEGIES = ("fedavg", "fedprox", "fednova", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
ROBUST = ("fedmedian", "fedtrimmedavg", "krum")
STATEFUL = ("fedavgm", "fedadam", "fedyogi")  # a server optimizer whose state carries over from round to round
STATE_FILE = "server_state.npz"  # in SAVE_DIR: the round it follows, the step count, the first (and second) moments


def check_strategy(cfg, clients):
    """Return None if the strategy settings make sense for `clients` clients per round, else one sentence."""
    s = cfg["STRATEGY"]
    if s not in STRATEGIES:
        return f"strategy {s!r} is not one of {', '.join(STRATEGIES)}"
    if s == "fednova" and (cfg["SECAGG"] or cfg["DP_CLIP"]):
        return "fednova needs each client's own update and step count; it cannot run with secagg or dp-clip"
    if s == "fedprox" and cfg["PROXIMAL_MU"] <= 0:
        return f"fedprox needs proximal-mu > 0 (got {cfg['PROXIMAL_MU']})"
    if cfg["FEDEXP_MAX"]:
        if cfg["FEDEXP_MAX"] < 1:
            return f"fedexp-max must be 0 (off) or at least 1 (got {cfg['FEDEXP_MAX']})"
        if s not in ("fedavg", "fedprox"):
            return f"fedexp-max sets fedavg's and fedprox's server step; strategy {s} has its own"
        if cfg["SECAGG"] or cfg["DP_CLIP"] or cfg["FEDBN"] or cfg["SHARE"] != "all":
            return ("fedexp-max needs every client's whole change in the clear, which secagg, dp-clip, fedbn and "
                    "share keep from the server")
    if not 0 <= cfg["SERVER_MOMENTUM"] < 1:
        return f"server-momentum must be in [0, 1) (got {cfg['SERVER_MOMENTUM']})"
    for k in ("ADAPTIVE_BETA1", "ADAPTIVE_BETA2"):
        if not 0 <= cfg[k] < 1:
            return f"{k.lower().replace('_', '-')} must be in [0, 1) (got {cfg[k]})"
    if not 0 <= cfg["TRIM_BETA"] < 0.5:
        return f"trim-beta must be in [0, 0.5) (got {cfg['TRIM_BETA']})"
    if s == "krum" and clients and clients <= 2 * cfg["KRUM_F"] + 2:
        n = 2 * cfg["KRUM_F"] + 2
        return f"krum with krum-f {cfg['KRUM_F']} needs more than {n} clients, the run has {clients}"
    return None


def _squared_change(arrays, start, trainable):
    """Return the squared length of the change from `start` to `arrays` over the trainable entries (float64)."""
    return sum(float(np.sum(c * c)) for c, t in zip(change_since(arrays, start, np.float64), trainable) if t)


def _cast(arrays, reference):
    """Return `arrays` in the dtypes of `reference`, integers rounded."""
    return [np.rint(a).astype(r.dtype) if r.dtype.kind in "iub" else np.asarray(a).astype(r.dtype)
            for a, r in zip(arrays, reference)]


class Aggregator:
    """One round's aggregation plus the server optimizer state kept between rounds.

    Use: `begin()`, `add(arrays, n)` for each valid update, then `result(current)`.
    """

    def __init__(self, cfg, trainable, bn_pairs=(), resumed=0):
        """Keep the settings, which state_dict entries are trainable and the (running_mean, running_var) index pairs;
        `resumed`: the run continues after that round (the server optimizer's state and AVG_MOMENTUM's mean are read
        back from SAVE_DIR)."""
        self.cfg, self.name, self.trainable = cfg, cfg["STRATEGY"], trainable
        self.bn_pairs = list(bn_pairs) if cfg["POOLED_BN_VAR"] and self.name not in ROBUST else []
        self.m = self.v = None  # server momentum / Adam moments of the trainable entries
        self.fedexp = {}  # FEDEXP_MAX: the last round's ratio and server step (metrics.csv)
        self.t = 0  # server optimizer steps taken
        self.momentum = MomentumMean(cfg.get("SAVE_DIR"), resumed, cfg.get("AVG_SECOND_MOMENT", 0)) if cfg.get(
            "AVG_MOMENTUM") else None  # the clients' mean moments, written to SAVE_DIR every round (`save_round`)
        self.state_path = Path(cfg["SAVE_DIR"]) / STATE_FILE if cfg.get("SAVE_DIR") and self.name in STATEFUL else None
        self._resume_state(load_round_state(self.state_path, resumed, f"{self.name} server state"))
        self.begin()

    def _resume_state(self, saved):
        """Continue the server optimizer from the `saved` step count and moments; from zero if there are none (or
        they do not fit this model, logged)."""
        if not saved:
            return
        (t, *moments), k = saved, sum(map(bool, self.trainable))
        if len(moments) != (k if self.name == "fedavgm" else 2 * k):
            log(WARNING, "%s does not fit this model; the server optimizer starts from zero", self.state_path)
            return
        self.t, self.m = int(t), moments[:k]
        self.v = moments[k:] if self.name != "fedavgm" else [np.zeros_like(m) for m in self.m]

    def begin(self, current=None):
        """Start a round with no updates; FEDEXP_MAX needs the `current` global arrays (the updates' starting point)."""
        self.mean, self.squares, self.updates = WeightedMean(), WeightedMean(), []
        self.start, self.spread = (current if self.cfg["FEDEXP_MAX"] else None), 0.0  # FEDEXP: sum n |w_k - w|^2
        self.nova, self.steps = WeightedMean(), 0.0  # fednova: trainable weights by images / steps; sum n x steps
        if self.momentum:
            self.momentum.begin()

    @property
    def total(self):
        """Return the sum of the added updates' weights (train images)."""
        return self.mean.total

    def check(self, metrics):
        """Return None if a client's reply has what this strategy needs, else one sentence."""
        steps = metrics.get("steps")
        if self.name == "fednova" and (not isinstance(steps, int) or steps <= 0):
            return f"it reported {steps!r} optimizer steps (fednova needs a positive integer)"
        if self.momentum and "momentum" in metrics:
            return self.momentum.check(metrics["momentum"], metrics.get("momentum_sq"))
        return None

    def add(self, arrays, n, steps=None, momentum=None, momentum_sq=None):
        """Add one client's arrays with weight n (and, for fednova, the optimizer steps it took; with AVG_MOMENTUM
        the first moment it ended with, and with AVG_SECOND_MOMENT its second)."""
        self.mean.add(arrays, n)
        if self.start is not None:
            self.spread += n * _squared_change(arrays, self.start, self.trainable)
        if self.momentum and momentum is not None:
            self.momentum.add(momentum, n, momentum_sq)
        if self.name == "fednova":
            self.nova.add([a for a, t in zip(arrays, self.trainable) if t], n / steps)
            self.steps += n * steps
        if self.bn_pairs:
            self.squares.add([arrays[i].astype(np.float64) ** 2 for i, _ in self.bn_pairs], n)
        if self.name in ROBUST:
            self.updates.append((arrays, n))

    def save_round(self, r):
        """Keep in SAVE_DIR what the next round needs from this one beside the weights, for a resume: AVG_MOMENTUM's
        mean, the server optimizer's state (fedavgm, fedadam, fedyogi: float64, about 4 or 8 times the model's
        size in bytes: 24 or 48 MB for yolov8n)."""
        if self.momentum:
            self.momentum.save(r)
        if self.state_path is not None and self.m is not None:
            save_round_state(self.state_path, r, [np.array(self.t, np.int64), *self.m,
                                                  *(self.v if self.name != "fedavgm" else [])])

    def _robust(self, current):
        """Return the median, trimmed mean or Krum pick of the round's updates."""
        if self.name == "fedmedian":
            return _cast(aggregate_median(self.updates), current)
        if self.name == "fedtrimmedavg":
            return _cast(aggregate_trimmed_avg(self.updates, self.cfg["TRIM_BETA"]), current)
        subsets = [([a for a, t in zip(arrays, self.trainable) if t], n) for arrays, n in self.updates]
        picked = aggregate_krum(subsets, self.cfg["KRUM_F"], 0)
        return next(arrays for (arrays, _), (sub, _) in zip(self.updates, subsets) if sub is picked)

    def _server_lr(self, current, mean):
        """Return this round's server learning rate: SERVER_LR, or with FEDEXP_MAX FedExP's from the round's spread
        (kept as `self.fedexp`: the ratio of the clients' mean squared change to their mean's, and the step)."""
        if self.start is None or not self.mean.total:
            return self.cfg["SERVER_LR"]
        ratio = self.spread / self.mean.total / max(_squared_change(mean, current, self.trainable), 1e-30)
        lr = min(max(1.0, ratio / 2), self.cfg["FEDEXP_MAX"])
        self.fedexp = {"fedexp_ratio": round(ratio, 4), "fedexp_lr": round(lr, 4)}
        return lr

    def result(self, current):
        """Return the new global arrays from the round's updates and the current global arrays."""
        if self.momentum:
            self.momentum.close()
        agg = self._robust(current) if self.name in ROBUST else self.mean.result(current)
        if self.bn_pairs:  # pooled variance: E[var_k + mean_k^2] - (E[mean_k])^2, the clients' data taken together
            squares = [s / self.squares.total for s in self.squares.sum]
            for (i, j), sq in zip(self.bn_pairs, squares):
                mean = self.mean.sum[i] / self.mean.total
                agg[j] = (self.mean.sum[j] / self.mean.total + sq - mean**2).clip(min=0).astype(current[j].dtype)
        if self.name == "fednova":  # trainable: current + tau_eff * (sum p/tau) * (mean weighted by n/tau - current)
            scale = self.steps / self.mean.total * self.nova.total / self.mean.total
            idx = [i for i, t in enumerate(self.trainable) if t]
            for i, m in zip(idx, self.nova.result([current[i] for i in idx])):
                agg[i] = (current[i] + scale * (m.astype(np.float64) - current[i])).astype(current[i].dtype)
        if self.name not in STATEFUL:
            return server_step(current, agg, self.trainable, self._server_lr(current, agg))
        idx = [i for i, t in enumerate(self.trainable) if t]
        delta = [agg[i].astype(np.float64) - current[i] for i in idx]
        if self.m is None:
            self.m = [np.zeros_like(d) for d in delta]
            self.v = [np.zeros_like(d) for d in delta]
        self.t += 1
        if self.name == "fedavgm":
            beta = self.cfg["SERVER_MOMENTUM"]
            self.m = [beta * m + (1 - beta) * d for m, d in zip(self.m, delta)]
            step = [self.cfg["SERVER_LR"] * m for m in self.m]
        else:
            b1, b2, tau = self.cfg["ADAPTIVE_BETA1"], self.cfg["ADAPTIVE_BETA2"], self.cfg["ADAPTIVE_TAU"]
            self.m = [b1 * m + (1 - b1) * d for m, d in zip(self.m, delta)]
            if self.name == "fedadam":
                self.v = [b2 * v + (1 - b2) * d * d for v, d in zip(self.v, delta)]
            else:  # Yogi: v moves towards d^2 by at most (1 - b2) d^2, with the sign of the difference
                self.v = [v - (1 - b2) * d * d * np.sign(v - d * d) for v, d in zip(self.v, delta)]
            lr = self.cfg["ADAPTIVE_LR"] * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)  # bias correction
            step = [lr * m / (np.sqrt(v) + tau) for m, v in zip(self.m, self.v)]
        out = list(agg)  # buffers: the plain aggregate
        for i, s in zip(idx, step):
            out[i] = (current[i] + s).astype(current[i].dtype)
        return out

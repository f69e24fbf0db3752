"""Client-level differential privacy of the global model: each client's change clipped, the mean noised, accounted.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models") with server-side fixed
clipping, as Flower's `DifferentialPrivacyServerSideFixedClipping` does it: every valid client change (its weights
minus the global weights it was sent) is scaled down to L2 norm DP_CLIP at most, the changes are averaged
*unweighted* (one client's weight in the mean is then 1/n whatever its image count, the sensitivity the noise is
calibrated to), and Gaussian noise of standard deviation DP_NOISE x DP_CLIP / n is added to the mean. Done here
rather than through Flower's wrapper because the wrapper divides by each change's norm (a client whose weights did
not move raises ZeroDivisionError and loses the round), averages with the inner strategy's weights, and would add
its noise after this project's strategy has saved the round; the arithmetic is the same.

What the vector covers: every floating-point entry the server averages, BatchNorm running statistics included
(they are measured on the client's images, so they leak as much as weights do). Integer buffers (BatchNorm
`num_batches_tracked`, unused by YOLO) are not taken from the clients at all: the global value is kept. A noised
running_var is clamped at 0 (post-processing, which costs no privacy).

Accounting: each round is one Gaussian mechanism with noise multiplier DP_NOISE on the sum of clipped changes of
the round's clients; the rounds compose. The (epsilon, DP_DELTA) spent after r rounds comes from the RDP accountant
of Google's `dp-accounting` library. With every client in every round (FRACTION_FIT 1) there is no sampling
amplification. With FRACTION_FIT q < 1 each client takes part in a round independently with probability q (Poisson
sampling, utils/nodes.py), the sum is divided by the expected count q x clients rather than by the clients that
came (the fixed-denominator estimator of McMahan et al. 2018, which keeps one client's influence at most
DP_CLIP / (q x clients)), and each round is accounted as a Poisson-sampled Gaussian mechanism, so epsilon falls
with q.

Adaptive clipping (DP_ADAPTIVE; Andrew et al. 2021): after every round the clip moves geometrically toward the
DP_QUANTILE quantile of the clients' change norms, from a noised count of the clients that were not clipped
(`next_clip`); the update's noise multiplier is raised so that count and update together spend what one Gaussian
mechanism of multiplier DP_NOISE spends (`adaptive_noise`), and the accounting is unchanged. With SecAgg+ the
clients clip their own changes and report whether they clipped (one bit each, as in Flower's client-side mods).

The server sees each individual update before clipping (server-side clipping trusts the server); the protection
is for what leaves the server: round files, checkpoints, the model sent to clients. The diagnostics written next
to them (how many updates were clipped, their median norm, the clients' own validation metrics) are not noised.
"""

from logging import INFO, WARNING

import numpy as np
from absl import logging as absl_logging

from utils.console import log
from utils.params import change_since
from utils.strategies import ROBUST

absl_logging.set_verbosity(absl_logging.ERROR)  # the RDP accountant's note on an order it skips is not the user's

CLIP_LR = 0.2  # adaptive clipping: the clip moves by exp(-CLIP_LR x (unclipped fraction - DP_QUANTILE)) a round
COUNT_STD_PER_CLIENT = 1 / 20  # adaptive clipping: the unclipped count gets noise of std clients / 20


def check_privacy(cfg, clients=0):
    """Return None if the DP settings make sense for `clients` clients a round, else one sentence naming the setting
    at fault."""
    if cfg["DP_CLIP"] < 0 or cfg["DP_NOISE"] < 0:
        return f"dp-clip ({cfg['DP_CLIP']}) and dp-noise ({cfg['DP_NOISE']}) must be 0 or more"
    if not cfg["DP_CLIP"]:
        return None
    if not 0 < cfg["DP_DELTA"] < 1:
        return f"dp-delta must be in (0, 1) (got {cfg['DP_DELTA']})"
    if cfg["STRATEGY"] in ROBUST:
        return (f"strategy {cfg['STRATEGY']} cannot be used with dp-clip: differential privacy here noises the mean "
                "of the clipped updates; use fedavg, fedprox, fedavgm, fedadam or fedyogi")
    if cfg.get("FRACTION_FIT", 1.0) < 1 and cfg["SECAGG"]:
        return ("fraction-fit below 1 cannot be used with dp-clip and secagg together: the secure sum is divided by "
                "the clients that came, which the sampled accountant does not cover; use one of secagg or sampling")
    if cfg["FEDBN"]:
        return "fedbn cannot be used with dp-clip: the accountant assumes every averaged entry is clipped and noised"
    if cfg["DP_ADAPTIVE"]:
        if not 0 < cfg["DP_QUANTILE"] < 1:
            return f"dp-quantile must be in (0, 1) (got {cfg['DP_QUANTILE']})"
        if clients and cfg["DP_NOISE"] >= 2 * COUNT_STD_PER_CLIENT * clients:
            return (f"dp-noise {cfg['DP_NOISE']} is too large for dp-adaptive with {clients} clients: the noise on "
                    f"the count of clipped clients (std clients / 20) leaves no room below dp-noise "
                    f"{2 * COUNT_STD_PER_CLIENT * clients:g}; lower dp-noise or turn dp-adaptive off")
    return None


def adaptive_noise(noise, clients):
    """Return (std of the noise on the unclipped count, noise multiplier of the update) for adaptive clipping.

    Andrew et al. 2021 ("Differentially Private Learning with Adaptive Clipping"): the count and the update are two
    Gaussian mechanisms per round; with these two, together they spend what one of multiplier `noise` spends, so
    the accounting is unchanged. The same rule as Flower's `compute_adaptive_noise_params`.
    """
    if noise <= 0:
        return 0.0, 0.0
    count_std = clients * COUNT_STD_PER_CLIENT
    return count_std, (noise ** -2 - (2 * count_std) ** -2) ** -0.5


def next_clip(clip, unclipped, clients, count_std, quantile):
    """Return the next round's clip: geometric step toward the `quantile` of the clients' change norms.

    `unclipped` clients had a change of norm <= clip; their count is noised before it is used.
    """
    fraction = (unclipped + np.random.default_rng().normal(0.0, count_std)) / clients if count_std else \
        unclipped / clients
    return float(clip * np.exp(-CLIP_LR * (fraction - quantile)))


def epsilon(noise, rounds, delta, rate=1.0):
    """Return the epsilon spent at `delta` by `rounds` Gaussian mechanisms of noise multiplier `noise` (RDP), each on
    a Poisson sample of the clients at `rate` (1: every client every round)."""
    if rounds <= 0:
        return 0.0
    if noise <= 0:
        return float("inf")
    import dp_accounting  # 0.75 s to import: here, not in every client process of every run

    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(noise)
    if rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(rate, event)
    accountant.compose(event, count=int(rounds))
    return float(accountant.get_epsilon(delta))


def clip_change(trained, received, clip):
    """Return (the trained arrays with their change since `received` scaled to L2 norm `clip` at most, its norm).

    The norm is over every float entry (FlatClip); integer entries are returned as they are.
    """
    change = change_since(trained, received, np.float64)
    norm = float(np.sqrt(sum(np.sum(c * c) for c in change if c is not None)))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0  # a client that did not move counts as it is
    return [t if c is None else (r + c * scale).astype(r.dtype) for t, r, c in zip(trained, received, change)], norm


def add_noise(arrays, std, var_entries=()):
    """Return the arrays with Gaussian noise of standard deviation `std` on every float entry (integers as they are),
    the BatchNorm running_var entries `var_entries` clamped at 0 after it (post-processing costs no privacy)."""
    rng = np.random.default_rng()  # fresh OS entropy every round
    out = [(a + rng.normal(0.0, std, a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a for a in arrays]
    for i in var_entries:
        out[i] = out[i].clip(min=0)
    return out


class PrivateSum:
    """A round's clipped client changes, added one at a time as they arrive (the server holds one float64 sum).

    Args:
        current (list[np.ndarray]): the global arrays the clients were sent.
        clip (float): L2 norm each client's change over the float entries is clipped to.
    """

    def __init__(self, current, clip):
        """Start with no change added."""
        self.current, self.clip = current, clip
        self.floats = [i for i, c in enumerate(current) if c.dtype.kind == "f"]
        self.total = [np.zeros(current[i].shape, np.float64) for i in self.floats]
        self.norms = []

    def add(self, update):
        """Clip one client's full arrays' change to the clip and add it."""
        clipped, norm = clip_change([update[i] if i in self.floats else c for i, c in enumerate(self.current)],
                                    self.current, self.clip)
        self.norms.append(norm)
        for t, i in zip(self.total, self.floats):
            t += clipped[i].astype(np.float64) - self.current[i]

    def result(self, noise, var_entries=(), denominator=None):
        """Return the noised mean of the clipped changes and its diagnostics (see `private_mean`)."""
        n = denominator or len(self.norms)
        std = noise * self.clip / n
        mean = list(self.current)
        for i, t in zip(self.floats, self.total):
            mean[i] = self.current[i] + t / n  # float64 until the noise is in
        out = add_noise(mean, std, var_entries)
        out = [o.astype(c.dtype) for o, c in zip(out, self.current)]
        return out, {"dp_clipped": sum(x > self.clip for x in self.norms),
                     "dp_update_norm": float(np.median(self.norms)), "dp_noise_std": std}


def private_mean(updates, current, clip, noise, var_entries=(), denominator=None):
    """Return the noised unweighted mean of the clipped client changes, and the round's clipping diagnostics.

    Args:
        updates (list[list[np.ndarray]]): each valid client's full arrays (the global model's entries and dtypes).
        current (list[np.ndarray]): the global arrays the clients were sent.
        clip (float): L2 norm each client's change over the float entries is clipped to.
        noise (float): noise multiplier; the mean gets Gaussian noise of std noise x clip / len(updates).
        var_entries (iterable[int]): BatchNorm running_var entries, clamped at 0 after the noise.
        denominator (float): what the sum is divided by (sampled rounds: the expected count); None: len(updates).

    Returns:
        (list[np.ndarray], dict): the new global arrays (integer entries: `current`'s) and
            {"dp_clipped": updates scaled down, "dp_update_norm": median change norm before clipping,
             "dp_noise_std": the noise's standard deviation}.
    """
    total = PrivateSum(current, clip)
    for u in updates:
        total.add(u)
    return total.result(noise, var_entries, denominator)


class ServerDP:
    """The server's side of DP in a run: the clip (moving under DP_ADAPTIVE), the noise, and each round's accounting.

    Args:
        cfg (dict): the run's settings (DP_CLIP, DP_NOISE, DP_DELTA, DP_ADAPTIVE, DP_QUANTILE).
        clients (int): clients per round (the adaptive count's noise grows with it).
        rows (list[dict]): a resumed run's metrics rows: an adaptive clip continues from the last round's.
        var_entries (list[int]): the BatchNorm running_var entries, clamped at 0 after the noise.
    """

    def __init__(self, cfg, clients, rows=(), var_entries=()):
        """Start the clip at DP_CLIP (adaptive, resumed: the last round's) and split the noise for adaptive clipping."""
        clips = [float(x["dp_clip"]) for x in rows if x.get("dp_clip")]
        self.cfg, self.var_entries = cfg, list(var_entries)
        self.clip = clips[-1] if cfg["DP_ADAPTIVE"] and clips else cfg["DP_CLIP"]
        self.count_std, self.noise = adaptive_noise(cfg["DP_NOISE"], clients) if cfg["DP_ADAPTIVE"] else \
            (0.0, cfg["DP_NOISE"])
        self.rate = min(cfg.get("FRACTION_FIT", 1.0), 1.0)  # each client's chance to be in a round
        self.denominator = per_round(cfg, clients) if self.rate < 1 else None  # sampled: the expected count

    def start(self, current):
        """Return an empty sum of the round's clipped changes to the global arrays `current`."""
        return PrivateSum(current, self.clip)

    def mean(self, total):
        """Return the noised unweighted mean of the clipped changes in `total` (a PrivateSum) and its diagnostics."""
        return total.result(self.noise, self.var_entries, self.denominator)

    def noised(self, mean, clients, clipped):
        """Return the secure mean of `clients` changes the clients clipped themselves (SecAgg+), noised, and its
        diagnostics; `clipped`: how many of them said they clipped."""
        std = self.noise * self.clip / clients
        return add_noise(mean, std, self.var_entries), {"dp_clipped": clipped, "dp_noise_std": std}

    def account(self, r, dp, counted):
        """Return round r's privacy columns (its diagnostics `dp`, the clip, the epsilon spent so far); under
        DP_ADAPTIVE move the clip for the next round from the noised count of the `counted` clients left unclipped."""
        out = {**dp, "dp_clip": self.clip, "dp_epsilon": epsilon(self.cfg["DP_NOISE"], r, self.cfg["DP_DELTA"],
                                                                   self.rate)}
        if self.cfg["DP_ADAPTIVE"]:
            self.clip = next_clip(self.clip, counted - dp["dp_clipped"], counted, self.count_std,
                                  self.cfg["DP_QUANTILE"])
        return out


def per_round(cfg, clients):
    """Return how many of `clients` a round expects: all of them, or FRACTION_FIT of them (Poisson-sampled)."""
    return clients * min(cfg.get("FRACTION_FIT", 1.0), 1.0)


def noise_std(cfg, clients):
    """Return the standard deviation of the DP noise on each entry of the mean change, with `clients` clients."""
    return cfg["DP_NOISE"] * cfg["DP_CLIP"] / max(per_round(cfg, clients), 1e-9)


def noise_cause(cfg, clients):
    """Return the DP noise as the likely cause of a diverged model, or None without DP."""
    if not cfg["DP_CLIP"]:
        return None
    return f"the DP noise (std {noise_std(cfg, clients):.3g} per weight each round); lower dp-clip or dp-noise"


def describe(cfg, weights, trainable, clients):
    """Log what differential privacy does in this run and what it spends; warn when its noise would swamp the model.

    The noise on every entry of the mean change has std DP_NOISE x DP_CLIP / clients; above the typical trainable
    weight (the median |w| of `weights`' `trainable` entries) one round's noise moves every weight by more than its
    size, and the model is destroyed within a round or two.
    """
    std = noise_std(cfg, clients)
    typical = float(np.median(np.abs(np.concatenate([w.ravel() for w, t in zip(weights, trainable) if t]))))
    if std > typical:
        log(WARNING, "dp-noise %g x dp-clip %g / %g clients gives noise of std %.3g on every weight each round, "
            "%.0fx the median trainable weight %.3g: it will destroy the model; a dp-clip of %.3g or less (noise a "
            "tenth of that weight), a smaller dp-noise or more clients make it usable (docs/privacy.md)",
            cfg["DP_NOISE"], cfg["DP_CLIP"], per_round(cfg, clients), std, std / typical, typical,
            0.1 * typical * per_round(cfg, clients) / cfg["DP_NOISE"])
    rate = min(cfg.get("FRACTION_FIT", 1.0), 1.0)
    log(INFO, "differential privacy: each client's change clipped to norm %g, noise std %g / clients%s; %d rounds "
        "spend epsilon %.3g at delta %g", cfg["DP_CLIP"], cfg["DP_NOISE"] * cfg["DP_CLIP"],
        f" (each round a Poisson sample of the clients at rate {rate:g})" if rate < 1 else "", cfg["NUM_ROUNDS"],
        epsilon(cfg["DP_NOISE"], cfg["NUM_ROUNDS"], cfg["DP_DELTA"], rate), cfg["DP_DELTA"])
    if cfg["DP_ADAPTIVE"]:
        log(INFO, "adaptive clipping: the clip starts at %g and follows the %g quantile of the clients' change "
            "norms (metrics.csv dp_clip)", cfg["DP_CLIP"], cfg["DP_QUANTILE"])

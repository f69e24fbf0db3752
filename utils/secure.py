"""Secure aggregation with Flower's SecAgg+: the server learns the weighted mean of the round's client changes only.

Flower's pieces do the protocol: `SecAggPlusWorkflow` on the server (run inside Flower's `DefaultWorkflow`) and
`secaggplus_mod` on every client. Each round, in four exchanges, the clients agree on pairwise masks, secret-share
their mask seeds with SECAGG_SHARES neighbours (themselves included), and upload their update quantized to
integers plus the masks; the masks cancel in the sum, so the server holds only the sum. A client that drops out
after sharing its secrets (a crash or a network loss while it trains) is rebuilt from SECAGG_THRESHOLD of its
neighbours' shares: its masks are removed and the round is the mean of the others. With fewer survivors the round
is skipped (the global model kept), like any round without enough valid updates.

What a client puts into the protocol (`encode`): its change, the trained weights minus the global weights it was
sent, as float32. BatchNorm running statistics go in divided by STAT_SCALE, because they move by tens per round
where weights move by hundredths and both share one clipping range; integer buffers (`num_batches_tracked`, unused
by YOLO) go in as 0 and keep the global value. Flower's mod then multiplies each client's arrays by its weight
n / max_weight (n: its train images; max_weight: the largest client's image count where the server knows them, in
simulation, else Flower's 1000), clips every entry to +-SECAGG_CLIP and rounds it stochastically to one of
SECAGG_QUANT levels (an unbiased error below 2 x SECAGG_CLIP / SECAGG_QUANT per entry: 4e-6 for weights with the
defaults, 2.4e-4 for BatchNorm statistics). The server (`decode`) adds the mean change back to its float32 global
model. A client counts the entries its own clipping cut and reports the count (`secagg_clipped`).

What needs each client's own update is refused with SECAGG (`check_secagg`): median, trimmed mean and Krum,
POOLED_BN_VAR when asked for by name (it needs each client's BatchNorm means; its default turns it off under SecAgg+,
utils/start.py), FP16 (SecAgg+ sends its own integers). DP_CLIP moves the clipping to
the clients (Flower's client-side fixed clipping): each clips its own change and reports weight 1, so the secure sum
is the unweighted mean of clipped changes, and the server adds the noise to it as it does without SecAgg+. Checks
move to the client: it withholds NaN/Inf weights itself; the server checks the sum (shapes, finite values). The
image-count clamp of simulation cannot apply (the weights are inside the masked vectors).
"""

from logging import INFO, WARNING

import numpy as np
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat import start_grid
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from utils.console import log
from utils.params import change_since, entry_mismatch
from utils.strategies import ROBUST

STAT_SCALE = 64.0  # BatchNorm running statistics enter the protocol divided by this, and leave multiplied by it
FLOWER_MAX_WEIGHT = 1000.0  # Flower's default max_weight, used when the server does not know the clients' sizes
MOD_RANGE = 2**32  # Flower's modulus: the masked sums wrap around at this; its largest allowed value


def check_secagg(cfg, clients):
    """Return None if the SECAGG settings make sense for `clients` clients per round, else one sentence."""
    if not cfg["SECAGG"]:
        return None
    shares, threshold = cfg["SECAGG_SHARES"], cfg["SECAGG_THRESHOLD"]
    if shares < 3 or not 2 <= threshold < shares:
        return (f"secagg-shares ({shares}) must be 3 or more and secagg-threshold ({threshold}) at least 2 and "
                "below it (Flower's SecAgg+)")
    if cfg["SECAGG_CLIP"] <= 0 or cfg["SECAGG_QUANT"] < 2:
        return f"secagg-clip ({cfg['SECAGG_CLIP']}) must be positive and secagg-quant ({cfg['SECAGG_QUANT']}) 2 or more"
    if clients and clients < 2:
        return "secagg needs at least 2 clients per round (with one, the sum is its update)"
    if clients and clients * cfg["SECAGG_QUANT"] >= MOD_RANGE:
        return (f"secagg-quant ({cfg['SECAGG_QUANT']}) x {clients} clients must stay below 2**32, or the masked sum "
                "overflows")
    for bad, why in ((cfg["STRATEGY"] in ROBUST, f"strategy {cfg['STRATEGY']} needs "
                      "every client's update; use fedavg, fedprox, fedavgm, fedadam or fedyogi"),
                     (cfg["POOLED_BN_VAR"], "pooled-bn-var needs each client's BatchNorm means"),
                     (cfg["FP16"] != "off", "fp16 has nothing to do: SecAgg+ sends its own quantized integers")):
        if bad:
            return f"secagg cannot be used with {why}"
    return None


def max_weight(train_images, unweighted=False):
    """Return SecAgg+'s max_weight: 1 when every client reports weight 1 (DP: an unweighted mean), else the largest
    known client image count, else Flower's default."""
    if unweighted:
        return 1.0
    return float(max(train_images.values(), default=0) or FLOWER_MAX_WEIGHT)


def encode(trained, received, trainable):
    """Return what a client puts into SecAgg+: its change as float32, statistics scaled down, integers as 0."""
    return [np.zeros(t.shape, np.float32) if c is None else c if train else c / np.float32(STAT_SCALE)
            for t, c, train in zip(trained, change_since(trained, received), trainable)]


def clipped_entries(encoded, n, weight, clip):
    """Return how many entries of a client's encoded change SecAgg+ clips at +-clip (after its weight n / weight)."""
    ratio = n / weight
    return int(sum(np.count_nonzero(np.abs(a) * ratio > clip) for a in encoded))


def decode(mean, current, trainable):
    """Return the new global arrays: `current` plus the securely averaged change (integers keep `current`)."""
    out = []
    for m, c, train in zip(mean, current, trainable):
        if c.dtype.kind != "f":
            out.append(c)
            continue
        change = np.asarray(m, np.float64) * (1.0 if train else STAT_SCALE)
        out.append((c.astype(np.float64) + change).astype(c.dtype))
    return out


def secure_updates(r, results, current, run, cfg, dp, reasons, aggregator, size):
    """Add round r's one update, the secure mean (`secure_mean`), to `aggregator`; return [(image count, metrics,
    `size`: each one's upload in bytes)] per client that took part (each one's count and metrics still count; [] if
    the sum was refused) and the mean's DP diagnostics."""
    new, diagnostics = secure_mean(r, results, current, run, cfg, dp, reasons)
    if new is None:
        return [], {}
    aggregator.add(new, 1)
    return [(res.num_examples, {k: v for k, v in res.metrics.items() if k != "dataset"}, size)
            for _, res in results], diagnostics


def secure_mean(r, results, current, run, cfg, dp, reasons):
    """Return (round r's securely averaged arrays, noised under DP, or None; the DP diagnostics of the mean).

    Flower's workflow hands every client's result with the same parameters, the weighted mean of the encoded changes
    (`encode`); the server checks its shapes and values (a misfit is added to `reasons`, and None returned), adds it
    to the `current` global arrays (`decode`) and, with DP (`dp`, a privacy.ServerDP: the clients clipped their own
    changes and weigh 1 each), noises the mean as it does without SecAgg+. A client that says SecAgg+ clipped some of
    its entries at +-SECAGG_CLIP (`secagg_clipped`) is named in a warning. `run`: the run's `trainable` entries and
    dataset `labels` (federated.prepare); `cfg`: its settings.
    """
    if not results:
        return None, {}
    mean = parameters_to_ndarrays(results[0][1].parameters)
    problem = entry_mismatch(mean, [(c.shape, "f") for c in current]) if len(mean) == len(current) \
        else f"it holds {len(mean)} arrays, the global model has {len(current)}"
    problem = problem or next((f"entry {i} holds NaN or Inf values" for i, a in enumerate(mean)
                               if not np.isfinite(a).all()), None)
    if problem:
        reasons.append(f"the secure sum was rejected: {problem}")
        log(WARNING, "round %d: the secure sum of %d clients was rejected: %s", r, len(results), problem)
        return None, {}
    for proxy, res in results:
        if res.metrics.get("secagg_clipped"):
            log(WARNING, "round %d: client %s clipped %d entries of its change at +-%g before secure aggregation; "
                "raise secagg-clip", r, run["labels"].get(res.metrics.get("dataset"), proxy.cid),
                res.metrics["secagg_clipped"], cfg["SECAGG_CLIP"])
    new = decode(mean, current, run["trainable"])
    if not dp:
        return new, {}
    return dp.noised(new, len(results), sum(int(res.metrics.get("dp_clipped", 0)) for _, res in results))


def describe(cfg):
    """Log what secure aggregation does in this run."""
    log(INFO, "secure aggregation (SecAgg+): the server sees only the sum of each round's changes; each client's "
        "secrets shared with %d clients, %d rebuild a dropped one", cfg["SECAGG_SHARES"], cfg["SECAGG_THRESHOLD"])


def masked_bytes(current):
    """Return the bytes of one client's masked vector: Flower sends it as int64 arrays plus the weight factor."""
    return sum(len(ndarray_to_bytes(np.zeros(c.shape, np.int64))) for c in current) + len(
        ndarray_to_bytes(np.zeros(1, np.int64)))


def when_asked(msg, context, call_next):
    """Client mod: run Flower's `secaggplus_mod` on the messages of a SecAgg+ round, pass every other one through.

    One ClientApp then serves runs with and without SECAGG (the server decides; a SuperNode needs no setting).
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def workflow(cfg, weight, aggregate_fit):
    """Return Flower's DefaultWorkflow with SecAgg+ as its fit step.

    A round the protocol gave up on (too few clients left to rebuild the masks), which Flower's workflow never hands
    to the strategy, is closed as a round without updates: `aggregate_fit(round, [], failures)`, the strategy's own,
    with the clients' errors and why.
    """
    class Workflow(SecAggPlusWorkflow):
        def __call__(self, grid, context):
            self.aggregated, self.failures = False, []
            super().__call__(grid, context)
            if not self.aggregated:
                r = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
                why = RuntimeError("secure aggregation halted: too few clients left to rebuild the masks "
                                   f"(secagg-threshold {cfg['SECAGG_THRESHOLD']})")
                aggregate_fit(r, [], [*self.failures, why])

        def collect_masked_vectors_stage(self, grid, context, state):
            going = super().collect_masked_vectors_stage(grid, context, state)
            self.failures = list(state.failures)
            return going

        def unmask_stage(self, grid, context, state):
            self.aggregated = super().unmask_stage(grid, context, state)
            return self.aggregated

    fit = Workflow(cfg["SECAGG_SHARES"], cfg["SECAGG_THRESHOLD"], max_weight=weight,
                   clipping_range=cfg["SECAGG_CLIP"], quantization_range=cfg["SECAGG_QUANT"], modulus_range=MOD_RANGE,
                   timeout=cfg.get("ROUND_TIMEOUT") or None)  # each of the protocol's stages waits this long at most
    return DefaultWorkflow(fit_workflow=fit)


def serve(grid, context, cfg, strategy):
    """Run the rounds: Flower's own round loop, or with SECAGG its SecAgg+ workflow (`workflow`); with
    ROUND_TIMEOUT each message's time-to-live is the deadline (utils/nodes.py)."""
    rounds = ServerConfig(num_rounds=cfg["NUM_ROUNDS"] - strategy.run["offset"], round_timeout=cfg["ROUND_TIMEOUT"]
                          or None)
    if not cfg["SECAGG"]:
        start_grid(grid=grid, strategy=strategy, config=rounds)
        return
    legacy = LegacyContext(context=context, config=rounds, strategy=strategy)
    workflow(cfg, strategy.secagg_weight, strategy.aggregate_fit)(grid, legacy)  # a halted round: no updates

"""Server-side checks and the weighted average of client updates, one line for each client failure, and the proxy
that hands each reply to the strategy as it arrives."""

import re
import threading
import time
from logging import WARNING

import numpy as np
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Status
from flwr.server.client_proxy import ClientProxy

from utils.console import log
from utils.datasets import client_name
from utils.params import decode_update, entry_mismatch, parameters_to_arrays
from utils.share import expand

MOMENTS = ("momentum", "momentum_sq")  # AVG_MOMENTUM's (and AVG_SECOND_MOMENT's) entries beside a reply's weights


def check_update(arrays, reference, num_examples, metrics=None):
    """Return None if a client update fits the global model, else one sentence saying what is wrong with it."""
    if not isinstance(num_examples, int) or num_examples <= 0:
        return f"it reported {num_examples!r} train images (must be a positive integer)"
    for k, v in (metrics or {}).items():
        if isinstance(v, float) and not np.isfinite(v):
            return f"its {k} is {v}"
    if len(arrays) != len(reference):
        return f"it sent {len(arrays)} arrays, the global model has {len(reference)}"
    problem = entry_mismatch(arrays, [(r.shape, r.dtype.kind) for r in reference])
    if problem:
        return problem
    bad = next((i for i, a in enumerate(arrays) if a.dtype.kind == "f" and not np.isfinite(a).all()), None)
    return None if bad is None else f"entry {bad} holds NaN or Inf values"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error):
    """Return the first non-empty line of an error's text (its type name if it has none), at most 300 characters."""
    lines = [ln.strip() for ln in ANSI.sub("", str(error)).splitlines() if ln.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def failure_reason(failure):
    """Return one line saying why a client's reply failed: the client's own first error line where it is found.

    Flower hands the strategy either (proxy, result with an error status) or an exception whose text wraps the
    client's traceback (Ray's, in simulation) or an error reply (SecAgg+'s workflow); the client's message follows
    "Message: " or ":<'" there.
    """
    if isinstance(failure, tuple):
        proxy, res = failure
        return f"client {proxy.cid}: {res.status.code.name} {res.status.message}".strip()
    error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
    text = ANSI.sub("", getattr(error, "reason", None) or str(failure))  # an error reply: Flower's Error(code, reason)
    for mark in ("Message: ", ":<'"):
        if mark in text:
            message = text.rsplit(mark, 1)[1].split("'>)")[0]
            return first_line(message[:-2] if message.endswith("'>") else message)
    errors = re.findall(r"^\s*(?:\w+\.)*\w*(?:Error|Exception): .+$", text, re.M)
    return first_line(errors[-1] if errors else text)


class WeightedMean:
    """Running FedAvg: add client updates one at a time, so the server holds one float64 sum, not every update.

    Every entry is averaged, BatchNorm running statistics included (each client's statistics weighted by its
    images); integer buffers (BatchNorm `num_batches_tracked`, unused by YOLO's momentum BatchNorm) get the
    rounded weighted mean in their own integer dtype and shape.
    """

    def __init__(self):
        """Start with nothing added."""
        self.sum, self.total = None, 0

    def add(self, arrays, n):
        """Add one client's arrays with weight n (its train images)."""
        if self.sum is None:
            self.sum = [np.zeros(a.shape, np.float64) for a in arrays]  # arrays, 0-d included, so += is in place
        for s, a in zip(self.sum, arrays):
            s += a.astype(np.float64) * n
        self.total += n

    def result(self, reference):
        """Return the weighted mean in the dtypes of `reference` (the current global arrays)."""
        out = []
        for s, ref in zip(self.sum, reference):
            mean = s / self.total
            out.append(np.rint(mean).astype(ref.dtype) if ref.dtype.kind in "iub" else mean.astype(ref.dtype))
        return out


def weighted_average(updates, reference):
    """Average client updates weighted by their train images (FedAvg), keeping the global model's dtypes.

    Args:
        updates (list[tuple[list[np.ndarray], int]]): each client's arrays and train image count.
        reference (list[np.ndarray]): the current global arrays (dtypes and shapes to keep).

    Returns:
        (list[np.ndarray]): the new global arrays.
    """
    mean = WeightedMean()
    for arrays, n in updates:
        mean.add(arrays, n)
    return mean.result(reference)


def train_metrics(valid):
    """Return the train metrics every valid update of a round reports (`valid`: (images, metrics, bytes) each),
    averaged weighted by its train images."""
    keys = sorted(set.intersection(*(set(m) for _, m, _ in valid)))
    total = sum(n for n, _, _ in valid)
    return {k: sum(float(m[k]) * n for n, m, _ in valid) / total for k in keys}


def weighted_metrics(results, order, metric, labels):
    """Return the clients' validation metrics averaged weighted by their val images, and the score per client.

    Args:
        results (list[tuple[ClientProxy, EvaluateRes]]): the round's evaluation replies.
        order (list[str]): the task's own metrics, listed first in this order (precision, recall, map50, ...).
        metric (str): the run's score; each client's goes into `<metric>_<client>`.
        labels (dict[str, str]): the server's name of each dataset (a client reports its dataset), else the
            client's own name is used.

    Returns:
        (dict[str, float]): empty when no image was validated. A metric only some clients report (mixed tasks) is
            averaged over those.
    """
    if not sum(res.num_examples for _, res in results):
        return {}
    out, keys = {}, {k for _, res in results for k in res.metrics if k not in ("client", "dataset")}
    for k in sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k)):
        have = [(float(res.metrics[k]), res.num_examples) for _, res in results if k in res.metrics]
        out[k] = sum(v * n for v, n in have) / sum(n for _, n in have)
    for key in (metric, "personal_score"):  # PERSONALIZE: each client's fine-tuned model too
        per_client = {labels.get(res.metrics.get("dataset"), res.metrics.get("client", "client")):
                      float(res.metrics[key]) for _, res in results if key in res.metrics}
        out.update({f"{key}_{k}": v for k, v in sorted(per_client.items())})
    return out


def server_step(current, average, trainable, lr=1.0):
    """Return the new global arrays: trainable weights move `lr` x (average - current); buffers take the average.

    With lr = 1 this is plain FedAvg. BatchNorm statistics and integer buffers are never extrapolated (extrapolated,
    they took a YOLO federation to 0 mAP).
    """
    if lr == 1.0:
        return average
    return [(c + lr * (a - c)).astype(c.dtype) if t else a for c, a, t in zip(current, average, trainable)]


class Arriving(ClientProxy):
    """A client's proxy whose fit reply goes to the strategy the moment it arrives (`arrive(proxy, reply)`), so the
    server adds it to the round's running sum and holds its weights no longer than that; Flower's round loop gets
    the reply without them."""

    def __init__(self, proxy, arrive):
        """Wrap Flower's proxy of one client."""
        super().__init__(proxy.cid)
        self.proxy, self.arrive = proxy, arrive

    def fit(self, ins, timeout, group_id):
        """Send the instruction; hand the reply to the strategy; return it without its weights."""
        return self.arrive(self.proxy, self.proxy.fit(ins, timeout, group_id))

    def get_properties(self, ins, timeout, group_id):
        return self.proxy.get_properties(ins, timeout, group_id)

    def get_parameters(self, ins, timeout, group_id):
        return self.proxy.get_parameters(ins, timeout, group_id)

    def evaluate(self, ins, timeout, group_id):
        return self.proxy.evaluate(ins, timeout, group_id)

    def reconnect(self, ins, timeout, group_id):
        return self.proxy.reconnect(ins, timeout, group_id)


def arrived(res):
    """Return a fit reply without its weights, marked as already aggregated."""
    out = FitRes(res.status, Parameters(tensors=[], tensor_type=""), res.num_examples, res.metrics)
    out.arrived = True
    return out


class RoundUpdates:
    """One round's client updates, taken one at a time as they arrive (threads: Flower's round loop asks the
    clients at once): each is checked, decoded (FP16), expanded to every global entry (SHARE), its image count capped
    at its dataset's known size, and added to the round's aggregate (`aggregator`, or with DP `private`, the sum of
    clipped changes); `valid` keeps each valid one's (images, metrics, bytes), `reasons` why others were not.

    Args:
        r (int): the run's round. current (list): the global arrays. sent (list): the arrays the clients were sent
            (under SHARE the shared entries), which an update must fit. shared (list | None): SHARE's entries.
        fp16 (str): FP16. run (dict): the run's state (`train_images`, `labels`). aggregator: utils.strategies.
            Aggregator, begun. private (utils.privacy.PrivateSum | None): with DP, the round's clipped sum.
    """

    def __init__(self, r, current, sent, shared, fp16, run, aggregator, private=None):
        """Start the round with no update."""
        self.r, self.current, self.sent, self.shared, self.fp16, self.run = r, current, sent, shared, fp16, run
        self.aggregator, self.private, self.valid, self.reasons = aggregator, private, [], []
        self.evaluations = []  # EVAL_IN_FIT: (proxy, EvaluateRes) of the last round's model, one per valid update
        self.lock, self.t_open = threading.Lock(), time.time()

    def take(self, results):
        """Add the replies of Flower's [(proxy, FitRes)] that did not arrive through `arrive` already."""
        for proxy, res in results:
            if not getattr(res, "arrived", False):
                self.arrive(proxy, res)

    def arrive(self, proxy, res):
        """Check one client's reply and add it to the aggregate; return it without its weights (`arrived`), which the
        server then holds no more. A rejected update is logged and its reason kept for the round line."""
        with self.lock:
            arrays = parameters_to_arrays(res.parameters)  # as parameters_to_ndarrays, each header parsed once
            problem = check_update(arrays, self.sent, res.num_examples, res.metrics) or \
                self.aggregator.check(res.metrics)
            if problem:
                name = self.run.get("labels", {}).get(res.metrics.get("dataset"), proxy.cid)
                self.reasons.append(f"{client_name(name)}: update rejected: {problem}")
                log(WARNING, "round %d: update of client %s rejected: %s", self.r, name, problem)
                return arrived(res)
            if self.fp16 in ("up", "both"):  # the change is added to the float32 global model, not to the float16
                arrays = decode_update(arrays, self.sent)  # copy sent: rounding never accumulates
            if self.shared is not None:  # the entries it keeps count as the global ones (restored by the strategy)
                arrays = expand(arrays, self.shared, self.current)
            n, known = res.num_examples, self.run["train_images"].get(res.metrics.get("dataset"))
            if known is not None and n > known:  # simulation: the server knows every dataset's size
                log(WARNING, "round %d: client %s reported %d train images, its dataset has %d; counted as %d",
                    self.r, proxy.cid, n, known, known)
                n = known
            moments = [res.metrics.get(k) for k in MOMENTS]  # AVG_MOMENTUM: sent beside the weights
            if self.private:
                self.private.add(arrays)
            else:
                self.aggregator.add(arrays, n, res.metrics.get("steps"), *moments)
            metrics = {k: v for k, v in res.metrics.items() if k not in ("dataset", *MOMENTS)}
            scores = {k[5:]: metrics.pop(k) for k in list(metrics) if k.startswith("eval_")}
            if scores:  # EVAL_IN_FIT: its scores of the model it was sent, as an evaluate reply would carry them
                self.evaluations.append((proxy, EvaluateRes(Status(Code.OK, ""), 0.0, int(scores.pop("images")),
                                                            {**scores, "dataset": res.metrics.get("dataset")})))
            self.valid.append((n, metrics, sum(len(t) for t in res.parameters.tensors) +
                               sum(len(m) for m in moments if isinstance(m, bytes))))
            return arrived(res)


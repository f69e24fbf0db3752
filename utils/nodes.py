"""The federation's nodes as the server sees them: who is connected, what each one holds, which of them train and
validate each round, and who was late.

Every node answers one question before it first takes part (Flower's `get_properties`): in a simulation its
partition id (the server knows the datasets), on a SuperNode its dataset's label, classes and train images. The
server names clients by it, samples by it (sorted by this key, never by Flower's node ids, which change from one
process to the next, so a resumed run samples as the uninterrupted one would), and a deployment learns the
federation's classes from it before round 1 (`discover`).

Sampling (FRACTION_FIT, FRACTION_EVALUATE): round r draws from a generator seeded with (SEED, r, stage), so the
sample depends on nothing but the run's settings and the clients present. Without DP a fixed-size sample:
ceil(fraction x clients), at least MIN_UPDATES (a round needs that many updates). With DP_CLIP each client takes
part independently with probability FRACTION_FIT (Poisson sampling), which is what the privacy accountant's
sampled Gaussian assumes (utils/privacy.py).

Round deadline (ROUND_TIMEOUT): Flower's round loop sends each message with the deadline as its time-to-live; the
SuperLink (and the simulation engine, which runs the same link state in-process) answers a message whose TTL ran
out with an error reply ("Message Unavailable ... expired due to its TTL"), which Flower's round loop counts as a
failure, so the round closes at its deadline. A late reply is refused by the link state (the message it answers is
gone), and each round waits only for the ids of its own messages: a late client's work is never aggregated into a
later round. `late` tells these expired replies from real failures and names the clients that were late. One
difference between the engines: a SuperLink drops a message whose deadline passed before a SuperNode pulls it,
while the simulation engine queues each node's messages in-process and runs them even after their deadline, so a
slow client's backlog would make every client late in the rounds that follow, and a SuperNode that stalled
mid-round restarts that round's ClientApp when it wakes; the client mod `on_time` answers such a message at once,
and stops a client's training at its deadline.
"""

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from logging import INFO, WARNING

import numpy as np
from flwr.common import Error, GetPropertiesIns, Message
from flwr.common.constant import ErrorCode
from flwr.server.compat.grid_client_proxy import GridClientProxy  # the legacy proxy, over the Message API

from utils.aggregate import failure_reason
from utils.classes import federation_names
from utils.console import log
from utils.datasets import check_dataset_cached, client_label, client_name
from utils.model import model_task, read_base_cached

CONNECT_WAIT = 600.0  # seconds a deployment waits for its SuperNodes to connect before it gives up
SETTLE = 5.0  # seconds without a new SuperNode after which a deployment without min-clients starts
EXPIRED = ("expired due to its TTL", "has expired")  # Flower's error replies for a message past its deadline


def wait_for_nodes(client_manager, n, timeout=CONNECT_WAIT, poll=0.1):
    """Return True once `n` nodes are connected, False after `timeout` seconds.

    Flower's compat round loop adds the grid's new nodes to the client manager from a thread that looks every 5 s,
    or when the manager is asked how many it has; its `wait_for` only waits for that thread, which kept every
    simulation's first round idle for up to 5 s with all its nodes already there. Asking every `poll` seconds
    registers them at once.
    """
    end = time.time() + timeout
    while client_manager.num_available() < n:
        if time.time() >= end:
            return False
        time.sleep(poll)
    return True


def ask(proxies, timeout=None):
    """Return {cid: properties} of the nodes behind `proxies` (Flower ClientProxy objects), asked at once; a node
    that fails to answer maps to {"error": why}."""
    def one(proxy):
        try:
            return dict(proxy.get_properties(GetPropertiesIns(config={}), timeout=timeout, group_id=0).properties)
        except Exception as e:  # a node with no dataset, or one that went away: named, not fatal here
            return {"error": failure_reason(e)}
    proxies = list(proxies)
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(proxies)))) as pool:
        return {p.cid: out for p, out in zip(proxies, pool.map(one, proxies))}


def sample(keys, fraction, minimum, seed, r, stage, poisson=False):
    """Return the sorted keys that take part in round r's `stage` ("fit" or "evaluate"): all of them at fraction 1,
    else a seeded sample (see the module's docstring); the same keys, settings and round give the same sample."""
    keys = sorted(keys)
    if fraction >= 1 or not keys:
        return keys
    rng = np.random.default_rng([int(seed), int(r), ("fit", "evaluate").index(stage)])
    if poisson:
        return [k for k, u in zip(keys, rng.random(len(keys))) if u < fraction]
    k = min(len(keys), max(math.ceil(round(fraction * len(keys), 9)), minimum, 1))  # 0.05 x 1000 is 50
    return [keys[i] for i in sorted(rng.choice(len(keys), size=k, replace=False))]


class Nodes:
    """The strategy's view of the connected nodes: each one's key (its dataset) and name, learned once per node.

    Args:
        datasets (list[str]): a simulation's datasets (partition id -> dataset); empty in a deployment.
        labels (dict): dataset -> the name metrics.csv and the log use for it.
        known (dict): cid -> label of the nodes `discover` already asked (a deployment).
        timeout (float): seconds a node has to answer (ROUND_TIMEOUT); None: no limit.
    """

    def __init__(self, datasets, labels, known=None, timeout=None):
        """Start knowing the nodes in `known`."""
        self.datasets, self.labels, self.timeout = datasets, labels, timeout
        self.key, self.name = dict(known or {}), {cid: client_name(label) for cid, label in (known or {}).items()}

    def meet(self, client_manager):
        """Ask every connected node not yet known who it is, once per node (a node that joins later is asked when
        it first appears); return the nodes known by now (one that did not answer is asked again next time)."""
        nodes = client_manager.all()
        for cid, props in ask([p for cid, p in nodes.items() if cid not in self.key], self.timeout).items():
            if "error" in props:
                log(WARNING, "node %s did not say who it is (%s); it is asked again next round", cid, props["error"])
                continue
            if "partition-id" in props and int(props["partition-id"]) < len(self.datasets):
                key = self.datasets[int(props["partition-id"])]
                label = self.labels.get(key, key)
            else:
                key = label = props.get("label") or f"node {cid}"
            self.key[cid], self.name[cid] = key, client_name(label)
        return {cid: p for cid, p in nodes.items() if cid in self.key}

    def choose(self, client_manager, fraction, minimum, seed, r, stage, poisson=False):
        """Return the proxies of the nodes that take part in round r's `stage` (see `sample`)."""
        nodes = self.meet(client_manager)
        chosen = set(sample({self.key[c] for c in nodes}, fraction, minimum, seed, r, stage, poisson))
        return [nodes[c] for c in sorted(nodes) if self.key[c] in chosen]  # a restarted node's new id: both asked

    def missed(self, r, stage, sent, results, failures):
        """Log the clients of round r's `stage` ("fit", "evaluate") that failed, and those late to validate (a fit's
        late clients are in its round line); return (the late clients' names, the failures' reasons, each once)."""
        late, failures = self.late(sent, results, failures)
        if late and stage == "evaluate":
            log(WARNING, "round %d: %d late to validate: %s", r, len(late), ", ".join(late))
        reasons = sorted({failure_reason(f) for f in failures})  # SecAgg+'s workflow lists a failed reply twice
        for reason in reasons:
            log(WARNING, "round %d: a client failed%s: %s", r, " to evaluate" if stage == "evaluate" else "", reason)
        return late, reasons

    def late(self, sent, results, failures):
        """Split a round's failures into (the names of the clients that missed its deadline, the other failures).

        Args:
            sent (list[str]): the cids the round's messages went to. results: Flower's [(proxy, result)].
            failures (list): Flower's failures (exceptions or (proxy, result) pairs).
        """
        reasons = [failure_reason(f) for f in failures]
        is_late = [any(m in why for m in EXPIRED) for why in reasons]
        if not any(is_late):
            return [], failures
        others = [f for f, late in zip(failures, is_late) if not late]
        answered = {proxy.cid for proxy, _ in results} | {f[0].cid for f in others if isinstance(f, tuple)}
        named = {why.split(":")[0] for why, late in zip(reasons, is_late) if not late}  # its own error names it
        missing = [c for c in sent if c not in answered and self.name.get(c) not in named]
        names = sorted(self.name.get(c, f"node {c}") for c in missing)
        expired = sum(is_late)
        return (names if len(names) == expired else names or [f"{expired} client(s)"]), others


def node_properties(dataset, partition_id, base_model, config):
    """Return what a node tells the server about itself: in a simulation its partition id; on a SuperNode its
    dataset's label, classes and train images, checked as the run's task (config `task`) or its own base model's."""
    if dataset is None:
        return {} if partition_id is None else {"partition-id": int(partition_id)}
    task = model_task(read_base_cached(base_model)[0]).name if base_model else config.get("task", "detect")
    check = check_dataset_cached(dataset, task)
    return {"label": client_label(dataset), "names": json.dumps(list(check["names"])),
            "train_images": int(check["train_images"])}


def discover(grid, cfg, task):
    """Deployment: wait for the SuperNodes, ask each one its dataset's classes, and return the federation's class
    names (the union, built as a simulation builds it from the SuperNodes in the order of their labels), the number
    of SuperNodes and {cid: label} of those that answered; ValueError with one sentence
    when none connects, fewer than MIN_CLIENTS connect in CONNECT_WAIT seconds, or NAMES lacks a node's classes.
    """
    want, start, seen, since = cfg["MIN_CLIENTS"], time.time(), set(), time.time()
    log(INFO, "waiting for %s SuperNode(s) to connect", want or "the")
    while True:
        nodes = set(grid.get_node_ids())
        if nodes != seen:
            seen, since = nodes, time.time()
        if (want and len(seen) >= want) or (not want and seen and time.time() - since >= SETTLE):
            break
        if time.time() - start > CONNECT_WAIT:
            raise ValueError(f"{len(seen)} SuperNode(s) connected in {CONNECT_WAIT:.0f} s, min-clients is {want}"
                             if want else f"no SuperNode connected in {CONNECT_WAIT:.0f} s")
        time.sleep(1.0)
    proxies = [GridClientProxy(node, grid, grid.run.run_id) for node in sorted(seen)]
    answers = ask([_Asking(p, task) for p in proxies])
    checks, files = [], []
    for cid, props in sorted(answers.items(), key=lambda kv: kv[1].get("label", "")):
        if "error" in props or "names" not in props:
            log(WARNING, "SuperNode %s could not say what it holds: %s", cid, props.get("error", "no dataset"))
            continue
        checks.append({"names": json.loads(props["names"])})
        files.append(props["label"])
        log(INFO, "SuperNode %s: %s, %s train images, classes %s", cid, props["label"], props["train_images"],
            ", ".join(checks[-1]["names"]))
    if not checks:
        raise ValueError(f"none of the {len(seen)} SuperNode(s) could say what its dataset holds (see above)")
    names = federation_names(checks, files, cfg["NAMES"])  # ValueError when NAMES lacks a node's classes
    log(INFO, "the federation's classes (%d): %s", len(names), ", ".join(names))
    return names, want or len(seen), {cid: p["label"] for cid, p in answers.items() if "label" in p}


class _Asking:
    """A proxy whose get_properties sends the run's task, so that a SuperNode checks its dataset as that task."""

    def __init__(self, proxy, task):
        self.proxy, self.cid, self.task = proxy, proxy.cid, task

    def get_properties(self, ins, timeout=None, group_id=None):
        return self.proxy.get_properties(GetPropertiesIns(config={"task": self.task}), timeout, group_id)


def on_time(msg, context, call_next):
    """Client mod: a message whose round deadline (its `created_at` + TTL) has passed is answered with an error at
    once, its work not done; one still in time carries its deadline into the client's config (`deadline`, seconds
    since the epoch), and training stops there (`stop_at`). The simulation engine runs expired messages; a SuperNode
    that stalled restarts the ClientApp of the message it held when it wakes, long after the round closed. Like
    Flower itself, which stamps a reply with the SuperNode's clock and has the SuperLink refuse one stamped past its
    message's deadline, this takes the SuperNode's clock to agree with the server's (NTP)."""
    meta = msg.metadata
    if not meta.ttl:
        return call_next(msg, context)
    deadline = meta.created_at + meta.ttl
    if time.time() >= deadline:
        clock = "" if "partition-id" in context.node_config else " (or this machine's clock is ahead of the server's)"
        return Message(Error(code=ErrorCode.UNKNOWN, reason=f"its round's deadline passed before it started{clock};"
                             " not done"), reply_to=msg)
    for key in ("fitins.config", "evaluateins.config"):
        if key in msg.content.config_records:
            msg.content.config_records[key]["deadline"] = float(deadline)
    return call_next(msg, context)


def stop_at(deadline):
    """Return Ultralytics callbacks that end training once `deadline` (seconds since the epoch) has passed: the
    server has closed the round and will not take this update."""
    def check(trainer):
        if time.time() > deadline:
            raise TimeoutError("its round's deadline passed while it trained; the update is dropped")
    return {"on_train_batch_end": check}


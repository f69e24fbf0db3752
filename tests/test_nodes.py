"""Large and uneven federations (utils/nodes.py): seeded client sampling, the round deadline's late clients, and the
privacy accounting of sampled rounds. tests/test_simulation.py and tests/test_deployment.py run the deadline and the
SuperNodes' class names through Flower's engines."""

import csv
import time

import pytest

from tests.conftest import FED, run_in_process
from utils.nodes import Nodes, sample, wait_for_nodes
from utils.privacy import ServerDP, epsilon


def test_a_sample_depends_only_on_the_seed_the_round_and_the_clients():
    keys = [f"site{i:03d}" for i in range(1000)]
    first = sample(keys, 0.05, 1, 0, 7, "fit")
    assert len(first) == 50 and first == sorted(first) and len(set(first)) == 50
    assert sample(list(reversed(keys)), 0.05, 1, 0, 7, "fit") == first  # node order (ids) plays no part
    assert sample(keys, 0.05, 1, 0, 8, "fit") != first  # another round, another sample
    assert sample(keys, 0.05, 1, 1, 7, "fit") != first  # another seed
    assert sample(keys, 0.05, 1, 0, 7, "evaluate") != first  # evaluation draws its own
    assert sample(keys, 0.001, 3, 0, 7, "fit") == sample(keys, 0.001, 3, 0, 7, "fit") and \
        len(sample(keys, 0.001, 3, 0, 7, "fit")) == 3  # at least MIN_UPDATES
    assert sample(keys, 1.0, 1, 0, 7, "fit") == keys
    rounds = [len(sample(keys, 0.05, 1, 0, r, "fit", poisson=True)) for r in range(1, 41)]
    assert len(set(rounds)) > 1 and 40 < sum(rounds) / len(rounds) < 60  # DP: each client in with probability 0.05


class _Proxy:
    def __init__(self, cid):
        self.cid = cid


class _Registering:
    """A client manager as Flower's compat loop wraps it: asking how many nodes it has registers the grid's new ones
    (here: one more on each question after the first two)."""

    def __init__(self, asks_until_all, n):
        self.asks, self.until, self.n = 0, asks_until_all, n

    def num_available(self):
        self.asks += 1
        return self.n if self.asks >= self.until else 0


def test_the_first_round_starts_as_soon_as_the_nodes_are_there_not_at_flowers_next_5_s_look():
    manager = _Registering(3, 8)
    t = time.time()
    assert wait_for_nodes(manager, 8, timeout=30, poll=0.01) and manager.asks == 3 and time.time() - t < 1
    t = time.time()
    assert not wait_for_nodes(_Registering(10**9, 8), 8, timeout=0.2, poll=0.01) and 0.2 <= time.time() - t < 1


def test_late_clients_are_told_apart_from_failed_ones_and_named():
    nodes = Nodes([], {})
    nodes.name = {"1": "client fast", "2": "client slow", "3": "client broken"}
    expired = ValueError("Message contains an Error (reason: Error: Message Unavailable - The requested message could "
                         "not be found in the database. It may have expired due to its TTL, been deleted because the "
                         "destination SuperNode was removed from the federation, or never existed.). It originated "
                         "during client-side execution of a message.")
    broken = RuntimeError("client broken: dataset /x/data.yaml not found")
    late, others = nodes.late(["1", "2", "3"], [(_Proxy("1"), None)], [expired, broken])
    assert late == ["client slow"] and others == [broken]
    assert nodes.late(["1", "3"], [(_Proxy("1"), None)], [broken]) == ([], [broken])  # no deadline: nothing late


def test_sampled_rounds_spend_less_privacy_and_divide_by_the_expected_count():
    full, sampled = epsilon(1.0, 100, 1e-5), epsilon(1.0, 100, 1e-5, rate=0.05)
    assert sampled < full / 10  # amplification by sampling
    assert epsilon(1.0, 100, 1e-5, rate=1.0) == full
    cfg = {"DP_CLIP": 0.5, "DP_NOISE": 1.0, "DP_DELTA": 1e-5, "DP_ADAPTIVE": False, "DP_QUANTILE": 0.5,
           "FRACTION_FIT": 0.05}
    dp = ServerDP(cfg, 1000)
    assert dp.rate == 0.05 and dp.denominator == pytest.approx(50.0)
    assert dp.account(100, {"dp_clipped": 0}, 48)["dp_epsilon"] == pytest.approx(sampled)


def test_each_round_trains_and_validates_the_seeded_sample_only(tiny_fed, tmp_path):
    datasets = [str(p) for p in tiny_fed[0]]
    done = run_in_process({"datasets": datasets, "save-dir": str(tmp_path / "run"), **FED, "num-rounds": 2,
                           "fraction-fit": 0.5, "fraction-evaluate": 0.3, "min-updates": 1})
    keys = [str(p.resolve()) for p in tiny_fed[0]]
    for r in (1, 2):
        trained = sorted(res.metrics["dataset"] for _, res in done.fits[r])
        assert trained == sample(keys, 0.5, 1, 0, r, "fit") and len(trained) == 2  # ceil(0.5 x 3)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [(row["sampled"], row["updates"], row["late"]) for row in rows] == [("2", "2", "0")] * 2
    validated = [sum(1 for k in row if k.startswith("map50_95_") and row[k] != "") for row in rows]
    assert validated == [1, 1]  # ceil(0.3 x 3) client validated each round's model


def _message(ttl, age):
    """A train message with its round config, sent `age` seconds ago with time-to-live `ttl`."""
    import time

    from flwr.common import ConfigRecord, Message, Metadata, RecordDict

    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time() - age, ttl=ttl, message_type="train")
    return Message(RecordDict({"fitins.config": ConfigRecord({"epochs": 1})}), metadata=meta)


def test_a_client_skips_work_past_its_deadline_and_learns_the_deadline_otherwise():
    import time

    from flwr.common import Context, RecordDict

    from utils.nodes import on_time, stop_at

    simulated = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    done = []
    on_time(_message(10.0, 30.0), simulated, lambda m, c: done.append(m))
    assert not done  # the simulation engine ran expired messages; now they are answered at once, no training
    reply = on_time(_message(10.0, 30.0), simulated, lambda m, c: None)
    assert reply.has_error() and "deadline passed" in reply.error.reason
    fresh = _message(60.0, 0.0)
    on_time(fresh, simulated, lambda m, c: done.append(m))
    deadline = done[0].content.config_records["fitins.config"]["deadline"]
    assert abs(deadline - (time.time() + 60)) < 5
    supernode = Context(run_id=1, node_id=1, node_config={"dataset": "x"}, state=RecordDict(), run_config={})
    reply = on_time(_message(10.0, 30.0), supernode, lambda m, c: done.append(m))  # a stalled SuperNode's restart
    assert len(done) == 1 and reply.has_error() and "clock" in reply.error.reason
    on_time(_message(60.0, 0.0), supernode, lambda m, c: done.append(m))
    assert abs(done[1].content.config_records["fitins.config"]["deadline"] - (time.time() + 60)) < 5
    stop_at(time.time() + 60)["on_train_batch_end"](None)  # in time: training goes on
    with pytest.raises(TimeoutError, match="deadline passed"):
        stop_at(time.time() - 1)["on_train_batch_end"](None)

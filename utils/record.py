"""The record of a run's rounds in SAVE_DIR: metrics rows, last.pt/best.pt/results.png, the progress line, pruning,
the closing summary and the verdict on a run that trained nothing.

The strategy notes a round's values as they come (`begin`, `note`) and closes the round with `finish` once its
evaluation is in: the metrics.csv row (with round{N}.npz, already written, the round is then complete), the round's
line, and last.pt, best.pt and results.png written in a background thread while the next round trains.
"""

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np

from utils import personalize
from utils.checkpoint import write_checkpoint
from utils.console import log
from utils.params import load_npz, save_npz, set_weights
from utils.report import plot, write_rows
from utils.resume import command

STALL_ROUNDS = 2  # a run whose last rounds (this many, or all) got no valid update ends with an error
DIVERGED = 10.0  # a round whose train loss is above this many times the highest of the earlier rounds' has diverged
LOSS_FLOOR = 10.0  # ... counted as at least this: from scratch YOLO's loss rises from ~0.1 (no box assigned yet) to ~5
NOTHING_LEARNED = 0.0005  # a best score below this prints as 0.000: the run learned nothing measurable


class RunStopped(RuntimeError):
    """The run stopped itself (its global model diverged); the message is its last line."""


def train_loss(row):
    """Return the sum of a metrics row's train losses (box, cls, dfl, ...), or None when it has none."""
    losses = [float(v) for k, v in row.items() if k.startswith("train_") and k.endswith("loss") and v not in ("", None)]
    return sum(losses) if losses else None


class RoundRecord:
    """What the run has done so far: rows, best score and round, rounds with and without updates, first error.

    Args:
        cfg (dict): the run's settings (SAVE_DIR, NUM_ROUNDS, KEEP_ROUNDS).
        run (dict): the run's starting state (`prepare`): `rows` of a resumed run, `offset`, the server's `model`
            and `train_args` for checkpoints.
        metric (str): the metrics column of the global score (map50_95, mask_map50_95, ..., score); `label` its name.
        task: the run's task (utils/tasks.py), for the server-side score.
        cause (str): what most likely makes this run's model diverge, for the line that stops it.
    """

    def __init__(self, cfg, run, metric, label, task, cause="unknown"):
        """Start from a resumed run's rows (none for a fresh run)."""
        self.cfg, self.run, self.metric, self.label, self.task = cfg, run, metric, label, task
        self.cause = cause
        self.save_dir, self.rows, self.pending = Path(cfg["SAVE_DIR"]), run["rows"], {}
        self.held = {}  # EVAL_IN_FIT: the last round's row, waiting for the scores the next round's clients send
        scored = [(float(x[metric]), int(x["round"])) for x in self.rows if x.get(metric)]
        self.best, self.best_round = max(scored, key=lambda x: (x[0], -x[1]), default=(None, None))  # ties: the first
        self.trained, self.untrained, self.failed, self.first_error = 0, 0, [], None  # rounds with / without updates
        self.late = []  # the clients that missed the current round's deadline
        self.top_loss = max((x for x in map(train_loss, self.rows) if x is not None), default=None)
        self.stopped = None  # why the run stopped itself (divergence)
        self.writer, self.writing = ThreadPoolExecutor(max_workers=1), None
        # held while a round is closed (its metrics.csv row, which completes it); a Ctrl-C takes it for good before it
        # says which rounds are complete, so that no round completes between that line and the exit
        self.closing = threading.Lock()
        self.finished, self.defer_summary = False, False  # the last round is done; the summary waits for the caller
        self.stopped_early, self.last_round = False, cfg["NUM_ROUNDS"]  # PATIENCE
        self.tune_round = None  # PATIENCE with PERSONALIZE: the round after the stop, whose evaluation fine-tunes
        self.t0 = self.t_last = time.time()

    def note(self, **values):
        """Add values to the current round's row."""
        self.pending.update(values)

    def begin(self, r, updates, bytes_up, failed, late=()):
        """Start round r's row once its updates are counted: how many clients were sampled, how many updates were
        valid, why the others failed, who missed the deadline (ROUND_TIMEOUT)."""
        self.pending = {"round": r, "sampled": self.pending.get("sampled"), "updates": updates, "late": len(late),
                        "bytes_down": self.pending.get("bytes_down"), "bytes_up": bytes_up,
                        "time_configure": self.pending.get("time_configure")}
        self.failed, self.late = failed, list(late)
        self.first_error = self.first_error or (failed[0] if failed else None)

    def save_round(self, r, weights):
        """Write round r's global weights to round{r}.npz; an OSError is logged (the earlier round files are intact)
        and raised again, which stops the run."""
        path = self.save_dir / f"round{r}.npz"
        try:
            save_npz(path, weights)
        except OSError as e:
            log(ERROR, "round %d: could not save %s (%s); the earlier round files are intact; stopping", r, path, e)
            raise

    def trained_round(self, trained):
        """Count the round as one with enough valid updates (True) or as one that kept the global model."""
        self.trained, self.untrained = (self.trained + 1, 0) if trained else (self.trained, self.untrained + 1)

    def stop_if_diverged(self, r, weights, metrics):
        """Log the line and raise RunStopped when round r's global model diverged (`check_divergence` of its new
        `weights` and its clients' weighted train `metrics`)."""
        stop = self.check_divergence(r, weights, [v for k, v in metrics.items() if k.endswith("loss")])
        if stop:
            log(ERROR, "%s", stop)
            raise RunStopped(stop)

    def check_divergence(self, r, weights, losses):
        """Return None, or the sentence that stops the run because round r's global model diverged: its `weights` hold
        NaN or Inf, or its clients' train `losses` add up to a non-finite value or to over DIVERGED times the highest
        train loss of the earlier rounds, counted as at least LOSS_FLOOR (a model trained from scratch at a small image
        size starts near 0.1, before the assigner matches any box, and rises 10-40x to its usual few units; noise
        that destroys the model sends it to millions)."""
        loss = sum(losses) if losses else None
        limit = DIVERGED * max(self.top_loss, LOSS_FLOOR) if self.top_loss is not None else None
        if any(w.dtype.kind == "f" and not np.isfinite(w).all() for w in weights):
            what = "its weights hold NaN or Inf"
        elif loss is not None and not math.isfinite(loss):
            what = f"its train loss is {loss}"
        elif loss is not None and limit is not None and loss > limit:
            what = (f"train loss {loss:.4g}, above {limit:.4g}: {DIVERGED:g}x the highest of the earlier rounds' "
                    f"({self.top_loss:.4g}, counted as at least {LOSS_FLOOR:g})")
        else:
            self.top_loss = loss if self.top_loss is None else max(self.top_loss, loss or 0.0)
            return None
        kept = f"rounds 1-{r - 1} are kept in {self.save_dir}" if r > 2 else \
            f"round 1 is kept in {self.save_dir}" if r == 2 else "no round was kept"
        self.stopped = f"round {r}: the global model diverged ({what}); likely cause: {self.cause}; {kept}"
        return self.stopped

    def check_writing(self):
        """Raise what the background writer raised (a disk full stops the run at the next round)."""
        if self.writing is not None and self.writing.done():
            self.wait_for_files()

    def wait_for_files(self):
        """Wait until the last round's last.pt, best.pt and results.png are written; raise what writing raised."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def _write_files(self, weights, r, score, improved, rows):
        """Write last.pt, best.pt (when improved) and results.png of round r."""
        model = self.run["model"]
        set_weights(model, weights)
        write_checkpoint(model, self.save_dir / "last.pt", self.run["train_args"], {"round": r})
        if improved:
            write_checkpoint(model, self.save_dir / "best.pt", self.run["train_args"], {"round": r, self.metric: score})
        plot(self.save_dir / "results.png", rows, self.metric, self.label)

    def hold(self):
        """Keep the round noted so far open while the next round starts (EVAL_IN_FIT): its scores come with the next
        round's updates (`finish_held`)."""
        if self.pending.get("round") is not None:
            self.held, self.pending = self.pending, {}

    def finish_held(self, current, **values):
        """Close the held round with `values` (its scores) and `current` (its global arrays, still the global ones);
        the next round's row, begun meanwhile, stays open."""
        now, self.pending, self.held = self.pending, {**self.held, **values}, {}
        self.finish(current)
        self.pending = now

    def finish(self, current, **values):
        """Close the round, with `values` noted: its metrics row; then last.pt, best.pt and results.png of `current`
        (the new global arrays) while the next round trains; its line; pruning; after the last round, the summary."""
        self.pending.update(values)
        row, r = self.pending, self.pending.get("round")
        if r is None:
            return
        now = time.time()
        row["time_s"], row["time_round"], self.t_last = round(now - self.t0, 1), round(now - self.t_last, 2), now
        self.rows = [x for x in self.rows if int(x["round"]) != r] + [row]
        with self.closing:
            write_rows(self.save_dir / "metrics.csv", self.rows)  # with round{r}.npz: the round is complete (resume)
        score = row.get(self.metric, row.get(f"server_{self.metric}"))
        scoring = self.cfg.get("EVALUATE", True) or self.cfg.get("SERVER_DATA")  # else every round is the best
        improved = score is None and not scoring or score is not None and (self.best is None or score > self.best)
        if improved:
            self.best, self.best_round = score, r
        self.wait_for_files()  # one writer at a time: the previous round's files are done
        args = (current, r, score, improved, list(self.rows))
        if r >= self.cfg["NUM_ROUNDS"]:
            self._write_files(*args)  # the last round: done before the run ends (an early stop waits for it)
        else:  # a checkpoint and a plot take ~0.5 s of server time: overlap them with the next round's training
            self.writing = self.writer.submit(self._write_files, *args)
        self.pending = {}
        log(INFO, "%s", self.line(row))
        self.prune(r)
        self.stop_early(r, score)
        self.finished = r >= self.last_round and self.tune_round is None
        if self.finished and not self.defer_summary:
            self.summary()

    def best_arrays(self):
        """Return the best round's global arrays (its round file: pruning keeps it)."""
        return load_npz(self.save_dir / f"round{self.best_round}.npz")

    def add_personal(self, metrics):
        """After an early stop with PERSONALIZE: write the clients' fine-tuned scores (and their scores of the best
        round's model where its row lacks them) into the best round's metrics row; the run is then finished."""
        row = next(x for x in self.rows if int(x["round"]) == self.best_round)
        row.update({k: v for k, v in metrics.items() if k.startswith("personal_")
                    or k.startswith(f"{self.metric}_") and k not in row})
        with self.closing:
            write_rows(self.save_dir / "metrics.csv", self.rows)
        self.tune_round, self.finished = None, True
        if not self.defer_summary:
            self.summary()

    def stop_early(self, r, score):
        """After round r: with PATIENCE, end the run when the global score has not improved for PATIENCE rounds."""
        patience, best = self.cfg.get("PATIENCE", 0), self.best_round
        if not patience or score is None or best is None or r - best < patience or r >= self.cfg["NUM_ROUNDS"]:
            return
        self.stopped_early, self.last_round = True, r
        self.tune_round = r + 1 if self.cfg.get("PERSONALIZE") else None
        log(INFO, "stopping after round %d of %d: the global %s has not improved for %d rounds (patience %d); the "
            "best, %.3f of round %d, is best.pt%s", r, self.cfg["NUM_ROUNDS"], self.label, r - best, patience,
            self.best, best, "; each client now fine-tunes it (personalize)" if self.tune_round else "")
        self.wait_for_files()  # this round's last.pt is written in the background: done before the run ends

    def line(self, row):
        """Return the round's progress line: time, train loss (or why skipped), failures, the global score."""
        r, n, elapsed = row["round"], self.cfg["NUM_ROUNDS"], time.time() - self.t0
        line = f"round {r}/{n}  {elapsed:.0f}s elapsed, ~{elapsed / (r - self.run['offset']) * (n - r):.0f}s left"
        losses = [v for k, v in row.items() if k.startswith("train_") and k.endswith("_loss")]
        line += f"  train loss {sum(losses):.3f}" if losses else f"  skipped ({row['updates']} valid updates)"
        if self.failed:
            line += f"  {len(self.failed)} failed: " + "; ".join(self.failed)
        if self.late:
            line += f"  {len(self.late)} late: " + ", ".join(self.late)
        if self.metric in row:
            first = f"mAP50 {row['map50']:.3f}  " if self.metric == "map50_95" else ""
            line += f"  val {first}{self.label} {row[self.metric]:.3f} (best {self.best:.3f})"
        if f"server_{self.task.metric}" in row:
            line += f"  server {self.task.label} {row[f'server_{self.task.metric}']:.3f}"
        return line

    def prune(self, r):
        """Remove round files older than the last KEEP_ROUNDS, keeping the best round's."""
        if self.cfg["KEEP_ROUNDS"] < 1:
            return
        for i in range(1, r - self.cfg["KEEP_ROUNDS"] + 1):
            if i != self.best_round:
                (self.save_dir / f"round{i}.npz").unlink(missing_ok=True)

    def summary(self):
        """Log where the run's outputs are (or why it failed): the run's last lines, under flwr run too."""
        if self.failure():
            log(ERROR, "%s", self.failure())
            return
        if self.best is not None and self.best < NOTHING_LEARNED:
            log(WARNING, "the global model scored %s 0.000 in every round: it learned nothing measurable yet; more "
                "rounds or epochs (the schedule spans num-rounds x epochs), or a trained .pt base model, usually fix "
                "it", self.label)
        d = self.save_dir
        log(INFO, "done: %d rounds in %s", self.last_round, d)
        log(INFO, "  best model  %s (best global %s %s, round %s)", d / "best.pt", self.label,
            f"{self.best:.3f}" if self.best is not None else "not measured", self.best_round)
        log(INFO, "  last model  %s;  round files %s;  metrics %s;  plot %s", d / "last.pt", d / "round*.npz",
            d / "metrics.csv", d / "results.png")
        last = d / f"round{self.last_round}.npz"
        log(INFO, "  export a round: %s", command("utils/export_federated.py", last))
        tuned_row = self.cfg.get("PERSONALIZE") and next(  # the row with the fine-tuned models' scores
            (x for x in reversed(self.rows) if x.get("personal_score") not in (None, "")), None)
        if tuned_row:  # each client's fine-tuned model, beside the global one
            spec = self.run["spec"]
            folder = spec["clients_dir"] if spec["datasets"] else "each SuperNode's save-dir"
            start = f"best model (round {self.best_round})" if self.stopped_early else "final model"
            tuned = personalize.summary(tuned_row, self.metric, self.label, self.cfg["PERSONALIZE"], folder, start)
            if tuned:
                log(INFO, "%s", tuned)

    def failure(self):
        """Return one sentence when the run stopped itself, trained nothing or its last rounds got no valid update,
        else None."""
        if self.stopped:
            return self.stopped
        last = min(STALL_ROUNDS, self.cfg["NUM_ROUNDS"] - self.run["offset"])
        if self.trained and self.untrained < last:
            return None
        what = "no round got a valid client update" if not self.trained else \
            f"the last {self.untrained} rounds got no valid client update"
        return f"the run failed: {what} (first client error: {self.first_error or 'none reported'})"

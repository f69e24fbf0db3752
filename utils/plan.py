"""Which of a run's rounds end with an evaluation, and how: an evaluate message, the next round's fit message
(EVAL_IN_FIT), or the fine-tuning of PERSONALIZE (after an early stop by PATIENCE, one more evaluation that only
does that). Rounds are Flower's, numbered from 1 in every process; `offset` (rounds finished before a resume) turns
them into the run's."""


class EvalPlan:
    """The evaluation schedule of one run; `record` (utils/record.py) says whether PATIENCE stopped it."""

    def __init__(self, cfg, offset, record):
        """Keep the settings, the resume offset and the run's record."""
        self.cfg, self.offset, self.record = cfg, offset, record

    def scheduled(self, server_round):
        """Return whether the round is one EVAL_EVERY scores (every EVAL_EVERY-th round, and always the last)."""
        r = server_round + self.offset
        return r % max(self.cfg["EVAL_EVERY"], 1) == 0 or r >= self.cfg["NUM_ROUNDS"]

    def waits(self, server_round):
        """Return whether the round's row waits for the clients' scores of its model (EVALUATE)."""
        return bool(self.cfg["EVALUATE"]) and self.scheduled(server_round)

    def in_fit(self, server_round):
        """Return whether the next round's clients score the round's model before they train (EVAL_IN_FIT; never
        the last round, nor before round 1 or a resume)."""
        return bool(self.cfg["EVAL_IN_FIT"]) and server_round >= 1 and \
            server_round + self.offset < self.cfg["NUM_ROUNDS"] and self.waits(server_round)

    def personalizes(self, server_round):
        """Return whether the round ends with the evaluation that fine-tunes (PERSONALIZE): the last round's, or
        after an early stop the next round's."""
        r = server_round + self.offset
        if self.record.stopped_early:
            return r == self.record.tune_round
        return bool(self.cfg["PERSONALIZE"]) and r >= self.cfg["NUM_ROUNDS"]

    def asks(self, server_round):
        """Return whether the round ends with evaluate messages."""
        if self.record.stopped_early:
            return self.personalizes(server_round)
        return self.waits(server_round) and not self.in_fit(server_round)

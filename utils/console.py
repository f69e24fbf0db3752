"""What a run prints: the project's own lines, and Flower's and Ray's only with --verbose.

The project logs through a child of Flower's logger ("flwr.fedyolo"), so its lines reach the console (and, under
`flwr run`, the streamed log) by the same handler as Flower's own, in every process. Without --verbose, that handler
lets through the project's lines and Flower's warnings and errors, except those the project reports itself in one
line (a client's traceback: the round line names the client and its first error line) and deprecation notices.
Colour only when the console is a terminal.
"""

import logging
import os
import sys
import warnings

from flwr.common.logger import console_handler

LOGGER = logging.getLogger("flwr.fedyolo")
log = LOGGER.log

QUIET = ("DEPRECATED FEATURE", "An exception was raised when processing a message", "Traceback (most recent call",
         "Manually terminating ClientAppActor")


def _colour():
    """Colour Flower's console lines only when they go to a terminal."""
    stream = getattr(console_handler, "stream", None)
    console_handler.colored = bool(getattr(stream, "isatty", lambda: False)())


class _ProjectOnly(logging.Filter):
    """Pass the project's lines and Flower's warnings/errors that the project does not report itself."""

    def filter(self, record):
        if record.name.startswith(LOGGER.name):
            return True
        if record.levelno < logging.WARNING:
            return False
        text = record.getMessage()  # with its arguments: "Manually terminating %s" names the actor only in them
        return not any(text.startswith(q) or q in text[:200] for q in QUIET) and "vce_api" not in record.pathname


def _quiet(on):
    """Add (or remove) the filter that hides Flower's chatter on this process's console."""
    for f in [f for f in console_handler.filters if isinstance(f, _ProjectOnly)]:
        console_handler.removeFilter(f)
    if on:
        console_handler.addFilter(_ProjectOnly())


def setup(verbose=False):
    """Set the console of a simulation up: colour on terminals only; Flower's chatter hidden unless verbose.

    The choice travels to the simulated clients (Ray workers inherit the environment), whose lines Ray forwards.
    """
    _colour()
    _quiet(not verbose)
    os.environ["FEDYOLO_QUIET"] = "0" if verbose else "1"
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(ClientAppActor pid=...)" prefix without colour
    if not verbose:
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


_colour()  # client processes (Ray workers, SuperNodes) import this module too: no colour codes in forwarded logs
_quiet(os.environ.get("FEDYOLO_QUIET") == "1")  # a simulated client of a quiet run

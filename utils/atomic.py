"""Files that appear whole or not at all: write a temp file in the same folder, then rename it into place."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_open(path):
    """Yield a binary file that replaces `path` only when the block ends without an exception."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(folder):
    """Delete temp files that a killed writer left in `folder` (a SIGKILL leaves them; nothing else can clean up)."""
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)


def atomic_write_text(path, text):
    """Write `text` to `path` atomically."""
    with atomic_open(path) as f:
        f.write(text.encode())

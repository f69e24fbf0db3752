"""Files that appear whole or not at all: write a temp file in the same folder, then rename it into place."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask_at_import():
    """Return the process umask by setting and restoring it (the fallback where /proc/self/status has no Umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def current_umask():
    """Return the process umask, read from /proc/self/status (no set-and-restore race with other threads).

    Where that line is missing (not Linux, or a kernel before 4.7) the umask read once at import is returned.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


@contextmanager
def atomic_open(path, durable=True):
    """Yield a binary file that replaces `path` only when the block ends without an exception.

    The file gets the permissions an ordinary open() would give it (0o666 less the umask), not mkstemp's 0o600.
    `durable`: on disk (fsync) before it replaces `path`; False for a file its reader checks and can do without
    (a power cut may then leave it empty), where the fsync's wait is most of the write.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~current_umask())
            yield f
            f.flush()
            if durable:
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

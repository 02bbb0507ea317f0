"""Files: atomic writes (a failure or an interrupt never leaves a half-written file) and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def umask_mode(folder: bool = False) -> int:
    """The mode a plain open() or mkdir() would give under the user's umask (mkstemp and mkdtemp give 0600 / 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path next to `path` (unique name ending in `suffix`); renamed to `path` only if
    the block completes, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)  # unique: runs may overlap
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            tmp.chmod(umask_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log_tail(path: str | os.PathLike | None, lines: int = 20) -> str:
    """The last lines of a log file, read from its last 16 KB ("" when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
            text = f.read().decode(errors="replace")
    except (OSError, TypeError):
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])

"""The one atomic writer: results, reports, checkpoints and progress marks are written to a
temporary file in the target's folder and renamed over it, so that a reader, a resumed run or a
crash sees the old file or the new one, never a part. Files are as readable as the umask allows
(``mkstemp`` alone makes them 0600, unreadable to the group that shares the results).

A file that runs read, merge and rewrite (the reports) is changed under :func:`locked`, so that two
runs that finish at once both keep their rows, and what a killed writer left is removed there.
"""
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Union

PathLike = Union[str, os.PathLike]


def _tmp_prefix(name: str) -> str:
    """Temporaries are named ".<name>.tmp-<random>": a run that starts cleans up what a killed one left."""
    return f".{name}.tmp-"


TMP_GLOB = _tmp_prefix("*") + "*"


def atomic_save(path: PathLike, write: Callable[[BinaryIO], None], durable: bool = True) -> Path:
    """Calls ``write(file)`` on a temporary binary file, then renames it to ``path``. ``durable``
    flushes it to disk first (off for marks rewritten every step, where a lost one is harmless)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write(path: PathLike, data: Union[str, bytes], durable: bool = True) -> Path:
    """Writes text (UTF-8) or bytes to ``path`` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return atomic_save(path, lambda f: f.write(payload), durable)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def locked(path: PathLike) -> Iterator[None]:
    """Holds an exclusive lock for ``path`` (on ``.<name>.lock`` beside it) while a run reads, merges
    and rewrites it; other runs wait. Without ``fcntl`` (Windows), or where the file system refuses
    the lock, it does not lock: the writes stay atomic, only a concurrent run's rows may be lost."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file (their umask): reading it is enough to lock it
        fd = os.open(lock, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_temporaries(folder: PathLike, names: str) -> List[Path]:
    """Deletes the temporaries of the files matching the glob ``names`` in ``folder``, which killed
    writers left behind; only safe while no other writer of those files can run (under
    :func:`locked`, or at the start of a job that owns the folder). Returns what it removed."""
    stale = list(Path(folder).glob(_tmp_prefix(names) + "*"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def set_aside(path: PathLike) -> Path:
    """Renames an unreadable file to ``<name>.corrupt-<time>`` so that nothing overwrites it; returns the new path.
    A second one within the same second becomes ``<name>.corrupt-<time>-2``, not a replacement of the first."""
    path = Path(path)
    stem = f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = path.with_name(stem), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{stem}-{n}")
    os.replace(path, aside)
    return aside


class CorruptReport(ValueError):
    """A report file exists but cannot be read; it has been moved aside, and the message says where."""


def load_list_or_set_aside(path: PathLike, field: str) -> List[dict]:
    """The list of objects under ``field`` of the JSON file ``path`` ([] when there is none). A file
    that cannot be read is renamed to ``<name>.corrupt-<time>`` and CorruptReport says so."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        items = json.loads(path.read_text(encoding="utf-8"))[field]
        if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
            raise TypeError(f"{field} is not a list of objects")
        return items
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        aside = set_aside(path)
        raise CorruptReport(f"{path} could not be read ({type(exc).__name__}: {exc}); kept as {aside}, "
                            "starting a new report") from exc

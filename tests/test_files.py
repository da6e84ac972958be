"""The one atomic writer: a failed write keeps the old file and leaves no temporary behind; a
checkpoint written through it loads back."""
import fnmatch
import os

import pytest
import torch

from runtime.files import TMP_GLOB, atomic_save, atomic_write


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = atomic_write(tmp_path / "checkpoint.pth", b"old")

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(target, crash)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pth"]


def test_torch_save_round_trip_and_temporaries_match_the_cleanup_glob(tmp_path, monkeypatch):
    state = {"w": torch.arange(4.0)}
    path = atomic_save(tmp_path / "checkpoint.pth", lambda f: torch.save(state, f), durable=False)
    assert torch.equal(torch.load(path)["w"], state["w"])
    seen = []
    monkeypatch.setattr(os, "replace", lambda src, dst: seen.append(src) or (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write(path, "x")
    assert len(seen) == 1 and fnmatch.fnmatch(os.path.basename(seen[0]), TMP_GLOB)
    assert list(tmp_path.glob(TMP_GLOB)) == []


def test_a_lock_file_that_another_user_made_read_only_still_locks(tmp_path, monkeypatch):
    """In a group's shared report folder the lock file is another user's, 0644 under umask 022; the
    kernel refuses them write access (simulated: the tests may run as root, whom it never refuses)."""
    import builtins
    import fcntl

    from runtime.files import locked

    lock = tmp_path / ".parity.json.lock"
    lock.touch(mode=0o644)
    real_os_open, real_open = os.open, builtins.open

    def refuse_writing(path, writing):
        if os.path.abspath(path) == str(lock) and writing:
            raise PermissionError(13, "Permission denied", str(path))

    def os_open(path, flags, *mode):
        refuse_writing(path, flags & (os.O_WRONLY | os.O_RDWR))
        return real_os_open(path, flags, *mode)

    def open_(path, mode="r", *args, **kwargs):
        refuse_writing(path, isinstance(path, (str, os.PathLike)) and any(c in mode for c in "wax+"))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    with locked(tmp_path / "parity.json"):
        with real_open(lock) as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

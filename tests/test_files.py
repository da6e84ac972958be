"""The one atomic writer: a failed write keeps the old file and leaves no temporary behind; a
checkpoint written through it loads back."""
import fnmatch
import os

import pytest
import torch

from detr.files import TMP_GLOB, atomic_save, atomic_write


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

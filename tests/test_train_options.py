"""``python -m training.train`` refuses bad options as pytest's options are refused: one line naming
the option, exit 2, before any data is read; and a resume continues only the recipe it was trained with."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--train-limit", "4", "--val-limit", "2", "--batch-size", "2", "--threads", "1",
         "--seed", "7", "--epochs", "1", "--max-steps", "1"]


def run(out: Path, *args, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "training.train", "--output-dir", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs 0: expected >= 1"),
    (["--batch-size", "0"], "--batch-size 0: expected >= 1"),
    (["--lr", "-1"], "--lr -1.0: expected > 0"),
    (["--lr", "nan"], "--lr nan: expected > 0"),
    (["--max-steps", "0"], "--max-steps 0: expected >= 1"),
    (["--target-map", "2"], "--target-map 2.0: expected in [0, 1]"),
    (["--resume", "/nonexistent/checkpoint.pth"], "--resume /nonexistent/checkpoint.pth: no such checkpoint file"),
    (["--compile-mode", "max-autotune"], "--compile-mode and --compile-options need --compile BACKEND"),
    pytest.param(["--compile", "inductor", "--compile-options", "max_autotune"],
                 "--compile-options 'max_autotune': expected KEY=VALUE, e.g. max_autotune=True",
                 marks=pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile came with torch 2.0")),
])
def test_a_bad_option_is_one_line_and_exit_2(tmp_path, args, message):
    done = run(tmp_path / "out", "--device", "cpu", *args, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"python -m training.train: error: {message}"


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    done = run(tmp_path / "f", "--device", "cpu", timeout=120)
    assert done.returncode == 2 and f"--output-dir {tmp_path / 'f'}: cannot be made a folder" in done.stderr


def test_a_truncated_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.pth"
    bad.write_bytes(b"PK\x03\x04 not a whole file")
    done = run(tmp_path / "out", *SMALL, "--resume", str(bad), timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--resume {bad}: not a checkpoint that can be read" in done.stderr


def test_a_resume_with_another_recipe_is_refused_unless_allowed(tmp_path):
    first = run(tmp_path / "a", *SMALL, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = tmp_path / "a" / "checkpoint.pth"
    other = [*SMALL, "--max-steps", "2", "--lr", "1e-3", "--resume", str(checkpoint)]
    refused = run(tmp_path / "b", *other, timeout=600)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "the checkpoint was trained with another recipe (--lr 0.0003 -> 0.001)" in refused.stderr
    allowed = run(tmp_path / "c", *other, "--allow-recipe-change", timeout=600)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    result = json.loads((tmp_path / "c" / "result.json").read_text())
    assert result["resumed"][-1]["recipe_changes"] == {"lr": [0.0003, 0.001]} and result["fix_hp"]["lr"] == 0.001

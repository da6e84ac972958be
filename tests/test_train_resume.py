"""``python -m training.train --resume`` continues an interrupted run to the same result, bit for bit;
``--init-seed`` moves the initial weights alone; ``result.json`` names the threads that ran."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import compat
from runtime.files import TMP_GLOB

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--device",
    "cpu",
    "--train-limit",
    "12",
    "--val-limit",
    "8",
    "--batch-size",
    "2",
    "--threads",
    "1",
    "--seed",
    "7",
]


def train(out: Path, *args):
    result = subprocess.run([sys.executable, "-m", "training.train", *COMMON, "--output-dir", str(out), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((out / "result.json").read_text()), result.stdout


@pytest.mark.parametrize("schedule", ["step", "linear"])
def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path, schedule):
    # The rate drops, or starts its decay, after the first epoch: the resume restores it mid-schedule.
    plan = ["--lr-schedule", schedule, "--lr-drop", "1"]
    straight, _ = train(tmp_path / "straight", "--epochs", "2", *plan)
    train(tmp_path / "cut", "--epochs", "1", *plan)
    resumed, stdout = train(
        tmp_path / "cut", "--epochs", "2", *plan, "--resume", str(tmp_path / "cut" / "checkpoint.pth")
    )
    assert "resumed from" in stdout and "at epoch 1, step 6" in stdout
    assert resumed["steps"] == straight["steps"] == 12
    assert resumed["param_digests"] == straight["param_digests"]
    assert resumed["step_losses"] == straight["step_losses"]
    assert [p["mAP"] for p in resumed["curve"]] == [p["mAP"] for p in straight["curve"]]
    assert resumed["samples"] == straight["samples"] == 24
    checkpoint = compat.load(tmp_path / "cut" / "checkpoint.pth", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["steps"] == 12
    # time adds up across the resume, which the result records
    assert [r["epoch"] for r in resumed["resumed"]] == [0] and straight["resumed"] == []
    assert resumed["e2e_time"] > resumed["train_time"] + resumed["eval_time"]
    assert resumed["curve"][1]["elapsed"] > resumed["curve"][0]["elapsed"] > 0


def test_temporary_files_of_a_killed_write_are_cleaned_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ranks").mkdir(parents=True)
    stale = [out / ".checkpoint.pth.tmp-99999", out / "ranks" / ".rank0.json.tmp-abc123"]
    for path in stale:
        path.write_bytes(b"half a file")
    train(out, "--epochs", "1", "--max-steps", "1")
    assert not any(path.exists() for path in stale) and (out / "checkpoint.pth").exists()
    assert not list(out.rglob(TMP_GLOB))


def test_the_init_seed_defaults_to_the_seed_and_moves_the_initial_weights(tmp_path):
    one = ["--epochs", "1", "--max-steps", "1", "--eval-every", "0"]
    plain, _ = train(tmp_path / "plain", *one)
    same, _ = train(tmp_path / "same", *one, "--init-seed", "7")
    other, _ = train(tmp_path / "other", *one, "--init-seed", "8")
    assert same["param_digests"] == plain["param_digests"] and same["step_losses"] == plain["step_losses"]
    assert other["param_digests"] != plain["param_digests"] and other["step_losses"] != plain["step_losses"]
    assert other["fix_hp"]["init_seed"] == 8 and plain["fix_hp"]["init_seed"] is None


def test_the_result_names_the_threads_the_device_s_kernels_ran_on(tmp_path):
    """cpu-alt computes on one thread whatever --threads asks for (it is the CPU with other kernels)."""
    result, stdout = train(
        tmp_path, "--threads", "2", "--device", "cpu-alt", "--epochs", "1", "--max-steps", "1", "--eval-every", "0"
    )
    assert result["threads_per_rank"] == 1 and "1 thread(s) per rank" in stdout

"""``--eval-every-steps N``: evaluations inside epochs, so that the time to a target is measured
at the step, not rounded up to an epoch; their time stays out of train_time and in e2e_time."""
import json
import re

from tests.test_train_resume import train


def test_evaluations_every_n_steps_within_and_across_epochs(tmp_path):
    # 12 images in batches of 2: 6 steps an epoch, so steps 4 and 8 fall inside epochs
    result, stdout = train(tmp_path / "run", "--epochs", "2", "--eval-every-steps", "4")
    assert [p["steps"] for p in result["curve"]] == [4, 8, 12]
    assert [p["epoch"] for p in result["curve"]] == [0, 1, 1]
    assert [p["samples"] for p in result["curve"]] == [8, 16, 24]
    elapsed = [p["elapsed"] for p in result["curve"]]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert result["eval_time"] > 0 and result["e2e_time"] > result["train_time"] + result["eval_time"]
    assert re.findall(r"step (\d+) mAP", stdout) == ["4", "8", "12"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in logged if "mAP" in r] == [4, 8, 12, 12]  # step 12's evaluation, then its epoch's row


def test_a_target_reached_inside_an_epoch_stops_there(tmp_path):
    result, stdout = train(tmp_path / "run", "--epochs", "2", "--eval-every-steps", "2", "--target-map", "0")
    assert result["steps"] == 2 and result["target_reached"]["steps"] == 2
    assert [p["steps"] for p in result["curve"]] == [2]
    assert "target mAP 0.0 reached at step 2" in stdout


def test_a_step_count_below_one_is_refused(tmp_path):
    import subprocess
    import sys

    from tests.test_train_resume import COMMON, ROOT

    done = subprocess.run([sys.executable, "-m", "training.train", *COMMON, "--output-dir", str(tmp_path),
                           "--eval-every-steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--eval-every-steps 0: expected a number of steps >= 1" in done.stderr

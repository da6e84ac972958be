"""``python -m training.train`` finds bad data before the first step, and a failed evaluation loses no
training: the checkpoint is written before each evaluation and a resume runs that evaluation first."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from detr.data.synthetic import generate
from runtime import compat

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--train-limit", "12", "--val-limit", "8", "--batch-size", "2", "--threads", "1",
         "--seed", "7", "--epochs", "1"]
ON_COCO = ["--device", "cpu", "--model", "tiny", "--batch-size", "2", "--threads", "1", "--epochs", "1",
           "--scales", "96", "--max-size", "96", "--val-size", "96", "--crop", "off", "--num-workers", "0"]


def run(out: Path, *args, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "training.train", "--output-dir", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def coco(tmp_path) -> Path:
    return generate(tmp_path / "coco", seed=2, num_train=4, num_val=2, min_size=96, max_size=96, crowd_every=0)


def test_an_unreadable_validation_image_fails_before_the_first_step(tmp_path, coco):
    (image,) = sorted((coco / "val2017").iterdir())[1:2]
    image.write_bytes(image.read_bytes()[:200])  # a truncated file: its header still parses
    result = run(tmp_path / "out", "--coco-path", str(coco), *ON_COCO, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"dataset: cannot read image {image}" in result.stderr
    assert " step " not in result.stdout and not (tmp_path / "out" / "checkpoint.pth").exists()


def test_a_split_without_ground_truth_is_refused(tmp_path, coco):
    annotations = coco / "annotations" / "instances_val2017.json"
    data = json.loads(annotations.read_text())
    annotations.write_text(json.dumps({**data, "annotations": []}))
    result = run(tmp_path / "out", "--coco-path", str(coco), *ON_COCO, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"dataset: {annotations}: the 2 images used have no ground-truth boxes" in result.stderr
    assert not (tmp_path / "out" / "result.json").exists()


def test_a_fault_that_cannot_fire_is_a_usage_error(tmp_path):
    result = run(tmp_path / "out", *SMALL, "--fail-at", "7:1:crash", timeout=120)
    assert result.returncode == 1 and "--fail-at 7:1:crash: this run has rank(s) 0..0, so the fault would never fire" \
        in result.stderr, result.stderr[-2000:]
    # refused before any data is read (on COCO that takes minutes), so a missing folder is not what it reports
    result = run(tmp_path / "out", *SMALL, "--fail-at", "7:1:crash", "--coco-path", str(tmp_path / "missing"),
                 timeout=120)
    assert result.returncode == 1 and "--fail-at 7:1:crash: this run has rank(s) 0..0" in result.stderr, \
        result.stderr[-2000:]
    result = run(tmp_path / "out", *SMALL, "--fail-at", "0:6:nan", timeout=120)
    assert result.returncode == 1 and "--fail-at 0:6:nan: this run has steps 0..5, so the fault would never fire" \
        in result.stderr, result.stderr[-2000:]


def test_a_failed_evaluation_loses_no_training(tmp_path):
    failed = run(tmp_path / "cut", *SMALL, "--fail-at", "0:3:eval-crash")
    assert failed.returncode == 1 and "injected crash in the evaluation after step 5" in failed.stderr
    checkpoint = compat.load(tmp_path / "cut" / "checkpoint.pth", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["steps"], checkpoint["pending_eval"]) == (0, 6, True)
    # a step that the checkpoint has already passed would never fire either
    late = run(tmp_path / "cut", *SMALL, "--resume", str(tmp_path / "cut" / "checkpoint.pth"), "--fail-at", "0:2:crash")
    assert late.returncode == 1 and "--fail-at 0:2:crash: this run resumes at step 6 (" in late.stderr, \
        late.stderr[-2000:]
    assert "so the fault would never fire" in late.stderr and "epoch 0 step" not in late.stdout
    resumed = run(tmp_path / "cut", *SMALL, "--resume", str(tmp_path / "cut" / "checkpoint.pth"))
    assert resumed.returncode == 0 and "(its evaluation first)" in resumed.stdout, resumed.stderr[-2000:]
    straight = run(tmp_path / "straight", *SMALL)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("cut", "straight"))
    assert a["param_digests"] == b["param_digests"] and a["step_losses"] == b["step_losses"] and a["steps"] == 6
    assert [p["mAP"] for p in a["curve"]] == [p["mAP"] for p in b["curve"]] and len(a["curve"]) == 1

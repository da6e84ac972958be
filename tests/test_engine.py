"""The engine and ``python -m training.train``: the loss falls, NaN stops the run, clipping precedes the step."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import detr
from detr.data.coco import build_dataset, coco_api, num_classes
from detr.data.synthetic import generate
from detr.engine import NonFiniteLossError, evaluate, train_one_epoch
from detr.misc import collate_fn
from runtime import compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=3, num_train=8, num_val=4, max_size=192)


def fixed_loader(coco_dir, batch_size=4):
    # The deterministic evaluation transform: the same 4 images every step, so the loss must fall.
    dataset = build_dataset("val", coco_dir, max_size=160, val_size=128)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)


def tiny_model(coco_dir):
    torch.manual_seed(0)
    return detr.build("tiny", num_classes=num_classes(build_dataset("val", coco_dir, transforms=None)), dropout=0.0)


def test_short_training_lowers_the_loss(coco_dir):
    model, criterion, _ = tiny_model(coco_dir)
    optimizer = torch.optim.AdamW(detr.param_groups(model, 1e-3, 1e-4), weight_decay=1e-4)
    loader = fixed_loader(coco_dir)
    first = train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, log_every=0)
    for epoch in range(1, 25):
        last = train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch, log_every=0)
    assert first.samples == last.samples == 4 and last.steps == 1
    assert 0 < last.core_time <= last.wall_time
    assert last.losses["loss"] < 0.7 * first.losses["loss"], (first.losses["loss"], last.losses["loss"])


def test_gradients_are_clipped_before_the_step(coco_dir):
    model, criterion, _ = tiny_model(coco_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    norms = []
    step = optimizer.step

    def checked_step(*args, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(*args, **kwargs)

    optimizer.step = checked_step
    train_one_epoch(
        model, criterion, fixed_loader(coco_dir), optimizer, torch.device("cpu"), 0, max_norm=0.1, log_every=0
    )
    assert norms and max(norms) <= 0.1 + 1e-6


def test_nan_predictions_stop_the_run_naming_the_step(coco_dir):
    model, criterion, _ = tiny_model(coco_dir)
    with torch.no_grad():
        model.class_embed.bias[0] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0 step 0: matcher: .* NaN or Inf.*pred_logits"):
        train_one_epoch(model, criterion, fixed_loader(coco_dir), optimizer, torch.device("cpu"), 0, log_every=0)


def test_nan_loss_stops_the_run_naming_the_terms(coco_dir):
    model, criterion, _ = tiny_model(coco_dir)
    loss_boxes = criterion.loss_boxes

    def nan_giou(*args, **kwargs):
        losses = loss_boxes(*args, **kwargs)
        return {**losses, "loss_giou": losses["loss_giou"] * float("nan")}

    criterion.loss_boxes = nan_giou
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at epoch 0 step 0; non-finite terms: loss_giou=nan, loss_giou_0=nan"
    ):
        train_one_epoch(model, criterion, fixed_loader(coco_dir), optimizer, torch.device("cpu"), 0, log_every=0)


def test_progress_lines(coco_dir):
    model, criterion, _ = tiny_model(coco_dir)
    lines = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_one_epoch(
        model,
        criterion,
        fixed_loader(coco_dir, batch_size=2),
        optimizer,
        torch.device("cpu"),
        0,
        log_every=1,
        log=lines.append,
    )
    assert len(lines) == 2
    assert lines[-1].startswith("epoch 0 step 2/2 loss ") and "img/s" in lines[-1] and "eta 0s" in lines[-1]


def test_evaluate_returns_the_coco_stats(coco_dir):
    model, _, postprocess = tiny_model(coco_dir)
    loader = fixed_loader(coco_dir)
    result = evaluate(model, postprocess, loader, coco_api(loader.dataset), torch.device("cpu"))
    assert len(result["stats"]) == 12 and 0 <= result["AP"] <= 1


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "training.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_cli_trains_evaluates_checkpoints_and_resumes(coco_dir, tmp_path):
    common = ["--coco-path", str(coco_dir), "--batch-size", "2", "--num-workers", "0", "--scales", "128",
              "--max-size", "160", "--val-size", "128", "--output-dir", str(tmp_path / "out"), "--epochs", "3"]
    first = run_cli(*common, "--max-steps", "4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "epoch 0 step 1/4 loss" in first.stdout and "mAP" in first.stdout
    checkpoint = tmp_path / "out" / "checkpoint.pth"
    assert checkpoint.is_file()
    assert compat.load(checkpoint, weights_only=False)["steps"] == 4
    second = run_cli(*common, "--max-steps", "6", "--resume", str(checkpoint), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at epoch 1, step 4" in second.stdout
    assert compat.load(checkpoint, weights_only=False)["steps"] == 6


def test_cli_rejects_a_bad_dataset(tmp_path):
    (tmp_path / "train2017").mkdir()
    result = run_cli("--coco-path", str(tmp_path), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode != 0
    assert "instances_train2017.json does not exist" in result.stderr

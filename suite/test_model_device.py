"""The whole DETR on the device under test against the CPU: outputs, losses and gradients.

A coarse end-to-end check that holds until the op-by-op parity tests replace it: fp32 only, with
the tolerance PyTorch itself uses for CPU-versus-device op tests (atol = rtol = 1e-3).
"""
import copy

import pytest
import torch

ATOL = RTOL = 1e-3


def _step(model, criterion, images, targets, device):
    model = model.to(device)
    criterion = criterion.to(device)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    outputs = model(images)
    losses = criterion(outputs, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, losses, grads


@pytest.fixture(scope="module")
def runs(detr_parts, batch, xpu):
    model, criterion, _ = detr_parts
    # Dropout draws from each device's own generator: compare the deterministic network.
    model = copy.deepcopy(model).eval()
    images, targets = batch
    cpu = _step(copy.deepcopy(model), copy.deepcopy(criterion), images, targets, torch.device("cpu"))
    dev = _step(copy.deepcopy(model), copy.deepcopy(criterion), images, targets, xpu.device)
    xpu.synchronize()
    return cpu, dev


def _assert_close(actual, expected, what):
    actual = actual.detach().cpu().to(expected.dtype)
    torch.testing.assert_close(actual, expected.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_forward_outputs(runs, precision):
    if precision != "fp32":
        pytest.skip("the end-to-end check is fp32 only; reduced precisions are judged op by op")
    (cpu_out, _, _), (dev_out, _, _) = runs
    _assert_close(dev_out["pred_logits"], cpu_out["pred_logits"], "pred_logits")
    _assert_close(dev_out["pred_boxes"], cpu_out["pred_boxes"], "pred_boxes")
    for i, (d, c) in enumerate(zip(dev_out["aux_outputs"], cpu_out["aux_outputs"])):
        _assert_close(d["pred_boxes"], c["pred_boxes"], f"aux_outputs[{i}].pred_boxes")


def test_losses(runs, precision):
    if precision != "fp32":
        pytest.skip("the end-to-end check is fp32 only; reduced precisions are judged op by op")
    (_, cpu_losses, _), (_, dev_losses, _) = runs
    assert sorted(dev_losses) == sorted(cpu_losses)
    for name in cpu_losses:
        _assert_close(dev_losses[name], cpu_losses[name], name)


def test_parameter_gradients(runs, precision):
    if precision != "fp32":
        pytest.skip("the end-to-end check is fp32 only; reduced precisions are judged op by op")
    (_, _, cpu_grads), (_, _, dev_grads) = runs
    assert sorted(dev_grads) == sorted(cpu_grads)
    assert any(n.startswith("backbone.0.body.layer2") for n in cpu_grads), "layer2 must be trained"
    assert not any(n.startswith("backbone.0.body.layer1") for n in cpu_grads), "layer1 must stay frozen"
    for name, grad in cpu_grads.items():
        scale = grad.abs().max().clamp(min=1e-12)
        # Gradients are compared relative to their own largest element: sums over many terms.
        _assert_close(dev_grads[name] / scale, grad / scale, f"grad of {name}")

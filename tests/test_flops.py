"""The suite's own FLOP counter (for torch without torch.utils.flop_counter) agrees with
FlopCounterMode: on DETR's steps op by op, and on random matmul and convolution shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.flops import FlopCounter

flop_counter = pytest.importorskip("torch.utils.flop_counter")


def both(fn):
    theirs, ours = flop_counter.FlopCounterMode(display=False), FlopCounter()
    with theirs:
        fn()
    with ours:
        fn()
    return {str(k): v for k, v in theirs.get_flop_counts()["Global"].items()}, dict(ours.counts)


@pytest.mark.parametrize("kind", ["TrainStep", "InferenceStep"])
def test_detr_steps_count_the_same_op_by_op(kind):
    from fixtures import steps
    from runtime.device import resolve

    step = getattr(steps, kind)(steps.Workload("tiny", 2, 128), resolve("cpu"), "fp32")
    theirs, ours = both(step.body)
    assert theirs == ours and "aten.convolution" in ours


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([1, 2]), st.integers(1, 3), st.integers(4, 9),
       st.integers(1, 2), st.integers(0, 1), st.booleans(), st.booleans())
def test_convolutions_forward_and_backward(
    batch, per_group, groups, kernel, size, stride, padding, transposed, weight_grad
):
    channels = per_group * groups
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    if transposed:
        conv = torch.nn.ConvTranspose2d(channels, 2 * groups, kernel, stride, padding, groups=groups)
    else:
        conv = torch.nn.Conv2d(channels, 2 * groups, kernel, stride, padding, groups=groups)
    conv.weight.requires_grad_(weight_grad)
    theirs, ours = both(lambda: conv(x).sum().backward())
    if transposed and not transposed_backward_counted_right():
        theirs.pop("aten.convolution_backward"), ours.pop("aten.convolution_backward")
    assert theirs == ours


def transposed_backward_counted_right() -> bool:
    """Whether this torch's FlopCounterMode counts a transposed convolution's backward as the
    hand count does: 1 channel to 2, a 1x1 kernel on 4x4, so 64 for the forward and 128 for the
    two gradients. torch 2.1's counts 1088."""
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    conv = torch.nn.ConvTranspose2d(1, 2, 1)
    theirs, _ = both(lambda: conv(x).sum().backward())
    return theirs == {"aten.convolution": 64, "aten.convolution_backward": 128}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))
def test_matmuls(b, m, k, n):
    a, w, bias = torch.randn(b, m, k, requires_grad=True), torch.randn(b, k, n, requires_grad=True), torch.randn(n)
    theirs, ours = both(lambda: (torch.bmm(a, w).sum() + torch.baddbmm(torch.zeros(b, m, n), a, w).sum()
                                 + torch.addmm(bias, a[0], w[0]).sum() + (a[0] @ w[0]).sum()).backward())
    assert theirs == ours and ours["aten.bmm"] > 0

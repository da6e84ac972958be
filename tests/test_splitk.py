"""cpu-splitk, the second correct-but-different device: each op it reorders differs from the CPU's
own result, passes the error model, and keeps every other call (and every non-fp32 call) as it is."""
import pytest
import torch

from parity.capture import capture
from parity.errormodel import ErrorModel
from parity.replay import golden_outputs, judge_record
from runtime.device import BACKENDS, resolve
from runtime.splitk import SplitK

g = torch.Generator().manual_seed(0)
A, B = torch.randn(6, 1024, generator=g), torch.randn(1024, 5, generator=g)
X, W = torch.randn(2, 64, 9, 9, generator=g), torch.randn(8, 64, 3, 3, generator=g)
BIAS = torch.randn(8, generator=g)
CALLS = {
    "mm": (torch.mm, (A, B)),
    "bmm": (torch.bmm, (A.reshape(2, 3, 1024), B[:, :3].expand(2, 1024, 3).contiguous())),
    "addmm": (lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0), (torch.randn(6, 5, generator=g), A, B)),
    "convolution": (lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1), (X, W, BIAS)),
    "sum": (lambda x: x.sum(1), (A,)),
    "sum of all": (torch.sum, (A,)),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_reordered_op_differs_from_the_cpu_and_passes_the_error_model(name):
    fn, inputs = CALLS[name]
    _, trace = capture(fn, *inputs)
    record = trace[0]
    with SplitK():
        device = fn(*inputs)
    assert not torch.equal(device, record.outputs[0]), "another order rounds differently"
    judged = judge_record(record, [device], golden_outputs(record), ErrorModel())[0]
    assert judged.passed, judged.verdict


def test_convolution_gradients_are_reordered_and_pass():
    x, w, b = (t.clone().requires_grad_() for t in (X, W, BIAS))
    torch.nn.functional.conv2d(x, w, b, padding=1).square().sum().backward()
    expected = [t.grad for t in (x, w, b)]
    x2, w2, b2 = (t.clone().requires_grad_() for t in (X, W, BIAS))
    with SplitK():
        torch.nn.functional.conv2d(x2, w2, b2, padding=1).square().sum().backward()
    for got, want in zip((x2.grad, w2.grad, b2.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert not torch.equal(w2.grad, expected[1])


def test_other_dtypes_and_small_k_run_the_cpu_kernel_unchanged():
    with SplitK():
        assert torch.equal(torch.mm(A.double(), B.double()), A.double() @ B.double())
        small = torch.randn(4, 16, generator=g)
        assert torch.equal(small @ small.T, small @ small.T)
        assert torch.equal(torch.mm(A.bfloat16(), B.bfloat16()), A.bfloat16() @ B.bfloat16())


def test_cpu_splitk_is_a_variant_of_the_cpu():
    device = resolve("cpu-splitk")
    assert device.device.type == "cpu" and "cpu-splitk" in BACKENDS
    with device.kernels():
        reordered = A @ B
    assert not torch.equal(reordered, A @ B)

"""Op capture: forward and backward aten ops in order, with module paths and CPU copies."""
import warnings

import pytest
import torch

from parity.capture import KEEP, UNKNOWN_PHASE, capture
from runtime import compat
from tests.parity.blocks import Block


def run_block(keep="tensors"):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 3, 5, 5)
    grad = torch.randn(2, 4)

    def step():
        out = model(x)
        out.backward(grad)
        return out

    return model, capture(step, root_module=model, keep=keep)


@pytest.mark.skipif(not compat.has_autograd_node(), reason=f"torch {torch.__version__} cannot tell the autograd node")
def test_forward_then_backward_in_order_with_modules():
    _, (out, trace) = run_block()
    assert [r.index for r in trace] == list(range(len(trace)))
    phases = [r.phase for r in trace]
    assert phases == sorted(phases, key=lambda p: p == "backward"), "forward ops must all come first"
    where = {(r.overload, r.phase): r.module for r in trace}
    assert where[("aten.convolution.default", "forward")] == "conv"
    assert where[("aten.relu.default", "forward")] == "act"
    assert where[("aten.native_layer_norm.default", "forward")] == "norm"
    assert where[("aten._softmax.default", "forward")] == "attn"
    assert where[("aten.addmm.default", "forward")] in ("attn", "head")
    assert where[("aten.convolution_backward.default", "backward")] == "conv"
    assert where[("aten.threshold_backward.default", "backward")] == "act"
    assert where[("aten.native_layer_norm_backward.default", "backward")] == "norm"
    assert where[("aten._softmax_backward_data.default", "backward")] == "attn"
    head_backward = [r for r in trace.find("aten.mm") if r.phase == "backward" and r.module == "head"]
    assert len(head_backward) == 2 and all(r.node == "AddmmBackward0" for r in head_backward)
    residual = [r for r in trace.phase("forward").find("aten.add.Tensor") if r.input_meta[0] == r.input_meta[1]]
    assert [r.module for r in residual] == ["(root)"], "the residual add runs in the root module itself"


def test_without_the_autograd_node_no_backward_op_is_called_forward(monkeypatch):
    monkeypatch.setattr(compat, "_FALLBACKS", {})
    monkeypatch.delattr(torch._C, "_current_autograd_node", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, (out, trace) = run_block()
    where = {(r.overload, r.phase): r.module for r in trace}
    assert where[("aten.convolution.default", "forward")] == "conv"
    assert where[("aten.convolution_backward.default", UNKNOWN_PHASE)] == "(outside)"
    assert not trace.phase("backward") and not [
        r for r in trace.find("aten.threshold_backward") if r.phase == "forward"
    ]


def test_records_hold_cpu_copies_of_inputs_and_outputs():
    model, (out, trace) = run_block()
    last_forward = trace.phase("forward").find("aten.mean")[-1]
    torch.testing.assert_close(last_forward.outputs[0], out.detach(), rtol=0, atol=0)
    conv = trace.find("aten.convolution")[0]
    torch.testing.assert_close(conv.args[1], model.conv.weight.detach(), rtol=0, atol=0)
    assert conv.args[1] is not model.conv.weight and conv.args[1].device.type == "cpu"
    ln = trace.find("aten.native_layer_norm")[0]
    assert len(ln.outputs) == 3 and [m.shape for m in ln.output_meta] == [(2, 25, 8), (2, 25, 1), (2, 25, 1)]
    assert (
        ln.shapes
        == "[2,25,8] float32, [8] float32, [8] float32 -> [2,25,8] float32, [2,25,1] float32, [2,25,1] float32"
    )


def test_keep_modes_bound_memory():
    _, (_, outputs_only) = run_block(keep="outputs")
    assert all(r.args is None and r.outputs is not None for r in outputs_only)
    _, (_, stats) = run_block(keep="stats")
    assert all(r.args is None and r.outputs is None and r.stats for r in stats)
    _, (_, full) = run_block()
    relu = full.find("aten.relu")[0].outputs[0]
    s = stats.find("aten.relu")[0].stats[0]
    assert s.numel == relu.numel() and s.abs_max == pytest.approx(float(relu.abs().max()))
    assert s.rms == pytest.approx(float(relu.double().square().mean().sqrt())) and s.nan == s.inf == 0
    with pytest.raises(ValueError, match="accepted: " + ", ".join(KEEP)):
        capture(lambda: None, keep="all")


def test_views_and_uninitialised_memory_are_not_recorded_and_inputs_are_taken_before_mutation():
    x = torch.arange(6.0)

    def fn():
        y = x.view(2, 3).t()
        garbage = torch.empty(4)  # noqa: F841
        z = y.clone()
        z.add_(1)
        return z

    _, trace = capture(fn)
    assert [r.overload for r in trace] == ["aten.clone.default", "aten.add_.Tensor"]
    add = trace[1]
    torch.testing.assert_close(add.args[0], x.view(2, 3).t(), rtol=0, atol=0)
    torch.testing.assert_close(add.outputs[0], x.view(2, 3).t() + 1, rtol=0, atol=0)


def test_ops_outside_any_module_and_without_root():
    lin = torch.nn.Linear(3, 2)
    _, trace = capture(lambda: lin(torch.ones(1, 3)).sum())
    assert trace.find("aten.addmm")[0].module == "Linear"
    assert trace.find("aten.sum")[0].module == "(outside)"


def test_random_ops_are_flagged_unless_their_randomness_is_off():
    q = torch.randn(1, 2, 4, 8)
    f = torch.nn.functional
    attention = getattr(f, "scaled_dot_product_attention", None)  # torch 2.0 and newer

    def fn():
        torch.ops.aten.native_dropout.default(q, 0.0, True)
        if attention is not None:
            attention(q, q, q, dropout_p=0.0)
        return f.dropout(q, 0.5)

    _, trace = capture(fn)
    first, flagged = trace[0], {r.overload: r.random for r in trace[1:]}
    assert first.op == "aten.native_dropout" and not first.random
    assert not any(v for k, v in flagged.items() if "scaled_dot_product" in k), flagged
    assert any(v for k, v in flagged.items() if "bernoulli" in k or "dropout" in k), flagged


def test_copies_are_shared_only_while_the_tensor_is_unchanged():
    x = torch.arange(6.0)

    def fn():
        y = x * 2
        a = y + 1  # reads y as the multiplication left it
        y.data.mul_(10)  # a write through another tensor object on the same memory
        b = y + 1
        y.add_(1)
        c = y * 1
        return a, b, c

    _, trace = capture(fn)
    mul, add_a, mul_, add_b, add_, last = trace
    assert add_a.args[0] is mul.outputs[0], "an unchanged output is copied once"
    torch.testing.assert_close(add_b.args[0], x * 20, rtol=0, atol=0)
    torch.testing.assert_close(add_.outputs[0], x * 20 + 1, rtol=0, atol=0)
    torch.testing.assert_close(last.args[0], x * 20 + 1, rtol=0, atol=0)
    torch.testing.assert_close(mul.outputs[0], x * 2, rtol=0, atol=0)


def test_a_spilled_trace_holds_no_tensors_and_reads_back_the_same_values_and_strides():
    from parity.capture import loaded
    from parity.spill import Stored

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)

    def fn():
        lin.zero_grad(set_to_none=True)
        x.grad = None
        return lin(x).relu().sum().backward()

    _, kept = capture(fn, keep="tensors")
    _, spilled = capture(fn, keep="tensors", spill=True)
    assert spilled.store is not None and spilled.store.nbytes > 0
    assert [r.overload for r in kept] == [r.overload for r in spilled]
    for memory, disk in zip(kept, spilled):
        leaves = compat.tree_leaves((disk.args, disk.kwargs, disk.outputs))
        assert not any(isinstance(t, torch.Tensor) for t in leaves) and any(isinstance(t, Stored) for t in leaves)
        back = loaded(disk)
        for a, b in zip(compat.tree_leaves((memory.args, memory.kwargs, memory.outputs)),
                        compat.tree_leaves((back.args, back.kwargs, back.outputs))):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool]
)
def test_the_store_gives_back_every_layout_and_dtype_unchanged_by_later_writes(dtype):
    from parity.spill import TensorStore

    base = (torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 50).to(dtype)
    # base[:1, 2] is contiguous with a stride of 8: one element, as a batch of one image makes them
    tensors = [base, base.t(), base[2:, 1:5], base[:, ::2], torch.empty(0, 3, dtype=dtype), base[3, 4], base[:1, 2]]
    store = TensorStore()
    handles = [store.put(t) for t in tensors]
    expected = [t.clone() for t in tensors]
    base.zero_()  # the store holds the values at put time, not a view of the memory
    for h, t in zip(handles, expected):
        back = h.load()
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)

"""Fault specs: parsing, error messages, each kind's effect, standalone injection, firing counts."""
import math
import os
import time

import pytest
import torch

from parity.faults import KINDS, inject, never_fired, parse_fault
from parity.precision import Precision, parse_precisions, round_to_tf32
from runtime.compat import TorchDispatchMode


@pytest.mark.parametrize("spec, op, kind, value", [
    ("aten.softmax:noise=1e-3", "aten.softmax", "noise", 1e-3),
    ("aten.mm:round=tf32", "aten.mm", "round", "tf32"),
    ("aten.native_layer_norm:nan", "aten.native_layer_norm", "nan", None),
    ("aten._softmax.default:scale=1.01", "aten._softmax.default", "scale", 1.01),
    ("aten.addmm:delay=0.05", "aten.addmm", "delay", 0.05),
    ("aten.relu:zero=0.5", "aten.relu", "zero", 0.5),
    (" aten.convolution_backward:offset=-2 ", "aten.convolution_backward", "offset", -2.0),
])
def test_parse_accepted_specs(spec, op, kind, value):
    f = parse_fault(spec)
    assert (f.op, f.kind, f.value, f.fired) == (op, kind, value, 0)


@pytest.mark.parametrize("spec, message", [
    ("aten.softmax", r"expected <namespace>\.<op>\[\.<overload>\]:<kind>\[=<value>\]"),
    ("softmax:nan", r"must be <namespace>\.<op>\[\.<overload>\]"),
    ("aten.sofmax:nan", r"no operator 'aten\.sofmax'"),
    ("aten.mm.bogus:nan", r"has no overload 'bogus'; it has: default"),
    ("aten.mm:wobble=1", r"unknown kind 'wobble'; accepted kinds:(.|\n)*noise=<relative std>(.|\n)*delay=<seconds>"),
    ("aten.mm:noise", r"kind 'noise' needs a value"),
    ("aten.mm:round=fp8", r"accepted: bf16, fp16, tf32"),
    ("aten.mm:scale=big", r"value 'big' is not a number"),
    ("aten.mm:nan=2", r"fraction in \(0, 1\]"),
    ("aten.mm:delay=-1", r"must not be negative"),
    ("aten.add:ulp=1.5", r"ulp counts whole ulps, got 1\.5"),
    ("aten.mm:reorder", r"kind 'reorder' needs a value"),
    ("aten.mm:reorder=-1", r"reorder must not be negative"),
    ("aten.add:reorder=1", r"reorder models the reductions mm, bmm(.|\n)*aten\.add is not one of them"),
    ("aten.mm:crash", r"unknown kind 'crash'"),
    ("aten.mm:scale=2@k>8", r"expected @k>=N \(reduction length\) or @numel>=N \(output elements\)"),
    ("aten.mm:scale=2@size>=8", r"got @size>=8"),
    ("aten.mm:round-inputs=fp8", r"accepted: bf16, fp16, tf32"),
])
def test_parse_errors_say_what_is_accepted(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_fault(spec)


def test_every_kind_is_documented():
    assert set(KINDS) == {"noise", "offset", "scale", "round", "round-inputs", "nan", "inf", "zero", "delay", "ulp",
                          "reorder"}


def _mm(a, b, spec):
    with inject([spec]) as faults:
        out = a @ b
    return out, faults[0]


@pytest.mark.parametrize("spec, check", [
    ("aten.mm:scale=2", lambda out, ref: torch.equal(out, 2 * ref)),
    ("aten.mm:offset=0.5", lambda out, ref: torch.equal(out, ref + 0.5)),
    ("aten.mm:zero", lambda out, ref: torch.equal(out, torch.zeros_like(ref))),
    ("aten.mm:nan", lambda out, ref: int(out.isnan().sum()) == 1),
    ("aten.mm:inf=0.5", lambda out, ref: int(out.isposinf().sum()) == 8),
    ("aten.mm:noise=1e-2", lambda out, ref: 1e-4 < float(((out - ref) / ref).abs().max()) < 0.1),
    ("aten.mm:round=bf16", lambda out, ref: torch.equal(out, ref.bfloat16().float()) and not torch.equal(out, ref)),
    ("aten.mm:round=tf32", lambda out, ref: torch.equal(out, round_to_tf32(ref)) and not torch.equal(out, ref)),
    ("aten.mm.default:scale=-1", lambda out, ref: torch.equal(out, -ref)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_standalone_injection_perturbs_matching_ops_and_counts(spec, check):
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(3, 4)
    out, fault = _mm(a, b, spec)
    assert check(out, a @ b)
    assert fault.fired == 1 and fault.fired_on == ["aten.mm.default"]


def test_noise_is_deterministic():
    a, b = torch.randn(4, 3), torch.randn(3, 4)
    assert torch.equal(_mm(a, b, "aten.mm:noise=1e-2")[0], _mm(a, b, "aten.mm:noise=1e-2")[0])


def test_composite_op_names_match_what_they_decompose_into():
    x = torch.randn(3, 5)
    with inject(["aten.softmax:scale=2", "aten.layer_norm:offset=1"]) as faults:
        y = x.softmax(-1)
        z = torch.nn.functional.layer_norm(x, (5,))
    torch.testing.assert_close(y, 2 * x.softmax(-1))
    torch.testing.assert_close(z, torch.nn.functional.layer_norm(x, (5,)) + 1)
    assert [f.fired for f in faults] == [1, 1]


def test_views_and_integer_outputs_are_left_alone_and_in_place_ops_are_faulted_in_place():
    x = torch.arange(6.0)
    with inject(["aten.view:scale=2", "aten.argmax:scale=2", "aten.add_:offset=1"]) as faults:
        v = x.view(2, 3)
        i = x.argmax()
        y = x.clone()
        y.add_(1)
    assert torch.equal(v, torch.arange(6.0).view(2, 3)) and i.item() == 5
    assert torch.equal(y, torch.arange(6.0) + 2)
    assert never_fired(faults) == [faults[0]]


def test_an_op_that_never_runs_is_reported():
    with inject(["aten.convolution:nan", "aten.mm:scale=1"]) as faults:
        torch.ones(2, 2) @ torch.ones(2, 2)
    assert [f.spec for f in never_fired(faults)] == ["aten.convolution:nan"]


def test_delay_slows_the_op_down():
    start = time.perf_counter()
    out, fault = _mm(torch.ones(2, 2), torch.ones(2, 2), "aten.mm:delay=0.05")
    assert time.perf_counter() - start >= 0.05 and torch.equal(out, torch.full((2, 2), 2.0)) and fault.fired == 1


def test_tf32_rounding_keeps_ten_mantissa_bits_ties_to_even():
    one = 1.0
    x = torch.tensor([one + 2 ** -10, one + 2 ** -11, one + 3 * 2 ** -11, one + 2 ** -12, -3.0, math.inf, math.nan])
    r = round_to_tf32(x)
    assert r[:5].tolist() == [one + 2 ** -10, one, one + 2 ** -9, one, -3.0]
    assert r[5] == math.inf and math.isnan(r[6])


def test_precisions_parse():
    assert [p.name for p in parse_precisions("fp32, bf16,fp32")] == ["fp32", "bf16"]
    assert Precision("bf16").cast_dtype() == torch.bfloat16 and Precision("tf32").cast_dtype() == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'; accepted: fp32, tf32, amp, fp16, bf16"):
        parse_precisions("fp32,fp8")
    with pytest.raises(ValueError, match="accepted"):
        parse_precisions("")


def test_precision_contexts_restore_global_state():
    before = torch.get_float32_matmul_precision()
    with Precision("tf32").backend("cpu"):
        assert torch.get_float32_matmul_precision() == "high"
    with Precision("amp").run("cpu", autocast_dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert torch.get_float32_matmul_precision() == before
    assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_tf32_emulation_rounds_matmul_inputs():
    a = torch.full((1, 1), 1 + 2 ** -12)
    with Precision("tf32").backend("cpu", emulate_tf32=True):
        assert (a @ a).item() == 1.0
    assert (a @ a).item() != 1.0


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("No", False), ("OFF", False), ("1", True),
                                       ("yes", True), (None, True)])
def test_spilling_is_switched_off_by_any_usual_word_for_off(monkeypatch, value, on):
    from parity.spill import spill_enabled

    if value is None:
        monkeypatch.delenv("DETR_PARITY_SPILL", raising=False)
    else:
        monkeypatch.setenv("DETR_PARITY_SPILL", value)
    assert spill_enabled() is on


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full fails every write with ENOSPC")
def test_a_full_temporary_disk_names_tmpdir_and_the_switch():
    from parity.spill import SpillError, TensorStore

    store = TensorStore()
    store._file = open("/dev/full", "r+b")
    with pytest.raises(SpillError, match=r"set TMPDIR to a larger disk, or keep the trace in memory with "
                                         r"DETR_PARITY_SPILL=0"):
        store.put(torch.ones(4096))
    store._file.close()


def test_round_inputs_rounds_what_the_op_reads_not_what_it_returns():
    a, b = torch.randn(8, 300, dtype=torch.float32), torch.randn(300, 8, dtype=torch.float32)
    with inject(["aten.mm:round-inputs=bf16"]) as (fault,):
        out = a @ b
    assert fault.fired == 1
    assert torch.equal(out, a.bfloat16().float() @ b.bfloat16().float())
    assert not torch.equal(out, (a @ b).bfloat16().float())


@pytest.mark.parametrize("k, fires", [(63, False), (64, True)])
def test_a_fault_at_size_fires_only_on_calls_that_large(k, fires):
    a, b = torch.randn(4, k), torch.randn(k, 4)
    with inject(["aten.mm:scale=2@k>=64", "aten.mm:offset=1@numel>=17"]) as (by_k, by_numel):
        out = a @ b
    assert by_k.fired == int(fires) and by_numel.fired == 0
    assert torch.allclose(out, (a @ b) * (2 if fires else 1))


def test_reduction_lengths_of_convolutions_and_sums():
    from parity.faults import reduction_length

    x = torch.randn(2, 3, 10, 12, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    seen = {}

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.setdefault(str(func.overloadpacket), reduction_length(func, args, out))
            return out

    with Spy():
        torch.nn.functional.conv2d(x, w, padding=1).sum().backward()
    assert seen["aten.convolution"] == 3 * 9
    assert seen["aten.convolution_backward"] == 2 * 10 * 12  # the weight gradient's batch x output pixels
    assert seen["aten.sum"] == 2 * 5 * 10 * 12


def test_round_inputs_at_size_reads_k_from_the_inputs_or_from_a_reduction_output():
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    x = torch.randn(3, 128)
    with inject(["aten.mm:round-inputs=bf16@k>=64", "aten.sum:round-inputs=bf16@k>=128",
                 "aten.sum:round-inputs=tf32@k>=129"]) as (mm, by_row, too_small):
        out, rows = a @ b, x.sum(1)
    assert (mm.fired, by_row.fired, too_small.fired) == (1, 1, 0)
    assert torch.equal(out, a.bfloat16().float() @ b.bfloat16().float())
    assert torch.equal(rows, x.bfloat16().float().sum(1))

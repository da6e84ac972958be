"""Metrics on known tensors, index outputs judged by selected values, and the judgement rule."""
import math

import pytest
import torch

from parity.capture import capture
from parity.errormodel import ErrorModel
from parity.judge import judge_float, judge_integer, nonfinite_verdict
from parity.metrics import compare, nonfinite_masks, selected_values
from parity.replay import error_ratio, golden_outputs, judge_record

MODEL = ErrorModel()


def exact_values(golden, baseline):
    """The allowance of values an op selects or copies: rounding only."""
    return MODEL.for_values(golden, baseline, baseline.dtype)


def test_metrics_of_known_tensors():
    m = compare(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([1.0, 2.0, 4.0, 0.0], dtype=torch.float64))
    assert m.max_abs == 1.0
    assert m.rmse == pytest.approx(math.sqrt(1 / 4))
    assert m.max_rel == pytest.approx(0.25)
    assert m.cosine == pytest.approx(17 / (math.sqrt(14) * math.sqrt(21)))
    assert m.compared == 4


def test_relative_error_has_a_floor_and_cosine_handles_zeros():
    m = compare(torch.tensor([1e-12, 100.0]), torch.tensor([0.0, 100.0]))
    assert m.max_rel == pytest.approx(1e-12 / (1e-3 * 100))
    assert compare(torch.zeros(3), torch.zeros(3)).cosine == 1.0
    assert compare(torch.ones(3), torch.zeros(3)).cosine == 0.0


def test_nonfinite_positions_are_masked_out_of_metrics_and_located():
    a = torch.tensor([1.0, math.nan, math.inf, -math.inf, 2.0])
    g = torch.tensor([1.0, 5.0, 5.0, 5.0, 2.5])
    masks = nonfinite_masks(a)
    assert masks["nan"].tolist() == [False, True, False, False, False]
    assert masks["posinf"].tolist() == [False, False, True, False, False]
    assert masks["neginf"].tolist() == [False, False, False, True, False]
    m = compare(a, g)
    assert m.compared == 2 and m.max_abs == 0.5


def test_selected_values_of_index_outputs():
    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])
    assert selected_values(torch.ops.aten.argmax.default, (x, 1), {}, torch.tensor([2, 0])).tolist() == [3.0, 2.0]
    assert selected_values(torch.ops.aten.argmax.default, (x,), {}, torch.tensor(1)).item() == 3.0
    assert selected_values(torch.ops.aten.max.dim, (x, 0, True), {}, torch.tensor([[1, 0, 0]])).tolist() == [
        [2.0, 3.0, 3.0]
    ]
    assert selected_values(torch.ops.aten.topk.default, (x, 2), {}, torch.tensor([[2, 1], [0, 2]])).tolist() == \
        [[3.0, 3.0], [2.0, 1.0]]
    assert selected_values(torch.ops.aten.sort.stable, (x,), {"stable": True, "dim": 0},
                           torch.tensor([[0, 1, 1], [1, 0, 0]])).tolist() == [[1.0, 0.0, 1.0], [2.0, 3.0, 3.0]]
    img = torch.tensor([[[[0.0, 0.0], [5.0, 1.0]]]])
    assert selected_values(torch.ops.aten.max_pool2d_with_indices.default, (img, [2, 2]), {},
                           torch.tensor([[[[2]]]])).item() == 5.0


TIED = torch.tensor([[2.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [7.0, 1.0, 7.0, 1.0], [3.0, 3.0, 3.0, 3.0]])


@pytest.mark.parametrize("fn, other, wrong", [
    (lambda x: x.argmax(-1), [1, 3, 2, 2], [2, 0, 1, 0]),
    (lambda x: x.max(-1).indices, [1, 3, 2, 2], [2, 0, 1, 0]),
    (lambda x: x.topk(2, dim=-1).indices, [[1, 0], [3, 2], [2, 0], [3, 1]], [[2, 3], [0, 1], [1, 3], [0, 1]]),
    (lambda x: x.sort(dim=-1, stable=True).indices, [[3, 2, 1, 0], [3, 2, 1, 0], [3, 1, 2, 0], [3, 2, 1, 0]],
     [[0, 1, 2, 3]] * 4),
    (lambda x: torch.nn.functional.max_pool2d(x[None, None], 2, return_indices=True)[1],
     [[[[1, 3], [8, 10]]]], [[[[4, 6], [8, 10]]]]),
], ids=["argmax", "max.dim", "topk", "sort", "max_pool2d"])
def test_ties_broken_differently_pass_and_wrong_indices_fail(fn, other, wrong):
    _, trace = capture(fn, TIED)
    record = next(r for r in trace if any(m is not None and not m.dtype.is_floating_point for m in r.output_meta))
    golden = golden_outputs(record)
    assert golden.note == "float64"
    pos = next(i for i, m in enumerate(record.output_meta) if m is not None and not m.dtype.is_floating_point)
    baseline = record.outputs[pos]
    other, wrong = torch.tensor(other), torch.tensor(wrong)
    assert other.shape == baseline.shape and not torch.equal(other, baseline), "needs another choice among ties"
    device = list(record.outputs)
    device[pos] = other
    judged = judge_record(record, device, golden, MODEL)
    assert all(j.passed for j in judged), [j.verdict for j in judged]
    device[pos] = wrong
    verdicts = [j.verdict for j in judge_record(record, device, golden, MODEL)]
    assert any(v.startswith("fail: error") and "x its allowance" in v for v in verdicts), verdicts


def test_identical_and_exact_outputs_pass():
    g = torch.randn(100, dtype=torch.float64)
    b = g.float()
    j = judge_float(b.clone(), b, g, exact_values(g, b))
    assert j.passed and j.verdict == "pass" and j.margin <= 1 and j.margin == j.baseline_margin
    exact = torch.tensor([1.0, 2.0, 0.5])
    j = judge_float(exact.clone(), exact, exact.double(), exact_values(exact.double(), exact))
    assert j.passed and j.margin == 0.0
    zeros = torch.zeros(4)
    assert judge_float(zeros, zeros, zeros.double(), exact_values(zeros.double(), zeros)).passed
    assert not judge_float(zeros + 1e-30, zeros, zeros.double(), exact_values(zeros.double(), zeros)).passed


def test_margin_rule_and_verdict_text():
    torch.manual_seed(0)
    g = torch.randn(1000, dtype=torch.float64)
    b = g.float()
    d = (g * (1 + 1e-4 * torch.randn(1000, dtype=torch.float64))).float()
    allowance = exact_values(g, b)
    j = judge_float(d, b, g, allowance)
    assert not j.passed and j.component in allowance.names
    assert j.verdict == f"fail: error {j.margin:.3g}x its allowance ({j.component})"
    assert j.margin == pytest.approx(float(((d.double() - g).abs().numpy() / allowance.values).max()))


def test_whole_run_ratio_is_floored_at_a_quarter_ulp():
    g = torch.full((10,), 8.0, dtype=torch.float64)
    b = g.float()
    assert error_ratio(b, b, g)["ratio"] == 0.0
    d = b + 8 * torch.finfo(torch.float32).eps
    assert error_ratio(d, b, g)["ratio"] == pytest.approx(4.0)
    assert error_ratio(d[:3], b, g) is None


def test_nan_and_inf_must_sit_where_the_baseline_has_them():
    b = torch.tensor([1.0, 2.0, math.nan, 4.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert judge_float(b.clone(), b, g, exact_values(g, b)).passed, "NaN where baseline has NaN passes"
    d = torch.tensor([math.nan, math.nan, math.nan, 4.0])
    j = judge_float(d, b, g, exact_values(g, b))
    assert not j.passed and j.verdict == "fail: NaN at 2 positions where baseline is finite"
    d = torch.tensor([1.0, 2.0, 3.0, math.inf])
    assert nonfinite_verdict(d, b) == "fail: +Inf at 1 position where baseline is finite"
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert nonfinite_verdict(d, b) == "fail: baseline has NaN at 1 position where device has not"


def test_integer_outputs_compare_exactly():
    b = torch.tensor([1, 2, 3])
    assert judge_integer(b.clone(), b, b).passed
    j = judge_integer(torch.tensor([1, 2, 4]), b, b)
    assert not j.passed and j.verdict == "fail: 1 of 3 integer values differ from golden (baseline: 0)"
    assert not judge_integer(torch.tensor([1, 2]), b, b).passed

"""Properties of the error model and the judgement rule, over random shapes, magnitudes and dtypes:
a correct but different implementation (another summation order, errors within the documented ulp
budget) passes, and errors beyond the gray zone (a relative 1e-5 on an elementwise op, 1e-4 on a
reduction, TF32 or bf16 rounding in an fp32 op) fail."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.capture import capture
from parity.errormodel import ULP_BUDGETS, Allowance, ErrorModel
from parity.judge import judge_float
from parity.precision import round_to_tf32
from parity.replay import golden_outputs, judge_record
from parity.ulp import perturb_ulps, ulps_between

FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SCALES = st.sampled_from([1e-3, 1.0, 1e3])


def judged(fn, *inputs, device_fn=None, model=None):
    """Captures ``fn(*inputs)`` as the baseline, replaces its first op's output by ``device_fn``
    of it, and judges that op."""
    _, trace = capture(fn, *inputs)
    record = trace[0]
    device = [device_fn(t) if device_fn else t for t in record.outputs]
    return judge_record(record, device, golden_outputs(record), model or ErrorModel())[0]


@given(shape=st.lists(st.integers(1, 6), min_size=0, max_size=3), seed=st.integers(0, 2 ** 16),
       dtype=FLOATS, scale=SCALES, k=st.sampled_from([0.5, 1, 2, 7]))
def test_perturb_ulps_moves_by_at_most_k_ulps(shape, seed, dtype, scale, k):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    moved = perturb_ulps(x, k, torch.Generator().manual_seed(seed))
    assert moved.dtype == x.dtype and moved.shape == x.shape
    assert bool((ulps_between(moved, x) <= math.floor(k + 0.5) + 1e-9).all())
    assert bool(((x == 0) <= (moved == 0)).all()), "zeros stay zero"


@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 300), scale=SCALES)
def test_any_error_within_its_allowance_passes_and_beyond_it_fails(seed, n, scale):
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    rng = np.random.default_rng(seed)
    allowed = np.abs(rng.normal(size=n)) * 1e-6 * scale + 1e-30
    within = g + torch.from_numpy(allowed * rng.uniform(-1, 1, size=n))
    allowance = Allowance(allowed, {"test": allowed})
    assert judge_float(within, within, g, allowance, check_dtype=False).passed
    beyond = within.clone()
    i = int(rng.integers(n))
    beyond[i] = g[i] + 1.01 * allowed[i] * (1 if rng.random() < 0.5 else -1)
    verdict = judge_float(beyond, within, g, allowance, check_dtype=False)
    assert not verdict.passed and verdict.margin == pytest.approx(1.01)


ELEMENTWISE = {
    "rsqrt": (torch.rsqrt, lambda x: x.abs() + 0.1), "exp": (torch.exp, lambda x: x.clamp(-20, 20)),
    "log": (torch.log, lambda x: x.abs() + 1e-3), "sin": (torch.sin, lambda x: x), "cos": (torch.cos, lambda x: x),
    "tanh": (torch.tanh, lambda x: x), "sigmoid": (torch.sigmoid, lambda x: x),
    "sqrt": (torch.sqrt, lambda x: x.abs()), "reciprocal": (torch.reciprocal, lambda x: x.abs() + 0.1),
}


@given(name=st.sampled_from(sorted(ELEMENTWISE)), backend=st.sampled_from(sorted(ULP_BUDGETS)),
       shape=st.lists(st.integers(1, 8), min_size=1, max_size=3), seed=st.integers(0, 2 ** 16))
def test_elementwise_errors_within_the_documented_budget_pass_and_1e5_fails(name, backend, shape, seed):
    fn, domain = ELEMENTWISE[name]
    x = domain(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3)
    model = ErrorModel(backend)
    k = model.ulp_budget(f"aten.{name}")
    generator = torch.Generator().manual_seed(seed + 1)
    at_budget = judged(fn, x, device_fn=lambda t: perturb_ulps(t, max(k, 1), generator), model=model)
    assert at_budget.passed, at_budget.verdict
    biased = judged(fn, x, device_fn=lambda t: t * (1 + 1e-5), model=model)
    assert not biased.passed or bool((fn(x.double()).abs() < 1e-30).all()), biased


@given(m=st.integers(1, 6), k=st.integers(1, 256), n=st.integers(1, 6), seed=st.integers(0, 2 ** 16), scale=SCALES)
@settings(max_examples=60)
def test_matmul_in_another_summation_order_passes_and_tf32_or_a_1e4_bias_fails(m, k, n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g) * scale, torch.randn(k, n, generator=g)

    def reversed_order(_):
        out = torch.zeros(m, n)
        for i in reversed(range(k)):  # one rounding per term, the other way round
            out = out + a[:, i:i + 1] * b[i:i + 1, :]
        return out

    assert judged(torch.mm, a, b, device_fn=reversed_order).passed
    biased = judged(torch.mm, a, b, device_fn=lambda t: t * (1 + 1e-4))
    exact, magnitude = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    if bool((1e-4 * exact.abs() > 1.5 * 2 * 2 ** -24 * math.sqrt(k) * magnitude).any()):  # see the sum test
        assert not biased.passed, biased.margin
    if k >= 8 and m * n >= 12:  # TF32's error is random: one element can land near zero by chance
        tf32 = judged(torch.mm, a, b, device_fn=lambda t: round_to_tf32(a) @ round_to_tf32(b))
        assert not tf32.passed, tf32.margin


@given(n=st.integers(2, 200), seed=st.integers(0, 2 ** 16), scale=SCALES, positive=st.booleans())
def test_sum_in_any_order_passes_and_a_biased_sum_fails(n, seed, scale, positive):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    x = x.abs() if positive else x
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def sequential(_):
        total = torch.zeros((), dtype=torch.float32)
        for v in x[permutation]:
            total = total + v
        return total

    assert judged(torch.sum, x, device_fn=sequential).passed
    exact, magnitude = float(x.double().sum()), float(x.double().abs().sum())
    biased = judged(torch.sum, x, device_fn=lambda t: t * (1 + 1e-4))
    # A bias is visible where cancellation has not made the sum small against its allowed error
    # of 2 u sqrt(n) sum|x| (with room for the rounding of the biased result).
    if 1e-4 * abs(exact) > 1.5 * 2 * 2 ** -24 * math.sqrt(n) * magnitude:
        assert not biased.passed, biased.margin


@given(rows=st.integers(1, 8), width=st.sampled_from([8, 64, 256]), seed=st.integers(0, 2 ** 16), scale=SCALES)
@settings(max_examples=40)
def test_layer_norm_and_softmax_in_float64_pass_and_a_1e5_bias_fails(rows, width, seed, scale):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * scale
    w, b = torch.randn(width) * 0.5 + 1, torch.randn(width) * 0.1
    layer_norm = lambda t: torch.nn.functional.layer_norm(t, (width,), w.to(t.dtype), b.to(t.dtype))  # noqa: E731
    softmax = lambda t: torch.softmax(t, -1)  # noqa: E731
    for fn in (layer_norm, softmax):
        exact = judged(fn, x, device_fn=lambda t: t.double().float() if t.is_floating_point() else t)
        assert exact.passed
        two_pass = judged(fn, x, device_fn=lambda t: fn(x.double()).float() if t.shape == x.shape else t)
        assert two_pass.passed, two_pass.verdict
        biased = judged(fn, x, device_fn=lambda t: t * (1 + 1e-5) if t.shape == x.shape else t)
        assert not biased.passed, biased.margin


def test_bf16_rounding_of_an_fp32_convolution_fails_and_a_float64_one_passes():
    torch.manual_seed(0)
    x, w = torch.randn(1, 8, 12, 12), torch.randn(16, 8, 3, 3)
    conv = lambda a, b: torch.nn.functional.conv2d(a, b, padding=1)  # noqa: E731
    assert judged(conv, x, w, device_fn=lambda t: conv(x.double(), w.double()).float()).passed
    assert not judged(conv, x, w, device_fn=lambda t: t.bfloat16().float()).passed
    assert not judged(conv, x, w, device_fn=lambda t: t * (1 + 1e-4)).passed


def test_allowance_names_its_component():
    x = torch.randn(64, 64)
    verdict = judged(torch.mm, x, x, device_fn=lambda t: t * (1 + 1e-3))
    assert not verdict.passed and "(reduction)" in verdict.verdict
    verdict = judged(torch.exp, x, device_fn=lambda t: t * (1 + 1e-3))
    assert not verdict.passed and ("(ulp budget)" in verdict.verdict or "(baseline)" in verdict.verdict)


def test_an_unknown_math_library_is_an_error_not_the_default_table():
    with pytest.raises(ValueError, match="no documented ULP table for the math library 'mkl'; known: cuda, default"):
        ErrorModel("mkl")


def test_addmm_with_beta_zero_ignores_its_input_in_the_allowance():
    """beta = 0 drops the input: a huge input must not widen the allowance of mat1 @ mat2."""
    torch.manual_seed(0)
    bias, a, b = torch.full((8, 8), 1e6), torch.randn(8, 64), torch.randn(64, 8)
    bias[0, 0] = float("inf")  # ignored too: PyTorch does not propagate it
    addmm = lambda c, x, y: torch.addmm(c, x, y, beta=0)  # noqa: E731
    assert judged(addmm, bias, a, b, device_fn=lambda t: (a.double() @ b.double()).float()).passed
    assert not judged(addmm, bias, a, b, device_fn=lambda t: t * (1 + 1e-4)).passed

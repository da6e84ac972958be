"""The reorder fault, the ensemble members' model of a correct device's summation order: its draws
must have the spread of a real float32 sequential sum, on the outputs of every covered op and no other."""
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity import reorder
from parity.errormodel import ErrorModel
from parity.faults import inject, parse_fault

# Rows judged per example: the ratio of two RMS estimates over 2000 rows each has a relative standard
# deviation of 1 / sqrt(2000) = 2.2 %, so 0.85 to 1.15 leaves four of those and the model's own
# few per cent (Benford's law and the random walk are approximations); a constant off by
# sqrt(2) (the u^2 / 3 of a worst-case spacing, say) falls outside.
ROWS = 2000
LOW, HIGH = 0.85, 1.15


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _drawn(run, spec: str) -> np.ndarray:
    """What the fault adds to ``run()``'s output, in float64."""
    clean = run()
    with inject([spec]) as (fault,):
        moved = run()
    assert fault.fired == 1
    return (moved.double() - clean.double()).numpy()


@settings(max_examples=12, deadline=None)
@given(k=st.integers(64, 8192), magnitude=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 2 ** 31))
def test_a_drawn_sum_errs_like_a_sequential_float32_sum(k, magnitude, seed):
    terms = (np.random.default_rng(seed).standard_normal((ROWS, k)) * magnitude).astype(np.float32)
    sequential = np.add.accumulate(terms, axis=1, dtype=np.float32)[:, -1].astype(np.float64)
    error = sequential - terms.astype(np.float64).sum(1)
    x = torch.from_numpy(terms)
    ratio = _rms(_drawn(lambda: x.sum(1), "aten.sum:reorder=1")) / _rms(error)
    assert LOW < ratio < HIGH, f"K={k}: drawn / sequential RMS error {ratio:.3f}"


@settings(max_examples=6, deadline=None)
@given(k=st.integers(64, 2048), rows=st.sampled_from([(40, 50), (25, 80), (2000, 1)]), seed=st.integers(0, 2 ** 31))
def test_a_drawn_matmul_errs_like_a_sequential_float32_dot_product(k, rows, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows[0], k)).astype(np.float32)
    b = rng.standard_normal((k, rows[1])).astype(np.float32)
    products = (a[:, :, None] * b[None]).transpose(0, 2, 1)  # [rows, cols, k], each rounded to float32
    sequential = np.add.accumulate(products, axis=2, dtype=np.float32)[..., -1].astype(np.float64)
    error = sequential - a.astype(np.float64) @ b.astype(np.float64)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ratio = _rms(_drawn(lambda: ta @ tb, "aten.mm:reorder=1")) / _rms(error)
    assert LOW < ratio < HIGH, f"K={k}: drawn / sequential RMS error {ratio:.3f}"


def test_each_output_of_a_convolution_backward_gets_its_own_terms_and_energy():
    """The input gradient sums 4 x 9 terms and the weight gradient 8 x 24 x 24: a draw with the
    wrong count or energy is off by sqrt of their ratio (4) on one of them."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 24, 24, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    g = torch.randn(8, 4, 24, 24)

    def grads():
        x.grad = w.grad = None
        torch.nn.functional.conv2d(x, w, padding=1).backward(g)
        return x.grad.clone(), w.grad.clone()

    clean = grads()
    with inject(["aten.convolution_backward:reorder=1"]) as (fault,):
        moved = grads()
    assert fault.fired == 1
    u = torch.finfo(torch.float32).eps / 2
    sq = torch.nn.grad
    expected = [sq.conv2d_input(x.shape, w.detach() ** 2, g ** 2, padding=1) * (4 * 9),
                sq.conv2d_weight(x.detach() ** 2, w.shape, g ** 2, padding=1) * (8 * 24 * 24)]
    for name, before, after, energy in zip(("input", "weight"), clean, moved, expected):
        sigma = u * (energy.double() / (16 * math.log(2))).sqrt()
        z = _rms(((after.double() - before.double()) / sigma).numpy())
        assert 0.8 < z < 1.2, f"{name} gradient: drawn error / sigma has RMS {z:.3f}"


def test_half_precision_operands_are_squared_in_float32():
    a = torch.full((4, 512), 300.0, dtype=torch.float16)
    (energy, k), = reorder.energies(torch.ops.aten.mm.default, (a, a.t()), {})
    assert k == 512 and torch.isfinite(energy).all()
    assert math.isclose(float(energy[0, 0]), 512 * 300.0 ** 4, rel_tol=1e-4)  # a float32 GEMM, not float16 (inf)


def test_draws_are_deterministic_and_scale_with_the_value():
    x = torch.randn(64, 4096)
    once, again, tripled = (_drawn(lambda: x.sum(1), spec)
                            for spec in ("aten.sum:reorder=1", "aten.sum:reorder=1", "aten.sum:reorder=3"))
    assert np.array_equal(once, again) and _rms(once) > 0
    assert 2.9 < _rms(tripled) / _rms(once) < 3.1  # the outputs' own float32 rounding blurs the factor
    assert not _drawn(lambda: x.sum(1), "aten.sum:reorder=0").any()


def test_every_op_reorder_moves_covered_reductions_and_leaves_the_rest_alone():
    a, b = torch.randn(16, 256), torch.randn(256, 16)
    with inject(["*:reorder=1"]) as (fault,):
        product, total, shifted, top = a @ b, a.sum(), a + 1, a.amax(1)
    assert fault.fired == 2 and sorted(fault.fired_on) == ["aten.mm.default", "aten.sum.default"]
    assert not torch.equal(product, a @ b) and not torch.equal(total, a.sum())
    assert torch.equal(shifted, a + 1) and torch.equal(top, a.amax(1))


def test_the_correct_device_profile_reorders_every_covered_reduction():
    profile = ErrorModel().correct_device_profile()
    assert [s for s in profile if ":reorder=" in s] == [f"aten.{name}:reorder=1" for name in reorder.COVERED]
    for spec in profile:
        parse_fault(spec)

"""The ensemble rule (:func:`parity.ensemble.judge_against_ensemble`) from both sides, for both ways
of sizing a run's error: another draw of the members' errors passes, a dense error beyond the
allowance fails, and a sparse heavy tail fails the RMS but not the median."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.ensemble import NU_MAX, STATISTICS, judge_against_ensemble, scale, threshold

MEMBERS = 3


def _runs(n: int, magnitude: float, dtype: torch.dtype, seed: int):
    """A golden tensor of ``n`` elements and a baseline plus MEMBERS members, each off by its own
    Gaussian draw of about 1e-3 of ``magnitude`` (far above ``dtype``'s rounding)."""
    rng = np.random.default_rng(seed)
    golden = rng.normal(0.0, magnitude, n)
    errors = [rng.normal(0.0, 1e-3 * magnitude, n) for _ in range(MEMBERS + 1)]
    runs = [torch.tensor(golden + e, dtype=dtype) for e in errors]
    return torch.tensor(golden), runs


def _errors(run: torch.Tensor, golden: torch.Tensor) -> np.ndarray:
    return run.double().numpy() - golden.numpy()


def _judge(device_errors: np.ndarray, golden: torch.Tensor, runs, statistic: str):
    device = torch.tensor(golden.numpy() + device_errors, dtype=runs[0].dtype)
    return judge_against_ensemble(device, runs[0], golden, runs, tests=1, statistic=statistic)


SIZES = st.integers(1, 4000)
MAGNITUDES = st.floats(1e-8, 1e4)
DTYPES = st.sampled_from([torch.float32, torch.float64])


@settings(max_examples=40, deadline=None)
@given(n=SIZES, magnitude=MAGNITUDES, dtype=DTYPES, seed=st.integers(0, 2**31), statistic=st.sampled_from(STATISTICS))
def test_the_baselines_own_error_rearranged_passes(n, magnitude, dtype, seed, statistic):
    """Any rearrangement of the baseline's error has the baseline's size, and the baseline is one of
    the four runs whose mean square is the spread: S <= 4, below every threshold."""
    golden, runs = _runs(n, magnitude, dtype, seed)
    errors = np.random.default_rng(seed + 1).permutation(_errors(runs[0], golden))
    result = _judge(errors, golden, runs, statistic)
    assert result.passed, result.verdict


@settings(max_examples=40, deadline=None)
@given(n=SIZES, magnitude=MAGNITUDES, dtype=DTYPES, seed=st.integers(0, 2**31), statistic=st.sampled_from(STATISTICS),
       beyond=st.floats(1.02, 100.0))
def test_a_dense_error_beyond_the_allowance_fails(n, magnitude, dtype, seed, statistic, beyond):
    """Every element's error grown until its size is ``beyond`` times the largest any run could
    be allowed (sqrt(threshold) times the largest run's size) fails."""
    golden, runs = _runs(n, magnitude, dtype, seed)
    errors = _errors(runs[0], golden)
    largest = max(scale(_errors(r, golden), statistic) for r in runs)
    bound = np.sqrt(threshold(min(n, NU_MAX), len(runs), 1)) * largest
    result = _judge(errors * beyond * bound / scale(errors, statistic), golden, runs, statistic)
    assert not result.passed
    assert result.margin > 1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2000, 20000), seed=st.integers(0, 2**31), share=st.floats(0.01, 0.05),
       size=st.floats(30.0, 300.0))
def test_a_sparse_heavy_tail_fails_the_rms_and_passes_the_median(n, seed, share, size):
    """The shape of a correct device's parameters after AdamW steps (measured: 4 % of a weight more
    than 10x the members' RMS after a ReLU flipped at one step): the RMS counts the tail, the
    median does not."""
    golden, runs = _runs(n, 1.0, torch.float64, seed)
    errors = _errors(runs[0], golden).copy()
    tail = np.random.default_rng(seed + 2).choice(n, int(share * n), replace=False)
    errors[tail] *= size
    assert not _judge(errors, golden, runs, "rms").passed
    assert _judge(errors, golden, runs, "median").passed


def test_the_median_of_a_gaussian_error_is_its_rms_times_a_known_factor():
    """The median square of a normal draw is 0.455 of its variance: the two statistics size the
    same dense error alike, and each is compared with the same statistic of the members."""
    errors = np.random.default_rng(0).normal(0.0, 2.0, 200_000)
    assert scale(errors, "median") == pytest.approx(2.0 * np.sqrt(0.4549), rel=0.01)
    assert scale(errors, "rms") == pytest.approx(2.0, rel=0.01)
    assert scale(np.zeros(0), "median") == 0.0


def test_an_unknown_statistic_is_refused():
    from parity.compare import compare_part

    with pytest.raises(ValueError, match="statistic must be one of"):
        compare_part("p", torch.nn.Linear(2, 2), torch.ones(2), lambda m, x: m(x), "cpu", "fp32",
                     statistic="mean")

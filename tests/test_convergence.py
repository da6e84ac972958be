"""The convergence verdict against a reference curve, curve files and the plot."""
import json
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from training.convergence import SIGN_OFF_RATE, judge, load_curves, olympic_mean, plot, save_curves


def curve(*maps):
    return [{"samples": 100 * (i + 1), "mAP": m} for i, m in enumerate(maps)]


def test_one_run_per_side_passes_within_the_tolerance_and_fails_outside():
    ok = judge([curve(0.1, 0.27)], [curve(0.12, 0.30)], tolerance=0.05)
    assert ok.passed and ok.method == "final mAP difference"
    assert ok.text().startswith("PASS: device 0.2700 vs reference 0.3000")
    bad = judge([curve(0.1, 0.20)], [curve(0.12, 0.30)], tolerance=0.05)
    assert not bad.passed and bad.text().startswith("FAIL")
    assert not judge([curve(0.5)], [curve(0.30)], tolerance=0.05).passed


def test_seeds_use_welch_t_tests():
    ref = [curve(0.30), curve(0.31), curve(0.29)]
    same = judge([curve(0.295), curve(0.305), curve(0.30)], ref, tolerance=0.02)
    assert same.passed and same.p_value is not None and "t-tests over 3 vs 3 seeds" in same.method
    worse = judge([curve(0.20), curve(0.21), curve(0.19)], ref, tolerance=0.02)
    assert not worse.passed and worse.p_value < 0.05


def test_olympic_mean_drops_best_and_worst_from_five():
    assert olympic_mean([1, 2, 3]) == 2
    assert olympic_mean([0, 2, 2, 2, 100]) == 2


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="at least one"):
        judge([], [curve(0.3)], 0.05)
    with pytest.raises(ValueError, match="no mAP point"):
        judge([[]], [curve(0.3)], 0.05)
    with pytest.raises(ValueError, match="tolerance"):
        judge([curve(0.3)], [curve(0.3)], -1)


def test_curve_files_round_trip_and_bad_files_are_named(tmp_path):
    path = tmp_path / "curve.json"
    save_curves(path, [curve(0.1, 0.2)], {"device": "cuda"})
    assert load_curves(path) == [curve(0.1, 0.2)]
    assert json.loads(path.read_text())["meta"] == {"device": "cuda"}
    with pytest.raises(ValueError, match="does not exist"):
        load_curves(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_curves(tmp_path / "bad.json")
    (tmp_path / "shape.json").write_text('{"curves": [[{"mAP": 1}]]}')
    with pytest.raises(ValueError, match="expected"):
        load_curves(tmp_path / "shape.json")


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "curve.png"
    plot(path, [curve(0.1, 0.2), curve(0.12, 0.22)], [curve(0.1, 0.21)], "DETR tiny 1x1 fp32", target=0.25)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def _seeds(means, sds, samples):
    """Reference curves: one per seed, the k-th point at samples[k] with mAP means[k] + sds[k] * z."""
    zs = [-1.2, -0.4, 0.0, 0.5, 1.1]
    return [[{"samples": s, "mAP": m + sd * z} for s, m, sd in zip(samples, means, sds)] for z in zs]


def _half_width(values, runs=1, n=5):
    """The half-width of the prediction interval of the mean of ``runs`` more runs over n seeds,
    two statistics (Bonferroni)."""
    t = stats.t.ppf(1 - 0.01 / (2 * 2), n - 1)
    return t * statistics.stdev(values) * (1 / runs + 1 / n) ** 0.5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 0.6), min_size=1, max_size=6), st.floats(0.0, 0.05), st.floats(0.0, 0.05))
def test_a_device_on_the_reference_mean_passes_and_one_beyond_the_interval_fails(means, sd, tolerance):
    from training.convergence import judge_against_seeds

    samples = [1000.0 * (k + 1) for k in range(len(means))]
    reference = _seeds(means, [sd] * len(means), samples)
    mean_curve = [{"samples": s, "mAP": sum(c[k]["mAP"] for c in reference) / 5} for k, s in enumerate(samples)]
    assert judge_against_seeds([mean_curve], reference, tolerance).passed
    spread = _half_width([c[-1]["mAP"] for c in reference]) if sd else 0.0
    beyond = mean_curve[:-1] + [{"samples": samples[-1], "mAP": mean_curve[-1]["mAP"] + tolerance + spread + 1e-3}]
    verdict = judge_against_seeds([beyond], reference, tolerance)
    assert not verdict.passed and "final mAP" in verdict.method


@settings(max_examples=30, deadline=None)
@given(st.floats(0.2, 0.5), st.floats(0.002, 0.03), st.integers(3, 12))
def test_a_run_that_gets_there_late_fails_by_its_curve_mean(final, sd, points):
    """Same final mAP, but every earlier evaluation lower by more than the curve mean's interval."""
    from training.convergence import judge_against_seeds

    samples = [1000.0 * (k + 1) for k in range(points)]
    means = [final * (k + 1) / points for k in range(points)]
    reference = _seeds(means, [sd] * points, samples)
    mean_curve = [{"samples": s, "mAP": sum(c[k]["mAP"] for c in reference) / 5} for k, s in enumerate(samples)]
    curve_means = [sum(p["mAP"] for p in c) / points for c in reference]
    lag = (_half_width(curve_means) + 1e-3) * points / (points - 1)
    late = [{"samples": p["samples"], "mAP": p["mAP"] - lag} for p in mean_curve[:-1]] + mean_curve[-1:]
    verdict = judge_against_seeds([late], reference)
    assert not verdict.passed and verdict.device_final == pytest.approx(verdict.reference_final)


def _false_positive_rate(judge, runs: int, seeds: int, seed: int, trials: int = 3000) -> float:
    """The fraction of ``trials`` in which ``judge`` fails ``runs`` device runs drawn like its
    ``seeds`` reference runs (a shared curve, per-run level and per-point noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = np.arange(1, 11) * 1024.0
    shape = 0.42 * (1 - np.exp(-samples / 8000))
    failed = 0
    for _ in range(trials):
        drawn = shape + rng.normal(0, 0.01, (runs + seeds, 1)) + rng.normal(0, 0.008, (runs + seeds, len(samples)))
        curves = [[{"samples": s, "mAP": float(m)} for s, m in zip(samples, r)] for r in drawn]
        failed += not judge(curves[:runs], curves[runs:]).passed
    return failed / trials


# the stated 1 %, and three standard errors of 3,000 trials above it
AT_MOST = 0.01 + 3 * (0.01 * 0.99 / 3000) ** 0.5


@pytest.mark.parametrize("runs, seed", [(1, 0), (3, 1)])
def test_the_stated_false_positive_rate_holds_for_runs_distributed_like_the_reference(runs, seed):
    """5 reference runs and ``runs`` device runs drawn from one distribution: the device fails at
    most at the stated 1 %, and not far below it."""
    from training.convergence import judge_against_seeds

    assert 0.002 <= _false_positive_rate(judge_against_seeds, runs, 5, seed) <= AT_MOST


@settings(max_examples=40, deadline=None)
@given(st.floats(0.1, 0.6), st.floats(0.005, 0.05), st.integers(2, 6), st.floats(0.05, 0.95))
def test_more_runs_narrow_the_interval_by_their_mean(final, sd, runs, where):
    """A shift inside one run's interval but beyond the interval of the mean of ``runs`` runs
    passes one run and fails the runs, which all sit at the shifted curve (and their noise
    cancels: one run below the shifted mean, one above)."""
    from training.convergence import judge_against_seeds

    samples = [1000.0, 2000.0]
    reference = _seeds([final / 2, final], [sd, sd], samples)
    finals = [c[-1]["mAP"] for c in reference]
    narrow, wide = _half_width(finals, runs), _half_width(finals)
    shift = narrow + where * (wide - narrow)
    mean = [sum(c[k]["mAP"] for c in reference) / 5 for k in range(2)]
    shifted = [{"samples": s, "mAP": m + shift * k} for k, (s, m) in enumerate(zip(samples, mean))]
    assert judge_against_seeds([shifted], reference).passed
    noise = [[{"samples": p["samples"], "mAP": p["mAP"] + e * sd} for p in shifted] for e in (-1, 1)]
    device = (noise + [shifted] * runs)[:runs]
    verdict = judge_against_seeds(device, reference)
    assert not verdict.passed and f"the mean of {runs} run(s)" in verdict.method


def test_runs_that_stop_at_the_target_are_judged_up_to_the_shortest():
    from training.convergence import judge_against_seeds

    reference = _seeds([0.1, 0.2, 0.3], [0.01] * 3, [1000.0, 2000.0, 3000.0])
    short = [{"samples": 1000.0, "mAP": 0.1}, {"samples": 2000.0, "mAP": 0.2}]
    verdict = judge_against_seeds([short + [{"samples": 3000.0, "mAP": 0.9}], short], reference)
    assert verdict.passed and "the mean of 2 run(s)" in verdict.method and "(up to 2000)" in verdict.method
    with pytest.raises(ValueError, match="every device run needs at least one evaluation"):
        judge_against_seeds([short, [{"samples": 1000.0, "mAP": None}]], reference)


def test_points_beyond_the_reference_are_not_judged_and_one_seed_is_not_a_distribution():
    from training.convergence import judge_against_seeds

    reference = _seeds([0.1, 0.2], [0.01, 0.01], [1000.0, 2000.0])
    early = [{"samples": 500.0, "mAP": 0.05}, {"samples": 9000.0, "mAP": 0.9}]
    verdict = judge_against_seeds([early], reference, 0.0)
    assert (
        verdict.passed
        and "the mean of 1 run(s) against 5 reference seeds at the same trained samples (up to 500)" in verdict.method
    )
    with pytest.raises(ValueError, match="no evaluation of the device"):
        judge_against_seeds([[{"samples": 9000.0, "mAP": 0.9}]], reference, 0.0)
    with pytest.raises(ValueError, match="at least 2 reference seeds"):
        judge_against_seeds([early], reference[:1], 0.0)


def test_the_published_target_judges_the_best_map_of_every_run():
    from training.convergence import judge_target

    runs = [[{"samples": 1e6, "mAP": 0.30}, {"samples": 2e6, "mAP": 0.39}], [{"samples": 1e6, "mAP": 0.41}]]
    verdict = judge_target(runs, 0.42, 0.05, "FlagPerf")
    assert verdict.passed and verdict.device_final == 0.39 and "published target (FlagPerf)" in verdict.method
    assert not judge_target(runs, 0.42, 0.02, "FlagPerf").passed


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.05, 0.6), min_size=2, max_size=8), st.floats(0.001, 0.05), st.integers(1, 6),
       st.floats(0.0, 2.0))
def test_the_sign_off_fails_a_device_below_its_floor_and_never_one_above_the_mean(means, sd, runs, above):
    """One-sided on the curve mean: any device at or above the seeds' mean passes, however far; one
    whose every point sits lower than the one-sided interval fails."""
    from training.convergence import judge_sign_off, sign_off

    samples = [1000.0 * (k + 1) for k in range(len(means))]
    reference = _seeds(means, [sd] * len(means), samples)
    mean_curve = [{"samples": s, "mAP": sum(c[k]["mAP"] for c in reference) / 5} for k, s in enumerate(samples)]
    higher = [{**p, "mAP": p["mAP"] + above} for p in mean_curve]
    assert sign_off([higher] * runs, reference).passed
    curve_means = [sum(p["mAP"] for p in c) / len(samples) for c in reference]
    floor = stats.t.ppf(1 - SIGN_OFF_RATE, 4) * statistics.stdev(curve_means) * (1 / runs + 1 / 5) ** 0.5
    lower = [{**p, "mAP": p["mAP"] - floor - 1e-3} for p in mean_curve]
    verdict = sign_off([lower] * runs, reference)
    assert not verdict.passed and verdict.method.startswith(f"sign-off: the curve mean of {runs} run(s)")
    assert not judge_sign_off([lower] * runs, reference).passed
    # within the two-sided interval but below the one-sided floor: only the sign-off fails it
    assert floor < _half_width(curve_means, runs)


@pytest.mark.parametrize("runs, seed", [(1, 0), (5, 1)])
def test_the_sign_off_keeps_its_false_positive_rate(runs, seed):
    """Runs drawn like the reference (as above, 20 seeds): the one-sided test fails at most at its
    stated rate, and not far below it."""
    from training.convergence import sign_off

    rate = _false_positive_rate(sign_off, runs, 20, seed)
    assert 0.003 <= rate <= SIGN_OFF_RATE + 3 * (SIGN_OFF_RATE * (1 - SIGN_OFF_RATE) / 3000) ** 0.5, rate

"""The convergence verdict against a reference curve, curve files and the plot."""
import json

import pytest

from training.convergence import judge, load_curves, olympic_mean, plot, save_curves


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

"""FlagPerf's metric arithmetic from a run's counters, and the checks of multi-rank runs."""
import pytest

from training.metrics import MetricsError, flagperf_metrics, ranks_agree


def counters(**changes):
    result = {"samples": 1200.0, "train_time": 60.0, "eval_time": 20.0, "core_time": 40.0, "steps": 150,
              "e2e_time": 95.0, "mAP": 0.31, "best_mAP": 0.33, "target_mAP": 0.25,
              "target_reached": {"elapsed": 70.5, "steps": 120}, "mem_actual_gib": 1.5, "mem_total_gib": 24.0}
    result.update(changes)
    return result


def test_throughputs_are_global_samples_over_each_time():
    m = flagperf_metrics(counters(), e2e_time=101.0)
    assert m["p_whole"] == pytest.approx(1200 / 80)
    assert m["p_train"] == pytest.approx(1200 / 60)
    assert m["p_core"] == pytest.approx(1200 / 40)
    assert m["p_core"] > m["p_train"] > m["p_whole"]
    assert m["e2e_time"] == 101.0
    assert (m["time_to_target"], m["steps_to_target"]) == (70.5, 120)
    assert (m["mAP"], m["best_mAP"], m["mem_actual_gib"]) == (0.31, 0.33, 1.5)


def test_without_the_launcher_time_the_process_e2e_time_is_used():
    assert flagperf_metrics(counters())["e2e_time"] == 95.0


def test_a_run_that_missed_the_target_has_no_time_to_target():
    m = flagperf_metrics(counters(target_reached=None))
    assert m["time_to_target"] is None and m["steps_to_target"] is None


@pytest.mark.parametrize("field", ["train_time", "core_time"])
def test_zero_time_is_an_error_not_infinity(field):
    with pytest.raises(MetricsError, match="not a throughput"):
        flagperf_metrics(counters(**{field: 0.0}, eval_time=0.0))


def test_missing_counters_are_named():
    result = counters()
    del result["core_time"]
    with pytest.raises(MetricsError, match="core_time"):
        flagperf_metrics(result)


def test_ranks_agree_only_when_every_rank_reported_the_same_digest():
    assert ranks_agree({"world_size": 3, "param_digests": ["a", "a", "a"]})
    assert not ranks_agree({"world_size": 3, "param_digests": ["a", "b", "a"]})
    assert not ranks_agree({"world_size": 3, "param_digests": ["a", "a"]})

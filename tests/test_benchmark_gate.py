"""The benchmark regression gate end to end: a saved run of the tiny training-step benchmark, then
``--benchmark-compare --benchmark-compare-fail`` with nothing changed (must pass) and with a slow
op injected (must fail and name the benchmark). Each run is a pytest subprocess, as in CI.

The CPU this runs on may be shared, so: one OpenMP thread (two threads on two busy cores are
several times slower and erratic), medians, a 100% threshold, and a delay sized from the saved
run's own median, so that the faulted median is at least 3x the baseline whatever the load.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fixtures.steps import TrainStep, Workload
from markers import options
from markers.state import STATE, SuiteState
from runtime.device import Device, resolve

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = Workload("tiny", batch_size=1, image_size=64)
NODE = f"test_train_step[{WORKLOAD.id}-fp32]"
THRESHOLD = "median:100%"
ARGS = ["-p", "no:cacheprovider", "-q", "-m", "benchmark", "--xpu", "cpu", "--precision", "fp32",
        "--model-config", WORKLOAD.model, "--bench-batch-size", str(WORKLOAD.batch_size),
        "--bench-image-size", str(WORKLOAD.image_size), "--bench-warmup", "1",
        "--benchmark-min-rounds", "5", "--benchmark-max-time", "0", "--benchmark-columns", "median,rounds"]


def run_pytest(*extra: str, cwd: Path, storage: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTEST_ADDOPTS", None)
    test = ROOT / "suite" / "test_benchmark.py" if cwd != ROOT else Path("suite/test_benchmark.py")
    cmd = [sys.executable, "-m", "pytest", f"{test}::test_train_step", *ARGS,
           f"--benchmark-storage=file://{storage}", *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The saved run, started from the repository root: its storage folder, JSON and median seconds."""
    storage = tmp_path_factory.mktemp("benchmarks")
    done = run_pytest("--benchmark-autosave", cwd=ROOT, storage=storage)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = list(storage.glob("*/0001_*.json"))
    assert len(saved) == 1, f"nothing saved under {storage}: {done.stdout}"
    run = json.loads(saved[0].read_text())
    assert [b["name"] for b in run["benchmarks"]] == [NODE]
    return SimpleNamespace(storage=storage, run=run, median=run["benchmarks"][0]["stats"]["median"])


def test_saved_run_records_the_figures(baseline):
    info = baseline.run["benchmarks"][0]["extra_info"]
    for key in ("samples_per_s", "p_core", "batch_size", "image_size", "precision", "fix_hp",
                "flops_per_sample", "tflops_per_s", "peak_memory_gib", "total_memory_gib"):
        assert key in info, key
    assert info["batch_size"] == 1 and info["image_size"] == "64x96" and info["precision"] == "fp32"
    assert info["samples_per_s"] == pytest.approx(1 / baseline.median)
    assert info["flops_per_sample"] > 1e8 and info["tflops_per_s"] > 0
    device = baseline.run["machine_info"]["device_under_test"]
    assert device["type"] == "cpu" and device["count"] == 1 and device["total_memory_gib"] > 0
    assert device["torch"] == torch.__version__


def test_gate_passes_when_nothing_changed(baseline, tmp_path):
    storage = baseline.storage
    # Started elsewhere: the node ids still match the saved run's (the rootdir is fixed).
    for attempt in range(2):  # one retry: a busy neighbour can double one run's time
        done = run_pytest("--benchmark-compare", f"--benchmark-compare-fail={THRESHOLD}", cwd=tmp_path, storage=storage)
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{NODE} (0001_" in done.stdout, "the saved run was not matched by node id:\n" + done.stdout


def test_gate_trips_on_a_slow_op(baseline, tmp_path):
    storage, median = baseline.storage, baseline.median
    step = TrainStep(WORKLOAD, Device(torch.device("cpu")), "fp32", ["aten.addmm:delay=0"])
    step()
    calls = step.fired()["aten.addmm:delay=0"]
    assert calls > 0
    delay = 3 * median / calls
    done = run_pytest("--benchmark-compare", f"--benchmark-compare-fail={THRESHOLD}",
                      f"--inject-fault=aten.addmm:delay={delay:.6f}", cwd=tmp_path, storage=storage)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Performance has regressed" in done.stdout + done.stderr
    assert f"{NODE} (0001_" in done.stdout + done.stderr


def test_default_storage_is_rooted_in_the_repository(tmp_path):
    option = SimpleNamespace(benchmark_storage=options.DEFAULT_STORAGE, bench_batch_size=None,
                             bench_image_size=None, bench_warmup=None)
    config = SimpleNamespace(
        stash={STATE: SuiteState(xpu=resolve("cpu"), precisions=["fp32"], model_config="tiny")},
        rootpath=ROOT,
        option=option,
        pluginmanager=SimpleNamespace(hasplugin=lambda name: name == "benchmark"),
        getoption=lambda name: getattr(option, name.lstrip("-").replace("-", "_")),
    )
    options.root_benchmark_storage(config)
    assert option.benchmark_storage == f"file://{ROOT / '.benchmarks'}"
    option.benchmark_storage = str(tmp_path)
    options.root_benchmark_storage(config)
    assert option.benchmark_storage == str(tmp_path)


def test_the_gate_without_a_saved_run_is_a_usage_error_before_any_benchmark(tmp_path):
    done = run_pytest("--benchmark-compare", f"--benchmark-compare-fail={THRESHOLD}", cwd=ROOT,
                      storage=tmp_path / "empty")
    out = done.stdout + done.stderr
    assert done.returncode == 4 and "--benchmark-compare-fail: no saved run to compare against" in out, out
    assert "passed" not in out


def test_a_comparison_that_matches_no_benchmark_fails_and_lists_both_sides(baseline, tmp_path):
    other = ["--bench-batch-size", "2"]  # another node id than the saved run's
    done = run_pytest("--benchmark-compare", *other, cwd=ROOT, storage=baseline.storage)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "ERROR: --benchmark-compare matched none of this run's benchmarks, so nothing was compared" in out
    assert f"{NODE}" in out and "bs2" in out
    warned = run_pytest("--benchmark-compare", *other, "--benchmark-compare-unmatched=warn", cwd=ROOT,
                        storage=baseline.storage)
    assert warned.returncode == 0 and "warning: --benchmark-compare matched none" in warned.stdout, warned.stdout


def test_a_corrupt_saved_run_is_a_usage_error_before_any_benchmark(baseline, tmp_path):
    import shutil

    storage = tmp_path / "corrupt"
    shutil.copytree(baseline.storage, storage)
    (saved,) = storage.glob("*/0001_*.json")
    saved.write_text("{ truncated")
    for extra in ([], [f"--benchmark-compare-fail={THRESHOLD}"]):
        done = run_pytest("--benchmark-compare", *extra, cwd=ROOT, storage=storage)
        out = done.stdout + done.stderr
        assert done.returncode == 4 and "no saved run to compare against could be loaded" in out, out
        assert "passed" not in out

"""``pytest -m training`` end to end, kept short: a bounded 1x8 run writes its row, curve, table and DDP equivalence;
a 1x1 run stopped before its target fails with the reason and still adds its row to the report."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--xpu", "cpu", "-p", "no:cacheprovider", "--train-arg=--train-limit=128", "--train-arg=--val-limit=8"]


def suite(*args, report_dir):
    return subprocess.run([sys.executable, "-m", "pytest", *SHORT, f"--report-dir={report_dir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_training_runs_write_merged_reports(tmp_path):
    reports = tmp_path / "reports"
    bounded = suite("-m", "training and 1x8", "--train-max-steps=8", report_dir=reports)
    assert bounded.returncode == 0, bounded.stdout[-3000:]
    assert "[cpu 1x8 fp32 seed 42] epoch 0 step 1/8" in bounded.stdout  # progress while it runs
    assert "DETR training (FlagPerf metrics)" in bounded.stdout and "| CPU 1x8 | fp32 | bs=2" in bounded.stdout
    assert (
        "cpu 1x8: convergence not judged: a bounded multi-rank run on the CPU makes no convergence claim"
        in bounded.stdout
    )
    assert re.search(
        r"cpu 1x8: DDP equivalence over steps \[0, 1\] PASS, worst gradient margin 0\.\d+", bounded.stdout
    ), bounded.stdout[-2000:]

    short = suite("-m", "training and 1x1", "--train-max-steps=2", report_dir=reports)
    assert short.returncode == 1
    assert "did not reach the target 0.25 in 2 steps" in short.stdout

    compiled = suite("-m", "training and 1x1", "--train-max-steps=2", "--compile", "aot_eager", report_dir=reports)
    assert compiled.returncode == 1 and "did not reach the target 0.25 in 2 steps" in compiled.stdout
    assert "[cpu 1x1 fp32 compiled aot_eager seed 42] epoch 0 step 1/2" in compiled.stdout
    assert "| CPU 1x1 compiled aot_eager | fp32 |" in compiled.stdout

    data = json.loads((reports / "training_report.json").read_text())
    compiled_row, = [r for r in data["rows"] if r["compiled"]]
    assert compiled_row["compiled"] == "aot_eager" and compiled_row["compile"]["graphs"] >= 1
    assert compiled_row["compile"]["backend_compile_s"] > 0
    rows = {r["config"]: r for r in data["rows"] if not r["compiled"]}
    assert set(rows) == {"1x1", "1x8"}
    assert rows["1x8"]["world_size"] == 8 and rows["1x8"]["ranks_agree"] and rows["1x8"]["bounded"]
    assert rows["1x8"]["reference"] is None and rows["1x8"]["ddp_equivalence"]["passed"]
    assert rows["1x1"]["target_mAP"] == 0.25 and rows["1x1"]["time_to_target"] is None
    for row in rows.values():
        assert row["p_core"] > row["p_train"] > row["p_whole"] > 0 and row["e2e_time"] > 0
        assert (reports / row["plot"]).read_bytes()[:4] == b"\x89PNG"
    text = (reports / "training_report.md").read_text()
    assert "| CPU 1x1 | fp32 |" in text and "| CPU 1x8 | fp32 |" in text and "0.25 not reached" in text
    assert "DDP equivalence over steps [0, 1]: pass" in text


@pytest.mark.parametrize("topology, fault", [("1x8", "3:1:grad-sum"), ("2x8", "11:1:grad-local")])
def test_a_wrong_gradient_all_reduce_fails_ddp_equivalence(tmp_path, topology, fault):
    """A rank whose all-reduce sums, or keeps its own gradient, fails the run at that step, though
    clipping and AdamW leave the parameters of a summed gradient nearly where they should be."""
    done = suite("-m", f"training and {topology}", "--train-max-steps=2", f"--train-arg=--fail-at={fault}",
                 report_dir=tmp_path / "reports")
    rank = fault.split(":")[0]
    assert done.returncode == 1, done.stdout[-3000:]
    assert re.search(rf"DDP equivalence fails at step 1: the gradient \S+ on rank {rank} is \S+ from one process on "
                     rf"the global batch, \S+ times its tolerance", done.stdout), done.stdout[-3000:]


def test_a_1x1_run_of_the_unchanged_recipe_is_judged_against_the_shipped_seeds(tmp_path):
    """No --train-arg: the shipped curves apply, and the CPU is judged by them like any other device
    (here up to the first evaluation, at step 128, where a target of 0.01 stops the run)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--xpu",
            "cpu",
            "-p",
            "no:cacheprovider",
            "-m",
            "training and 1x1",
            "--target-map=0.01",
            f"--report-dir={tmp_path / 'reports'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(
        r"cpu 1x1: convergence PASS: device 0\.\d+ vs reference 0\.\d+ \(tolerance 0\.000, "
        r"the mean of 1 run\(s\) against "
        r"\d+ reference seeds at the same trained samples \(up to 1024\)",
        done.stdout,
    ), done.stdout[-3000:]
    (row,) = json.loads((tmp_path / "reports" / "training_report.json").read_text())["rows"]
    assert "CPU fp32 seeds shipped with the suite" in row["reference"] and len(row["curves"]["reference"]) >= 5

"""``pytest -m training`` end to end, kept short: a bounded 1x8 run writes its row, curve and table;
a 1x1 run stopped before its target fails with the reason and still adds its row to the report."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--xpu", "cpu", "-p", "no:cacheprovider", "--train-arg=--train-limit=128", "--train-arg=--val-limit=8"]


def suite(*args, report_dir):
    return subprocess.run([sys.executable, "-m", "pytest", *SHORT, f"--report-dir={report_dir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_training_runs_write_merged_reports(tmp_path):
    reports = tmp_path / "reports"
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"curves": [[{"samples": 32, "mAP": 0.0}]]}))
    # Without the warm-up the loss visibly falls within 8 steps.
    bounded = suite("-m", "training and 1x8", "--train-max-steps=8", "--train-arg=--warmup-steps=0",
                    f"--reference-curve={reference}", report_dir=reports)
    assert bounded.returncode == 0, bounded.stdout[-3000:]
    assert "[cpu 1x8 fp32 seed 42] epoch 0 step 1/8" in bounded.stdout  # progress while it runs
    assert "DETR training (FlagPerf metrics)" in bounded.stdout and "| CPU 1x8 | fp32 | bs=2" in bounded.stdout
    assert re.search(r"cpu 1x8: convergence PASS: device 0\.0\d\d\d vs reference 0\.0000 \(tolerance 0\.050", bounded.stdout), bounded.stdout[-2000:]

    short = suite("-m", "training and 1x1", "--train-max-steps=2", report_dir=reports)
    assert short.returncode == 1
    assert "did not reach the target 0.25 in 2 steps" in short.stdout

    data = json.loads((reports / "training_report.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"1x1", "1x8"}
    assert rows["1x8"]["world_size"] == 8 and rows["1x8"]["ranks_agree"] and rows["1x8"]["bounded"]
    assert rows["1x8"]["reference"] == f"curve file {reference}"
    assert rows["1x1"]["target_mAP"] == 0.25 and rows["1x1"]["time_to_target"] is None
    for row in rows.values():
        assert row["p_core"] > row["p_train"] > row["p_whole"] > 0 and row["e2e_time"] > 0
        assert (reports / row["plot"]).read_bytes()[:4] == b"\x89PNG"
    text = (reports / "training_report.md").read_text()
    assert "| CPU 1x1 | fp32 |" in text and "| CPU 1x8 | fp32 |" in text and "0.25 not reached" in text

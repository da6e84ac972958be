"""The training report: rows merged across runs, the FlagPerf vendor-page Markdown, atomic files,
and an unreadable earlier report kept aside instead of lost."""
import json

import torch

from training import environment
from training.report import JSON_NAME, MD_NAME, load_rows, merge_rows, render_markdown, write_report

ENV = {
    "hardware": "Test CPU, 2 logical cores, 24.0 GiB memory",
    "accelerator": {"name": "Acme X1", "count": 8, "memory_gib": 32.0},
    "interconnect": "unknown",
    "os": "Linux",
    "kernel": "6.1",
    "driver": "acme 1.2",
    "python": "3.11",
    "framework": "PyTorch 2.14.1",
    "plugins": {"torch_acme": "0.3"},
    "dependencies": {"numpy": "2.0"},
}


def row(config="1x1", device="cpu", precision="fp32", **changes):
    r = {
        "config": config,
        "world_size": int(config[0]) * int(config[2]),
        "device": device,
        "device_name": device.upper(),
        "precision": precision,
        "model": "tiny",
        "dataset": "synthetic",
        "fix_hp": {"batch_size_per_device": 8, "lr": 0.0002, "max_steps": None},
        "e2e_time": 512.3,
        "p_whole": 20.5,
        "p_train": 22.25,
        "p_core": 30.125,
        "mAP": 0.2612,
        "best_mAP": 0.2701,
        "target_mAP": 0.25,
        "time_to_target": 480.2,
        "steps_to_target": 1400,
        "mem_actual_gib": 1.23,
        "mem_total_gib": 24.0,
        "verdict": {"text": "PASS: device 0.26 vs reference 0.27"},
        "plot": "curve_cpu_1x1_fp32.png",
        "reference": "the CPU",
    }
    r.update(changes)
    return r


def test_a_new_run_replaces_its_own_row_and_keeps_the_others():
    rows = merge_rows([], row("2x8", mAP=0.1))
    rows = merge_rows(rows, row("1x1"))
    rows = merge_rows(rows, row("2x8", mAP=0.2))
    rows = merge_rows(rows, row("1x1", precision="amp"))
    assert [(r["config"], r["precision"], r["mAP"]) for r in rows] == [
        ("1x1", "amp", 0.2612),
        ("1x1", "fp32", 0.2612),
        ("2x8", "fp32", 0.2),
    ]


def test_markdown_has_the_vendor_page_sections_and_one_row_per_configuration():
    text = render_markdown([row("1x1"), row("1x8", mAP=None, best_mAP=None, target_mAP=None, verdict=None)], ENV)
    for heading in ("## Environment", "## General metrics", "## Performance", "## Convergence against the reference"):
        assert heading in text
    for fact in ("Acme X1 x 8, 32.0 GiB", "acme 1.2", "torch_acme 0.3", "numpy 2.0", "kernel: 6.1", "PyTorch 2.14.1"):
        assert fact in text
    assert "| config | precision | fix_hp | e2e_time | p_whole | p_train | p_core | mAP | target | mem |" in text
    assert (
        "| CPU 1x1 | fp32 | bs=8, lr=0.0002 | 512 | 20.50 | 22.25 | 30.12 | 0.2612 (best 0.2701) "
        "| 0.25 in 480 s / 1400 steps | 1.2/24.0 |"
        in text
    )
    assert (
        "| CPU 1x8 | fp32 | bs=8, lr=0.0002 | 512 | 20.50 | 22.25 | 30.12 | / | no target (bounded run) | 1.2/24.0 |"
        in text
    )
    assert "PASS: device 0.26 vs reference 0.27" in text and "![curve](curve_cpu_1x1_fp32.png)" in text


def test_write_report_merges_with_the_files_of_earlier_runs(tmp_path):
    write_report(tmp_path, row("1x1"), ENV)
    rows, warning = write_report(tmp_path, row("2x8", p_core=99.0), ENV)
    assert warning is None and len(rows) == 2
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert [r["config"] for r in data["rows"]] == ["1x1", "2x8"] and data["environment"] == ENV
    assert "| CPU 2x8 |" in (tmp_path / MD_NAME).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{JSON_NAME}.lock", JSON_NAME, MD_NAME]


def test_temporaries_of_a_killed_write_are_removed_by_the_next(tmp_path):
    stale = tmp_path / f".{JSON_NAME}.tmp-x1y2"
    stale.write_text('{"rows": [')
    write_report(tmp_path, row("1x1"), ENV)
    assert not stale.exists() and len(load_rows(tmp_path / JSON_NAME)) == 1


def test_an_unreadable_report_is_kept_aside_not_overwritten(tmp_path):
    (tmp_path / JSON_NAME).write_text('{"rows": [')
    rows, warning = write_report(tmp_path, row("1x1"), ENV)
    assert len(rows) == 1 and "could not be read" in warning
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_text() == '{"rows": ['
    assert load_rows(tmp_path / JSON_NAME)[0]["config"] == "1x1"


def test_environment_of_the_cpu_names_what_it_knows():
    env = environment.describe(torch.device("cpu"))
    assert env["accelerator"]["name"].startswith("CPU")
    assert env["framework"].startswith(f"PyTorch {torch.__version__}")
    assert env["dependencies"]["numpy"] not in ("", None)
    assert env["driver"] == "n/a (CPU)" and env["kernel"]

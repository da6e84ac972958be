"""Reports: atomic JSON and Markdown files that load back, and terminal summary lines."""
import json
import math
import os

import pytest
import torch

from parity.compare import compare_part
from parity.report import atomic_write, load_json, summary_lines, to_json, write_report

ENTRY_KEYS = {"nodeid", "part", "device", "precision", "passed", "ops_checked", "first_failure", "ops", "whole_run"}
FAILURE_KEYS = {"op", "module", "phase", "shapes", "max_abs", "max_rel", "cosine", "rmse", "margin", "verdict"}


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


@pytest.fixture(scope="module")
def results():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    run = lambda m, x: m(x).sum()  # noqa: E731
    clean = compare_part("mlp", build, x, run, "cpu", "fp32")
    broken = compare_part("mlp", build, x, run, "cpu", "bf16", ["aten.native_layer_norm:nan"])
    # a correct device that is not the CPU: its matmuls' last bits differ, so they are judged
    other = compare_part("mlp", build, x, run, "cpu", "fp32", ["aten.addmm:ulp=1"])
    return clean, broken, other


def test_json_and_markdown_are_written_and_load(tmp_path, results):
    clean, broken, _ = results
    paths = write_report(tmp_path / "reports", [clean.to_dict("t::clean"), broken.to_dict("t::broken")])
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == \
        [".parity.json.lock", "margins-mlp-bf16-cpu.png", "margins-mlp-fp32-cpu.png", "parity.json", "parity.md"]
    assert sorted(paths["plots"]) == sorted((tmp_path / "reports").glob("margins-*.png"))
    data = load_json(paths["json"])
    first, second = data["tests"]
    assert ENTRY_KEYS <= set(first) and first["nodeid"] == "t::clean" and first["passed"] is True
    assert first["first_failure"] is None and first["ops_checked"] == len(first["ops"]) > 5
    assert second["passed"] is False and FAILURE_KEYS <= set(second["first_failure"])
    assert second["first_failure"]["op"] == "aten.native_layer_norm" and second["first_failure"]["module"] == "1"
    assert "NaN at 1 position" in second["first_failure"]["verdict"]
    assert second["faults"] == [{"spec": "aten.native_layer_norm:nan", "fired": second["faults"][0]["fired"]}]
    assert second["whole_run"]["aligned"] > 0
    markdown = paths["markdown"].read_text()
    assert "**FAIL**" in markdown and "aten.native_layer_norm.default" in markdown and "t::broken" in markdown


def test_json_is_strict_even_with_infinite_margins():
    text = to_json([{"part": "x", "ops": [{"margin": math.inf, "rmse": math.nan}]}])
    assert json.loads(text)["tests"][0]["ops"][0] == {"margin": "inf", "rmse": "nan"}


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    atomic_write(target, "old")
    atomic_write(target, "new")
    assert target.read_text() == "new"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "partial")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["r.json"]


def test_summary_line_per_part_and_precision(results):
    clean, broken, other = results
    lines = summary_lines([clean, broken])
    assert len(lines) == 2
    assert lines[0] == f"PASS mlp [fp32]: {clean.ops_checked} ops checked ({clean.ops_checked} bit-identical to the " \
        "baseline), no failure"
    (line,) = summary_lines([other])
    assert line.startswith("PASS mlp [fp32]: ") and "bit-identical to the baseline), worst op margin" in line
    assert "(aten.addmm.default in " in line and "worst end-to-end margin" in line and line.endswith("no failure")
    assert lines[1].startswith("FAIL mlp [bf16]: ")
    assert "first failure: aten.native_layer_norm.default in 1: fail: NaN" in lines[1]


def test_a_part_judged_only_at_its_end_says_how_many_tensors_were_judged(results):
    entry = dict(results[2].to_dict("t::steps"), ops_checked=0, ops_identical=0, ops=[],
                 tensors_judged=176, tensors_identical=2)
    (line,) = summary_lines([entry])
    assert line.startswith("PASS mlp [fp32]: 176 tensors judged end to end against the ensemble "
                           "(2 bit-identical to the baseline), worst end-to-end margin "), line
    assert "0 ops checked" not in line
    (by_median,) = summary_lines([dict(entry, statistic="median")])
    assert "judged end to end against the ensemble by median error (2 bit-identical" in by_median, by_median


def test_reports_accumulate_the_newest_wins_and_a_corrupt_one_is_kept_aside(tmp_path, results):
    clean, broken, other = results
    assert write_report(tmp_path, [clean.to_dict("t::a"), broken.to_dict("t::b")])["warning"] is None
    second = write_report(tmp_path, [other.to_dict("t::a")])  # same node id, device and precision as clean
    entries = load_json(second["json"])["tests"]
    assert [(e["nodeid"], e["precision"]) for e in entries] == [("t::b", "bf16"), ("t::a", "fp32")]
    assert entries[1]["faults"][0]["spec"] == "aten.addmm:ulp=1" and all(e["time"] for e in entries)
    assert "t::b" in second["markdown"].read_text()
    (tmp_path / "parity.json").write_text('{"tests": [')
    third = write_report(tmp_path, [clean.to_dict("t::c")])
    (aside,) = tmp_path.glob("parity.json.corrupt-*")
    assert aside.read_text() == '{"tests": [' and f"kept as {aside}" in third["warning"]
    assert [e["nodeid"] for e in load_json(third["json"])["tests"]] == ["t::c"]


def test_report_files_are_as_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "r.json", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640


def test_a_second_corrupt_report_in_the_same_second_does_not_replace_the_first_kept_aside(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *when: "20260101-120000")
    for text in ('{"tests": [', "not json"):
        (tmp_path / "parity.json").write_text(text)
        entry = {"nodeid": "t::a", "device": "cpu", "precision": "fp32"}
        assert "kept as" in write_report(tmp_path, [entry])["warning"]
    kept = sorted(p.read_text() for p in tmp_path.glob("parity.json.corrupt-20260101-120000*"))
    assert kept == sorted(['{"tests": [', "not json"])


def test_two_runs_writing_one_report_at_once_lose_no_entry(tmp_path, monkeypatch):
    import threading

    from parity import report

    first_read, second_wrote = threading.Event(), threading.Event()
    load = report.load_list_or_set_aside

    def load_then_let_the_second_run_write(path, field):
        items = load(path, field)
        if threading.current_thread().name == "first":
            first_read.set()
            second_wrote.wait(1.0)  # it cannot while the first holds the report
        return items

    monkeypatch.setattr(report, "load_list_or_set_aside", load_then_let_the_second_run_write)
    entry = lambda nodeid: {"nodeid": nodeid, "device": "cpu", "precision": "fp32"}  # noqa: E731
    first = threading.Thread(target=write_report, args=(tmp_path, [entry("t::a")]), name="first")
    second = threading.Thread(target=lambda: (write_report(tmp_path, [entry("t::b")]), second_wrote.set()))
    first.start()
    assert first_read.wait(10)
    second.start()
    first.join(10)
    second.join(10)
    assert sorted(e["nodeid"] for e in load_json(tmp_path / "parity.json")["tests"]) == ["t::a", "t::b"]


def test_temporaries_of_a_killed_report_write_are_removed_by_the_next(tmp_path):
    stale = [tmp_path / ".parity.json.tmp-a1b2", tmp_path / ".parity.md.tmp-c3d4"]
    for path in stale:
        path.write_text("half a report")
    unrelated = tmp_path / ".training_report.json.tmp-e5f6"
    unrelated.write_text("another writer's")
    write_report(tmp_path, [{"nodeid": "t::a", "device": "cpu", "precision": "fp32"}])
    assert not any(p.exists() for p in stale) and unrelated.exists()


def test_runs_on_two_devices_keep_both_margin_plots(tmp_path, results):
    _, _, other = results
    write_report(tmp_path, [other.to_dict("t::a")])
    write_report(tmp_path, [{**other.to_dict("t::a"), "device": "cuda:1"}])
    assert [e["device"] for e in load_json(tmp_path / "parity.json")["tests"]] == ["cpu", "cuda:1"]
    assert sorted(p.name for p in tmp_path.glob("margins-*.png")) == \
        ["margins-mlp-fp32-cpu.png", "margins-mlp-fp32-cuda-1.png"]

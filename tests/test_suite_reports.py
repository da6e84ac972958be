"""The conformance suite as a user runs it: a clean part passes, an injected fault fails it with
the op named in the message, the terminal summary and the JSON and Markdown reports."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(tmp_path, *args, tests=("suite/test_heads.py", "-k", "postprocess")):
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *tests,
         "--xpu", "cpu", "--model-config", "tiny", "--report-dir", str(tmp_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_clean_run_passes_and_reports(tmp_path):
    result = run_suite(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "PASS postprocess [fp32]" in result.stdout
    report = json.loads((tmp_path / "parity.json").read_text())
    (entry,) = report["tests"]
    assert entry["nodeid"] == "suite/test_heads.py::test_postprocess[fp32]"
    assert entry["passed"] is True and entry["first_failure"] is None and entry["ops_checked"] > 0
    assert {"op", "module", "shapes", "verdict"} <= set(entry["ops"][0])
    assert "postprocess" in (tmp_path / "parity.md").read_text()
    assert "note: the device under test is this CPU, running the baseline's own kernels" in result.stdout
    assert "this checks the suite, not a device; try --xpu cpu-alt" in result.stdout


def test_injected_fault_fails_naming_the_op(tmp_path):
    result = run_suite(tmp_path, "--inject-fault", "aten._softmax:round=bf16")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "first failing op: #0 aten._softmax.default (forward)" in result.stdout
    assert "re-run: pytest 'suite/test_heads.py::test_postprocess[fp32]' --xpu cpu" in result.stdout
    assert f"--model-config=tiny --report-dir={tmp_path} --inject-fault aten._softmax:round=bf16" in result.stdout
    assert "FAIL postprocess [fp32]" in result.stdout
    (entry,) = json.loads((tmp_path / "parity.json").read_text())["tests"]
    assert entry["passed"] is False
    assert entry["first_failure"]["op"] == "aten._softmax" and entry["first_failure"]["verdict"].startswith("fail")


def test_a_fault_that_never_fires_fails_the_session(tmp_path):
    result = run_suite(tmp_path, "--inject-fault", "aten.upsample_bilinear2d:nan")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "--inject-fault 'aten.upsample_bilinear2d:nan' never fired" in result.stdout


def test_margins_are_plotted_and_cpu_alt_is_a_device(tmp_path):
    # the transformer's sums and norms differ in their last bits on cpu-alt, so they are judged
    result = run_suite(tmp_path, "--xpu", "cpu-alt", tests=("suite/test_transformer.py",))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "device under test: cpu-alt" in result.stdout and "worst op margin" in result.stdout
    assert "this checks the suite, not a device" not in result.stdout
    assert (tmp_path / "margins-transformer-fp32-cpu-alt.png").read_bytes()[:4] == b"\x89PNG"
    (entry,) = json.loads((tmp_path / "parity.json").read_text())["tests"]
    assert entry["device"] == "cpu-alt" and 0 < entry["worst_op_margin"] <= 1


def test_runs_add_to_one_report(tmp_path):
    assert run_suite(tmp_path).returncode == 0
    second = run_suite(tmp_path, tests=("suite/test_position_encoding.py", "-k", "sine"))
    assert second.returncode == 0, second.stdout[-3000:]
    nodeids = [e["nodeid"] for e in json.loads((tmp_path / "parity.json").read_text())["tests"]]
    assert nodeids == ["suite/test_heads.py::test_postprocess[fp32]",
                       "suite/test_position_encoding.py::test_sine_position_encoding[fp32]"]
    markdown = (tmp_path / "parity.md").read_text()
    assert "test_postprocess" in markdown and "test_sine_position_encoding" in markdown


def test_coco_path_feeds_the_parity_batch_and_is_checked_before_any_test(tmp_path):
    from detr.data.synthetic import generate

    coco = generate(tmp_path / "coco", seed=2, num_train=2, num_val=3, min_size=96, max_size=160, crowd_every=0)
    result = run_suite(tmp_path / "r", "--coco-path", str(coco), tests=("suite/test_heads.py", "-k", "model_forward"))
    assert result.returncode == 0, result.stdout[-3000:]
    (entry,) = json.loads((tmp_path / "r" / "parity.json").read_text())["tests"]
    assert entry["notes"][0].startswith("inputs: validation images 0") and entry["notes"][0].endswith(f"of {coco}")
    resized = run_suite(tmp_path / "s", "--coco-path", str(coco), "--image-size", "64,80", "--batch-size", "3",
                        tests=("suite/test_backbone.py", "-m", "xpu"))
    assert resized.returncode == 0, resized.stdout[-3000:]
    (entry,) = json.loads((tmp_path / "s" / "parity.json").read_text())["tests"]
    batch, _, height, width = (int(n) for n in entry["ops"][0]["shapes"][1:].split("]")[0].split(","))
    assert batch == 3 and max(height, width) <= 80, entry["ops"][0]["shapes"]  # padded to the largest image
    annotations = coco / "annotations" / "instances_val2017.json"
    annotations.write_text(annotations.read_text()[:100])
    broken = run_suite(tmp_path / "r", "--coco-path", str(coco))
    assert broken.returncode == 4, broken.stdout[-3000:]
    assert f"--coco-path {coco}: annotation file {annotations} is not valid JSON" in broken.stderr
    (tmp_path / "empty").mkdir()
    empty = run_suite(tmp_path / "r", "--coco-path", str(tmp_path / "empty"))
    assert empty.returncode == 4 and "val2017 does not exist" in empty.stderr, empty.stderr[-2000:]


class _Options:
    """The options a session was started with, as a pytest config answers them."""

    def __init__(self, **given):
        self.values = {"--model-config": "tiny", "--report-dir": "my reports", "--xpu-plugin": ["torch_acme"],
                       "--coco-path": None, "--expectations": None, "--image-size": None, "--batch-size": None,
                       **given}

    def getoption(self, name):
        return self.values[name]


def test_the_rerun_command_carries_every_option_that_shaped_the_run():
    from fixtures.parity import rerun_options

    assert rerun_options(_Options()) == "--model-config=tiny --report-dir='my reports' --xpu-plugin=torch_acme"
    # an expectations file decides whether a failure is expected, which the report records
    assert rerun_options(_Options(**{"--coco-path": "/data/coco", "--expectations": "acme.txt"})).endswith(
        " --coco-path=/data/coco --expectations=acme.txt")
    assert rerun_options(_Options(**{"--image-size": "reference", "--batch-size": "1"})).endswith(
        " --image-size=reference --batch-size=1")


def test_image_and_batch_size_shape_the_parity_batch(tmp_path):
    result = run_suite(tmp_path, "--image-size", "96,128", "--batch-size", "3",
                       tests=("suite/test_backbone.py", "-m", "xpu"))
    assert result.returncode == 0, result.stdout[-3000:]
    (entry,) = json.loads((tmp_path / "parity.json").read_text())["tests"]
    # portrait 128x96, landscape 96x128, portrait again: padded to 128 x 128
    assert entry["ops"][0]["shapes"].startswith("[3,3,128,128] float32, ")


DISK_FULL = """
import parity.report


def pytest_sessionstart(session):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    parity.report.write_json = full
"""


def test_a_report_that_cannot_be_written_keeps_the_old_one_and_the_summary(tmp_path, monkeypatch):
    (tmp_path / "disk_full.py").write_text(DISK_FULL)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "parity.json").write_text('{"tests": []}')
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "disk_full", "--xpu", "cpu",
         "--model-config", "tiny", f"--report-dir={reports}",
         "suite/test_position_encoding.py::test_sine_position_encoding"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    assert f"ERROR: the parity report could not be written to {reports} ([Errno 28] No space left on device)" in out
    assert "PASS position encoding (sine) [fp32]" in out
    assert (reports / "parity.json").read_text() == '{"tests": []}'


SMALL_DISK = """
import collections
import shutil


def pytest_configure(config):
    usage = collections.namedtuple("usage", "total used free")
    shutil.disk_usage = lambda path: usage(2**30, 2**30 - 100 * 2**20, 100 * 2**20)
"""


def test_a_tmpdir_too_small_for_the_trace_is_refused_before_the_first_part(tmp_path, monkeypatch):
    (tmp_path / "small_disk.py").write_text(SMALL_DISK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = run_suite(tmp_path / "reports", "-p", "small_disk")
    out = result.stdout + result.stderr
    assert result.returncode == 4, out
    assert "has 0.1 GiB free; the parity trace of tiny needs about 1.2 GiB (docs/memory.md)" in out
    assert "DETR_PARITY_SPILL=0" in out and "PASS" not in out
    monkeypatch.setenv("DETR_PARITY_SPILL", "off")
    assert run_suite(tmp_path / "reports", "-p", "small_disk").returncode == 0

"""The expectations file: known failures become strict xfails with their reason, an entry whose
test passes fails the run and says to remove it, and a malformed line is a usage error naming it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from markers.expectations import Expectation, Expectations, ExpectationsError

ROOT = Path(__file__).resolve().parents[1]
SINE = "suite/test_position_encoding.py::test_sine_position_encoding[fp32]"
LEARNED = "suite/test_position_encoding.py::test_learned_position_encoding[fp32]"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "expectations.txt"
    path.write_text(text)
    return path


def test_entries_parse_with_comments_and_patterns(tmp_path):
    path = write(tmp_path, f"# vendor backend 0.3\n\n{SINE}  sine in fp16 (VENDOR-1)  # tracked\n"
                           "suite/test_train_step.py::*[bf16]   bf16 AdamW\n")
    exp = Expectations.load(path)
    assert [(e.pattern, e.reason, e.line) for e in exp.entries] == [
        (SINE, "sine in fp16 (VENDOR-1)", 3), ("suite/test_train_step.py::*[bf16]", "bf16 AdamW", 4)]
    assert exp.find(SINE).line == 3 and exp.find(LEARNED) is None
    assert exp.find("suite/test_train_step.py::test_three_train_steps[bf16]").line == 4
    assert exp.find("suite/test_train_step.py::test_three_train_steps[fp32]") is None


@pytest.mark.parametrize("pattern, nodeid, matched", [
    ("a.py::t[fp32]", "a.py::t[fp32]", True),
    ("a.py::t[fp32]", "a.py::t[f]", False),  # brackets are literal, not a character class
    ("a.py::*", "a.py::t[amp]", True),
    ("a.py::t[?p32]", "a.py::t[fp32]", True),
    ("*[amp]", "b.py::u[fp32]", False),
])
def test_patterns_treat_brackets_literally(pattern, nodeid, matched):
    assert Expectation(pattern, "why", "f", 1).matches(nodeid) is matched


@pytest.mark.parametrize("text, message", [
    (f"{SINE}\n", ":1: .* has no reason"),
    ("# ok\nnot_a_node_id because\n", ":2: 'not_a_node_id' is neither a node id"),
])
def test_malformed_lines_name_the_line(tmp_path, text, message):
    with pytest.raises(ExpectationsError, match=message):
        Expectations.load(write(tmp_path, text))


def run(*args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--xpu",
            "cpu",
            "--model-config",
            "tiny",
            "suite/test_position_encoding.py",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_expected_failure_passes_the_run_and_is_listed_apart(tmp_path):
    path = write(tmp_path, f"{SINE}   sine off by 1e-4 on this backend (VENDOR-7)\n")
    done = run(f"--expectations={path}", "--inject-fault=aten.sin:noise=1e-4", f"--report-dir={tmp_path}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 passed, 1 xfailed" in out
    assert (
        f"expected failure, failed as expected: {SINE}: sine off by 1e-4 on this backend (VENDOR-7) ({path}:1)" in out
    )
    assert "XFAIL position encoding (sine) [fp32]" in out and "PASS position encoding (learned) [fp32]" in out
    assert "expected failure: sine off by 1e-4" in (tmp_path / "parity.md").read_text()


def test_an_entry_whose_test_passes_fails_the_run(tmp_path):
    path = write(tmp_path, f"# stale\n{SINE}   sine off on this backend\n")
    done = run("--expectations", str(path), f"--report-dir={tmp_path}")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"passed, but {path}:2 expects it to fail (sine off on this backend): remove this entry" in out
    assert f"UNEXPECTED PASS passed: {SINE}" in out


def test_a_malformed_file_is_a_usage_error(tmp_path):
    path = write(tmp_path, "suite/test_position_encoding.py::*\n")
    done = run(f"--expectations={path}", "--collect-only")
    assert done.returncode == 4 and f"{path}:1:" in done.stderr and "has no reason" in done.stderr, (
        done.stdout + done.stderr
    )


def test_the_ini_value_names_the_file_too(tmp_path):
    path = write(tmp_path, "suite/test_position_encoding.py::*\n")
    done = run("-o", f"expectations={path}", "--collect-only")
    assert done.returncode == 4 and f"{path}:1:" in done.stderr, done.stdout + done.stderr


BROKEN_DEVICE = """
import contextlib
from runtime.device import CpuBackend

class Broken(CpuBackend):
    @contextlib.contextmanager
    def kernels(self):
        raise KeyError("driver")
        yield

def pytest_detr_register_devices(register):
    register("cpu-broken", Broken())
"""


def test_an_entry_excuses_only_a_parity_failure_not_an_error(tmp_path, monkeypatch):
    (tmp_path / "broken_device.py").write_text(BROKEN_DEVICE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    path = write(tmp_path, f"{SINE}   sine off by 1e-4 on this backend (VENDOR-7)\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "broken_device",
                           "--xpu", "cpu-broken", "--model-config", "tiny", f"--expectations={path}",
                           f"--report-dir={tmp_path}", SINE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "xfailed" not in out, out
    assert f"KeyError: 'driver'\nnot a parity failure, so the expectations entry {path}:1" in out
    assert f"NOT A PARITY FAILURE, error (KeyError: 'driver'): {SINE}" in out
    entry, = json.loads((tmp_path / "parity.json").read_text())["tests"]
    assert entry["nodeid"] == SINE and entry["error"] == "KeyError: 'driver'" and not entry["passed"]

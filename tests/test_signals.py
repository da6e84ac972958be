"""A session stopped by SIGTERM keeps what finished, as one stopped by Ctrl-C does."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_training_jobs import no_job_left

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_keeps_the_parts_that_finished(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--model-config=tiny",
                             "--xpu=cpu", f"--report-dir={tmp_path}", "--benchmark-skip",
                             "suite/test_position_encoding.py", "suite/test_backbone.py"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if "test_position_encoding.py" in line and "PASSED" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 2, out  # pytest's "interrupted"
    parts = {entry["part"] for entry in json.loads((tmp_path / "parity.json").read_text())["tests"]}
    assert parts and parts <= {"position encoding (sine)", "position encoding (learned)"}, out
    assert "DETR parity" in out


def job_running() -> bool:
    return not no_job_left()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_session_stopped_during_a_training_job_leaves_no_process_behind(tmp_path, stop):
    """SIGTERM ends the session as Ctrl-C does (its clean-up stops the job); SIGKILL leaves no clean-up,
    and the launcher, told to follow its parent, stops the ranks itself."""
    assert not job_running(), "a training job of another test is still running"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "training and 1x1",
                             "--xpu=cpu", f"--report-dir={tmp_path}", "--train-max-steps=1000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not job_running() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert job_running(), "the training job never started"
        time.sleep(2)
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    deadline = time.monotonic() + 30
    while job_running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not job_running(), "a rank or torchrun outlived the session"
    assert proc.returncode == (2 if stop == signal.SIGTERM else -signal.SIGKILL), out[-3000:]

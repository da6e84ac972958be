"""The vendor hooks: a device registered by a plugin is selectable with --xpu, and an error-model
adjustment decides the verdict and is listed in the report (examples/vendor_plugin.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from parity.errormodel import ErrorModel

ROOT = Path(__file__).resolve().parents[1]
SINE = "suite/test_position_encoding.py::test_sine_position_encoding[fp32]"


def run(tmp_path, *args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--model-config",
            "tiny",
            f"--report-dir={tmp_path}",
            SINE,
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_plugin_device_runs_and_its_ulp_table_judges(tmp_path):
    # 20-ulp errors in sine: beyond the default table's 4 ulps, inside the example table's 24
    fault = "--inject-fault=aten.sin:ulp=20"
    without = run(tmp_path / "default", "--xpu", "cpu-alt", fault)
    assert without.returncode == 1 and "aten.sin" in without.stdout, without.stdout + without.stderr
    adjusted = run(tmp_path / "vendor", "-p", "examples.vendor_plugin", "--xpu", "cpu-1thread", fault)
    out = adjusted.stdout + adjusted.stderr
    assert adjusted.returncode == 0, out
    report = (tmp_path / "vendor" / "parity.md").read_text()
    assert "| cpu-1thread | fp32 | pass |" in report
    assert "error model adjusted by a hook: ulp budget of sin: 4 -> 24 (example vendor math library table)" in report


def test_an_unknown_device_still_names_the_registered_ones(tmp_path):
    done = run(tmp_path, "-p", "examples.vendor_plugin", "--xpu", "cpu-2thread", "--collect-only")
    assert done.returncode == 4 and "cpu-1thread" in done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.set_ulp_budget("exp", -1, "why"),
        lambda m: m.set_ulp_budget("exp", 2, ""),
        lambda m: m.scale("aten.mm", 0, "why"),
        lambda m: m.scale("aten.mm", float("nan"), "why"),
    ],
)
def test_bad_adjustments_are_refused(call):
    with pytest.raises(ValueError):
        call(ErrorModel())


def test_scale_multiplies_every_component_of_the_op():
    model, scaled = ErrorModel(), ErrorModel()
    scaled.scale("aten.mm.default", 3.0, "split-K")
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    golden = a @ b
    base = model.allowance("aten.mm", {"self": a, "mat2": b}, [golden], 0, golden.float())
    wide = scaled.allowance("aten.mm", {"self": a, "mat2": b}, [golden], 0, golden.float())
    assert wide.names == base.names and np.array_equal(wide.values, 3 * base.values)
    assert scaled.adjustments == ["allowance of aten.mm x3 (split-K)"]

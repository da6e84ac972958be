"""The vendor hooks: a device registered by a plugin is selectable with --xpu, and an error-model
adjustment decides the verdict and is listed in the report (examples/vendor_plugin.py)."""
import os
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


@pytest.mark.parametrize("call, message", [
    (lambda m: m.scale("aten.nosuchop", 2, "why"), r"torch has no aten\.nosuchop"),
    (lambda m: m.scale("*", 2, "why"), r"scale\('\*', \.\.\.\): expected an aten op such as 'aten\.bmm' "
                                        r"\(no patterns\)"),
    (lambda m: m.set_ulp_budget("nosuchfn", 2, "why"), r"'nosuchfn'.*not an elementwise function.*known: acos,"),
])
def test_adjustments_of_names_the_model_does_not_know_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(ErrorModel())


HOOKS = {
    "raises": "def pytest_detr_register_devices(register):\n    raise KeyError('driver')\n",
    "object": "def pytest_detr_register_devices(register):\n    register('npu2', object())\n",
    "empty": "from runtime.device import CpuBackend\ndef pytest_detr_register_devices(register):\n"
             "    register('', CpuBackend())\n",
    "auto": "from runtime.device import CpuBackend\ndef pytest_detr_register_devices(register):\n"
            "    register('auto', CpuBackend())\n",
    "shadow": "from runtime.device import CpuBackend\ndef pytest_detr_register_devices(register):\n"
              "    register('cpu-alt', CpuBackend())\n",
    "replace": "from runtime.device import CpuBackend\ndef pytest_detr_register_devices(register):\n"
               "    register('cpu-alt', CpuBackend(), replace=True)\n",
    "compile": "import torch\ndef pytest_detr_compile(fn, spec):\n"
               "    print('vendor compile of', spec.backend, flush=True)\n"
               "    return torch.compile(fn, backend='aot_eager')\n",
    "compile_raises": "def pytest_detr_compile(fn, spec):\n    raise OSError('no graph compiler driver')\n",
    "nosuchop": "def pytest_detr_adjust_error_model(model, part, precision, device):\n"
                "    model.scale('aten.nosuchop', 2.0, 'why')\n",
    "negative": "def pytest_detr_adjust_error_model(model, part, precision, device):\n"
                "    model.set_ulp_budget('exp', -1, 'why')\n",
}


def run_with_hook(tmp_path, name, *args):
    (tmp_path / f"hook_{name}.py").write_text(HOOKS[name])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", f"hook_{name}",
                           "--model-config=tiny", f"--report-dir={tmp_path / 'reports'}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("name, message", [
    ("raises", "pytest_detr_register_devices in hook_raises raised KeyError: 'driver'"),
    ("object", "pytest_detr_register_devices in hook_object: register('npu2', <object object"),
    ("empty", "register('', ...): a backend's name is a device type or a variant in lower case"),
    ("auto", "register('auto', ...): a backend's name is a device type or a variant in lower case"),
    ("shadow", "register('cpu-alt', ...): 'cpu-alt' is registered already"),
])
def test_a_bad_device_hook_is_a_usage_error_naming_the_plugin(tmp_path, name, message):
    done = run_with_hook(tmp_path, name, "--collect-only", SINE)
    assert done.returncode == 4 and message in done.stderr, done.stdout + done.stderr
    assert "INTERNALERROR" not in done.stdout + done.stderr


def test_replacing_a_suite_device_needs_replace_and_the_header_says_so(tmp_path):
    done = run_with_hook(tmp_path, "replace", "-v", "--collect-only", "--xpu", "cpu-alt", SINE)  # -v: the header
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a plugin replaced the suite's 'cpu-alt'" in done.stdout


@pytest.mark.parametrize("name, message", [
    ("nosuchop", "torch has no aten.nosuchop"),
    ("negative", "expected a finite number of ulps >= 0 and a reason"),
])
def test_a_bad_error_model_hook_stops_the_session_once(tmp_path, name, message):
    done = run_with_hook(tmp_path, name, "--xpu", "cpu", "suite/test_position_encoding.py")
    out = done.stdout + done.stderr
    assert done.returncode == 4 and out.count(message) == 1, out
    assert f"pytest_detr_adjust_error_model in hook_{name}" in out and "DETR(" not in out


def test_scale_multiplies_every_component_of_the_op():
    model, scaled = ErrorModel(), ErrorModel()
    scaled.scale("aten.mm.default", 3.0, "split-K")
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    golden = a @ b
    base = model.allowance("aten.mm", {"self": a, "mat2": b}, [golden], 0, golden.float())
    wide = scaled.allowance("aten.mm", {"self": a, "mat2": b}, [golden], 0, golden.float())
    assert wide.names == base.names and np.array_equal(wide.values, 3 * base.values)
    assert scaled.adjustments == ["allowance of aten.mm x3 (split-K)"]


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile came with torch 2.0")
def test_a_vendor_compile_hook_compiles_the_part_and_its_failure_names_the_plugin(tmp_path):
    done = run_with_hook(tmp_path, "compile", "-s", "--xpu", "cpu", "--compile", "inductor", SINE)
    assert done.returncode == 0 and "vendor compile of inductor" in done.stdout, done.stdout + done.stderr
    done = run_with_hook(tmp_path, "compile_raises", "--xpu", "cpu", "--compile", "inductor", SINE)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "pytest_detr_compile raised OSError: no graph compiler driver" in out, out

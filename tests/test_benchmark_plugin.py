"""The benchmark plugin's pieces without timing anything: workloads, option checks, machine info,
the warning on comparing different devices, and extra_info."""
from types import SimpleNamespace

import pytest
import torch

from fixtures import benchmark as plugin
from fixtures.steps import InferenceStep, TrainStep, Workload
from markers import options
from markers.state import STATE, SuiteState
from runtime.device import Device, resolve


def test_workload_names_and_shapes():
    w = Workload("r50", 8, 800)
    assert (w.id, w.shape) == ("r50-bs8-800px", (800, 1056))
    assert Workload("r50", 2, 320).shape == (320, 416)
    assert "bs=8" in w.fix_hp("amp") and "image=800x1056" in w.fix_hp("amp") and "precision=amp" in w.fix_hp("amp")


@pytest.mark.parametrize("value, least, example, message", [
    ("0", 1, "2,8", "expected a comma-separated list of integers >= 1"),
    ("2,x", 1, "2,8", "e.g. 2,8"),
    ("16", 32, "800", "expected an integer >= 32, e.g. 800"),
    ("-1", 0, "5", "expected an integer >= 0"),
])
def test_bad_numbers_are_usage_errors(value, least, example, message):
    with pytest.raises(pytest.UsageError, match=message):
        options.ints("--opt", value, least, example)


def test_machine_info_names_the_device_under_test():
    config = SimpleNamespace(
        stash={STATE: SuiteState(xpu=resolve("cpu"), precisions=["fp32"], model_config="tiny")},
        getoption=lambda name: [],
    )
    info = {}
    plugin.pytest_benchmark_update_machine_info(config, info)
    device = info["device_under_test"]
    assert device["type"] == "cpu" and device["count"] == 1 and device["plugins"] == {}
    assert device["torch"] == torch.__version__ and "torchvision" in device and device["threads"] >= 1


def _compare(current, saved):
    warnings = []
    session = SimpleNamespace(logger=SimpleNamespace(warning=warnings.append), storage="/x")
    hook = plugin.pytest_benchmark_compare_machine_info(
        None, session, {"device_under_test": current}, {"machine_info": {"device_under_test": saved}})
    next(hook)
    outcome = SimpleNamespace(get_result=lambda: [], force_result=lambda result: None)
    with pytest.raises(StopIteration):
        hook.send(outcome)
    return warnings


def test_comparing_another_device_warns():
    cpu = {"type": "cpu", "name": "x86_64", "device": "cpu", "torch": "2.4", "count": 1}
    gpu = dict(cpu, type="cuda", name="NVIDIA A100-SXM4-40GB", device="cuda")
    assert _compare(cpu, cpu) == []
    (warning,) = _compare(cpu, gpu)
    assert "against a saved run of NVIDIA A100-SXM4-40GB" in warning and "type, name" in warning
    assert "unknown device" in _compare(cpu, None)[0]


@pytest.mark.parametrize("step_class", [TrainStep, InferenceStep])
def test_steps_run_and_count_flops(step_class):
    with step_class(Workload("tiny", 1, 64), Device(torch.device("cpu")), "fp32", ["aten.addmm:delay=0"]) as step:
        step()
        assert step.fired()["aten.addmm:delay=0"] > 0
        assert step.flops() > 1e8

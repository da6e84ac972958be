"""The benchmark plugin's pieces without timing anything: workloads, option checks, machine info,
the warning on comparing different devices, and extra_info."""
from types import SimpleNamespace

import pytest
import torch

from fixtures import benchmark as plugin
from fixtures.steps import InferenceStep, TrainStep, Workload
from markers import options
from markers.state import STATE, SuiteState
from runtime import compiler as compiled
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


@pytest.mark.skipif(not compiled.available(), reason="torch.compile came with torch 2.0")
@pytest.mark.parametrize("step_class", [TrainStep, InferenceStep])
def test_a_compiled_step_computes_the_step_and_compiles_before_the_rounds(step_class):
    cpu, spec = Device(torch.device("cpu")), compiled.make_spec("aot_eager")
    with step_class(Workload("tiny", 1, 64), cpu, "fp32", ["aten.addmm:delay=0"], compile=spec) as step, \
            step_class(Workload("tiny", 1, 64), cpu, "fp32") as eager:
        for module in [*step.model.modules(), *eager.model.modules()]:
            # compiled code draws its random numbers in another order
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
        outputs = [(step.compiled(), eager.body()) for _ in range(2)]
        graphs, compile_s = step.compiled.graphs, step.compiled.compile_s
        step()
        # a body whose result nobody used would be dead code to the compiler, and time nothing
        assert graphs >= 1 and compile_s > 0 and step.compiled.compile_s == compile_s
        assert step.fired() == {}, "an aten fault's dispatch mode would make dynamo run eagerly"
        for got, want in outputs:
            got, want = (got[0], want[0]) if step_class is TrainStep else (got[0]["scores"], want[0]["scores"])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # aot_eager runs the same aten ops


def test_the_compiled_step_reports_its_speed_over_the_eager_one_of_the_same_run():
    st = SuiteState(xpu=resolve("cpu"), precisions=["fp32"], model_config="tiny")
    config = SimpleNamespace(stash={STATE: st})
    eager = SimpleNamespace(compiled=None, workload=Workload("tiny", 2, 64), precision=SimpleNamespace(name="fp32"))
    assert plugin.compile_info(config, eager, SimpleNamespace(median=0.3), 0.0) == {"compiled": None}
    spec = compiled.make_spec("aot_eager")
    step = SimpleNamespace(compiled=SimpleNamespace(spec=spec, compile_s=7.5, graphs=3, recompilations=1),
                           workload=eager.workload, precision=eager.precision)
    info = plugin.compile_info(config, step, SimpleNamespace(median=0.2), 5.0)
    assert info["speedup_over_eager"] == pytest.approx(1.5) and info["eager_median_s"] == 0.3
    assert info["compile_s"] == 5.0 and info["compile_s_in_rounds"] == 2.5 and info["graphs"] == 3
    other = SimpleNamespace(**{**vars(step), "workload": Workload("tiny", 4, 64)})
    assert plugin.compile_info(config, other, SimpleNamespace(median=0.2), 5.0)["speedup_over_eager"] is None

"""runtime.device: the registry of backends, resolution (``auto``, device strings, variants), the
``cpu-alt`` kernels, and one meaning of peak memory in the benchmarks and the trainer."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import runtime.device as layer
from runtime.device import Backend, CpuBackend, Device, DeviceError, register_backend, resolve

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for one test, so that what it registers is gone afterwards."""
    monkeypatch.setattr(layer, "BACKENDS", dict(layer.BACKENDS))
    return layer.BACKENDS


class FakeMeta(Backend):
    """A vendor device, played by torch's meta device: no data, but tensors can be allocated."""

    def __init__(self):
        super().__init__("meta", dist_backend="fakeccl")
        self.synchronized = []

    def available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def synchronize(self, device: torch.device) -> None:
        self.synchronized.append(device)


class CountingCpu(CpuBackend):
    """A CPU variant whose kernels context counts how often it is entered."""

    def __init__(self):
        super().__init__()
        self.entered = 0

    @contextlib.contextmanager
    def kernels(self):
        self.entered += 1
        yield


def test_the_registry_has_every_backend():
    assert list(layer.BACKENDS) == ["cuda", "xpu", "npu", "mlu", "musa", "privateuse1", "cpu", "cpu-alt", "cpu-splitk"]
    libraries = {name: b.dist_backend for name, b in layer.BACKENDS.items() if name != "privateuse1"}
    assert libraries == {
        "cuda": "nccl",
        "xpu": "xccl",
        "npu": "hccl",
        "mlu": "cncl",
        "musa": "mccl",
        "cpu": "gloo",
        "cpu-alt": "gloo",
        "cpu-splitk": "gloo",
    }
    assert layer.BACKENDS["privateuse1"].type == torch._C._get_privateuse1_backend_name()
    assert layer.BACKENDS["cpu-alt"].type == "cpu" and layer.variants() == ["cpu-alt", "cpu-splitk"]
    assert [b.math_library for b in layer.BACKENDS.values()].count("cuda") == 1
    assert (
        layer.backend_for("cuda").math_library == "cuda" and Device(torch.device("cpu")).math_library() == "default"
    )


def test_an_unregistered_type_is_served_by_its_torch_module():
    backend = layer.backend_for("mps")
    assert type(backend) is Backend and backend.type == "mps" and backend.module() is torch.mps
    assert backend.dist_backend == "gloo"


def test_a_registered_backend_is_found_by_resolve_and_probed_by_auto(registry, monkeypatch):
    with pytest.raises(DeviceError, match="device type 'meta' is not available here"):
        resolve("meta")
    fake = FakeMeta()
    register_backend("meta", fake)
    xpu = resolve("meta")
    assert xpu.device == torch.device("meta") and xpu.backend is fake and xpu.accelerator
    xpu.synchronize()
    assert fake.synchronized == [torch.device("meta")]
    with pytest.raises(DeviceError, match=r"--xpu 'meta:3': index 3 out of range, 1 device\(s\) visible"):
        resolve("meta:3")
    # Without torch.accelerator, auto probes the registered backends in order, before the CPU.
    monkeypatch.delattr(torch, "accelerator", raising=False)
    assert layer.available_backends() == ["meta", "cpu"]
    assert resolve("auto").device == torch.device("meta")
    assert layer.collective_device("fakeccl") == torch.device("meta", 0)
    from runtime.distributed import default_backend

    assert default_backend("meta") == "fakeccl"


def test_a_registered_variant_is_selected_by_name(registry):
    variant = CountingCpu()
    register_backend("cpu-counting", variant)
    assert layer.variants() == ["cpu-alt", "cpu-splitk", "cpu-counting"] and "cpu-counting" in layer.VARIANTS
    xpu = resolve("cpu-counting")
    assert xpu.device == torch.device("cpu") and xpu.label == "cpu-counting" and xpu.backend is variant
    with xpu.kernels():
        pass
    assert variant.entered == 1
    with pytest.raises(DeviceError, match="or cpu-alt, cpu-splitk, cpu-counting"):
        resolve("no such thing")


def test_cpu_alt_turns_onednn_off_and_runs_on_one_thread():
    xpu = resolve("cpu-alt")
    assert xpu.type == "cpu" and xpu.label == "cpu-alt" and not xpu.accelerator
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    assert onednn, "oneDNN is off before the test: nothing to show"
    with xpu.kernels():
        assert torch.get_num_threads() == 1 and not torch.backends.mkldnn.enabled
    assert torch.get_num_threads() == threads and torch.backends.mkldnn.enabled
    with resolve("cpu").kernels():
        assert torch.backends.mkldnn.enabled


def test_auto_is_the_cpu_here():
    if layer.available_backends() != ["cpu"]:
        pytest.skip(f"this machine has an accelerator: {layer.available_backends()}")
    assert resolve("auto") == Device(torch.device("cpu"))


def test_auto_is_the_cpu_when_nothing_else_is_there(registry, monkeypatch):
    monkeypatch.delattr(torch, "accelerator", raising=False)
    for name in ("cuda", "xpu", "npu", "mlu", "musa", "privateuse1"):
        monkeypatch.setattr(registry[name], "available", lambda: False)
    assert layer.available_backends() == ["cpu"]
    assert resolve("auto").device == torch.device("cpu")
    assert layer.resolve_device("auto", index=3) == torch.device("cpu")  # no index for the CPU


@pytest.mark.parametrize("spec, message", [
    ("tpu9", "--xpu 'tpu9' is not a torch device"),
    ("cuda:x", "--xpu 'cuda:x' is not a torch device"),
])
def test_an_unknown_device_string_names_the_accepted_forms(spec, message):
    with pytest.raises(DeviceError) as error:
        resolve(spec)
    assert message in str(error.value)
    assert (
        "Accepted: auto, cpu, or a device string such as cuda, cuda:1, xpu, npu:0, "
        "or cpu-alt, cpu-splitk (available here: "
        in str(error.value)
    )


def test_the_trainer_names_its_own_options():
    with pytest.raises(DeviceError, match="--device 'mps': .* Did you forget --plugin\\?"):
        resolve("mps", index=0, option="--device", plugin_option="--plugin")


REWIND = """
import threading, torch
from runtime.device import Device
xpu = Device(torch.device("cpu"))
earlier = torch.ones(256 * 2**20 // 4)  # an earlier peak, then a thread that exits: getrusage keeps it for good
del earlier
worker = threading.Thread(target=lambda: None)
worker.start()
worker.join()
xpu.reset_peak_memory_stats()
before = xpu.max_memory_allocated()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB of fresh pages: above glibc's largest mmap threshold
assert xpu.max_memory_allocated() >= before + 60 * 2**20, (before, xpu.max_memory_allocated())
del block
peak = xpu.max_memory_allocated()
xpu.reset_peak_memory_stats()
assert xpu.max_memory_allocated() < peak - 60 * 2**20, (peak, xpu.max_memory_allocated())  # rewound
"""


def test_cpu_peak_memory_is_the_peak_resident_size():
    xpu = Device(torch.device("cpu"))
    assert 0 < xpu.memory_allocated() <= xpu.max_memory_allocated() < xpu.total_memory()
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the peak resident size cannot be rewound here")
    # In a fresh process, as the trainer's ranks are: in CI's long pytest process the kernel did not
    # rewind it (see runtime/device.py).
    done = subprocess.run([sys.executable, "-c", REWIND], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_benchmark_records_the_layers_peak_memory(monkeypatch):
    from fixtures.benchmark import extra_info
    from fixtures.steps import Workload

    step = SimpleNamespace(workload=Workload("tiny", 1, 64), device=Device(torch.device("cpu")),
                           precision=SimpleNamespace(name="fp32"))
    stats = SimpleNamespace(median=0.5, mean=0.5, rounds=3)
    real = extra_info(step, stats, 10**9, 1, {})
    assert real["peak_memory_gib"] > 0 and real["threads"] == torch.get_num_threads()
    monkeypatch.setattr(CpuBackend, "max_memory_allocated", lambda self, device: 3 * GIB)
    assert extra_info(step, stats, 10**9, 1, {})["peak_memory_gib"] == 3.0


def test_the_trainer_reports_the_layers_peak_memory(tmp_path):
    """A one-step run whose CPU backend reports 3 GiB: the result (and so the training report) says 3 GiB."""
    script = (
        "import sys, runtime.device as d\n"
        "d.CpuBackend.max_memory_allocated = lambda self, device: 3 * 2**30\n"
        "from training.train import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["--device", "cpu", "--train-limit", "4", "--val-limit", "2", "--batch-size", "2", "--threads", "1",
            "--max-steps", "1", "--epochs", "1", "--output-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mem_actual_gib"] == 3.0 and result["mem_total_gib"] > 0


def test_the_environment_describes_the_device_through_the_layer(monkeypatch):
    from training import environment

    monkeypatch.setattr(CpuBackend, "driver_version", lambda self: "fake 1.0")
    monkeypatch.setattr(CpuBackend, "runtime_version", lambda self: {"onednn": "3.5"})
    env = environment.describe(torch.device("cpu"))
    assert env["driver"] == "fake 1.0" and env["framework"] == f"PyTorch {torch.__version__} (onednn 3.5)"
    assert env["accelerator"]["name"] == Device(torch.device("cpu")).name()
    assert env["accelerator"]["memory_gib"] == round(Device(torch.device("cpu")).total_memory() / GIB, 1)


def test_each_backends_reduced_precision_switches_are_set_by_precision_and_restored(registry, monkeypatch):
    import types

    # torch_npu's defaults: HF32 allowed in convolutions, not in matmuls
    npu = types.SimpleNamespace(conv=types.SimpleNamespace(allow_hf32=True),
                                matmul=types.SimpleNamespace(allow_hf32=False))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    backend = layer.backend_for("npu")
    xpu = Device.__new__(Device)
    monkeypatch.setattr(Device, "backend", property(lambda self: backend))
    with xpu.tf32(False):
        assert (npu.conv.allow_hf32, npu.matmul.allow_hf32) == (False, False)
    assert (npu.conv.allow_hf32, npu.matmul.allow_hf32) == (True, False)
    with xpu.tf32(True):
        assert (npu.conv.allow_hf32, npu.matmul.allow_hf32) == (True, True)
        assert "torch.npu.conv.allow_hf32=True, torch.npu.matmul.allow_hf32=True" in xpu.precision_switches()
    cuda = layer.backend_for("cuda")
    assert cuda.reduced_precision == ("torch.backends.cuda.matmul.allow_tf32", "torch.backends.cudnn.allow_tf32")
    monkeypatch.setattr(Device, "backend", property(lambda self: layer.backend_for("mlu")))
    monkeypatch.setattr(Device, "accelerator", property(lambda self: True))
    monkeypatch.setattr(Device, "type", property(lambda self: "mlu"))
    assert "no reduced-precision switch is known for mlu: fp32 is not enforced" in xpu.precision_switches()

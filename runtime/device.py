"""The device layer: every difference between device types, behind one :class:`Backend` per type.

A backend says whether its devices are there, how to wait for them, read their memory, seed them,
which dtype autocast uses, how TF32 is switched, which collective library they ship with, and what
their driver and runtime are. ``BACKENDS`` holds them by name (cuda, xpu, npu, mlu, musa, the
renamed privateuse1, cpu, and the variant ``cpu-alt``); a vendor adds a device with
:func:`register_backend`. A type nobody registered is served through ``torch.<type>``'s functions,
so that vendors' lagging torch builds (>= 2.1) keep working.

Peak memory has one meaning everywhere: the most bytes held at once since the last
``reset_peak_memory_stats``. On an accelerator these are the bytes torch's allocator handed out on
the device (``max_memory_allocated``). The CPU has no allocator statistics: there it is the peak
resident set size of the whole process (Linux's VmHWM, else ``getrusage``), which includes the
interpreter, the libraries and the data, and is rewound on Linux through ``/proc/self/clear_refs``
(elsewhere it counts from the start of the process). The rewind works in a fresh process, as the
trainer's ranks are; in CI's long pytest process it did not, so there a benchmark's CPU peak may be
the process's peak since it started.

``cpu-alt`` is the CPU with other real kernels: oneDNN off (convolutions and their gradients take
ATen's native kernels) and one thread (sums, norms and matmuls split their work differently). It
is a correct implementation that is not the baseline, so every machine can show that the parity
rule passes a correct device: with ``cpu`` the device runs the baseline's own kernels.
``cpu-splitk`` is a second one: the CPU's own kernels on pieces of each matmul, convolution and sum,
added in fp32 (split-K and blocked orders, :mod:`runtime.splitk`).
"""
import contextlib
import importlib
import os
import platform
import re
import resource
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from . import compat
from .splitk import SplitK

KNOWN_PLUGINS = ("torch_xmlir", "torch_npu", "torch_mlu", "torch_musa", "intel_extension_for_pytorch")
PRIVATEUSE1 = "privateuse1"


class DeviceError(ValueError):
    """A device or plugin given on the command line cannot be used; the message says why."""


class Backend:
    """One device type, through the per-backend module ``torch.<type>``; subclasses override what
    their type does differently. ``accelerator`` is False for the host CPU."""

    accelerator = True

    def __init__(self, device_type: str, dist_backend: str = "gloo", math_library: str = "default",
                 visible_devices: Tuple[str, ...] = (), reduced_precision: Tuple[str, ...] = ()):
        self._type = device_type
        # The backend's own switches of reduced precision in float32 matmuls and convolutions (TF32,
        # HF32), as attribute paths from torch; --precision fp32 clears them and tf32 sets them.
        self.reduced_precision = reduced_precision
        self.dist_backend = dist_backend
        # The environment variables that choose which devices of this type a process sees (tox passes them on).
        self.visible_devices = visible_devices
        # The math library whose documented accuracy the device's elementwise functions have: "cuda"
        # (the CUDA Math API), or "default" for a vendor that documents none.
        self.math_library = math_library

    @property
    def type(self) -> str:
        """The torch device type the backend runs on."""
        return self._type

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.type!r})"

    def module(self):
        return getattr(torch, self.type, None)

    def _call(self, function: str, *args, default=None):
        fn = getattr(self.module(), function, None)
        return fn(*args) if fn is not None else default

    def available(self) -> bool:
        try:
            return bool(self._call("is_available", default=False))
        except Exception:
            return False

    def device_count(self) -> int:
        return int(self._call("device_count", default=1))

    def current_device(self) -> torch.device:
        return torch.device(self.type, int(self._call("current_device", default=0)))

    def set_device(self, device: torch.device) -> None:
        self._call("set_device", device)

    def synchronize(self, device: torch.device) -> None:
        """Waits for the device's queued work, so that timers measure the work and not its launch."""
        if hasattr(self.module(), "synchronize"):
            self.module().synchronize(device)
        else:
            torch.accelerator.synchronize(device)

    def memory_allocated(self, device: torch.device) -> int:
        return int(self._call("memory_allocated", device, default=0))

    def max_memory_allocated(self, device: torch.device) -> int:
        return int(self._call("max_memory_allocated", device, default=0))

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        self._call("reset_peak_memory_stats", device)

    def total_memory(self, device: torch.device) -> int:
        props = getattr(self.module(), "get_device_properties", None)
        if props is not None:
            return int(props(device).total_memory)
        return int(self.module().mem_get_info(device)[1])

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._call("manual_seed_all", seed)

    def rng_state(self, device: torch.device) -> Any:
        """The host's and the device's random states (dropout draws from the device's)."""
        return torch.get_rng_state(), self._call("get_rng_state", device)

    def set_rng_state(self, state: Any, device: torch.device) -> None:
        host, own = state
        torch.set_rng_state(host)
        if own is not None:
            self._call("set_rng_state", own, device)

    def autocast_dtype(self) -> torch.dtype:
        """The low-precision dtype that ``torch.autocast`` uses on this device type."""
        getter = getattr(torch, "get_autocast_dtype", None)
        if getter is not None:
            try:
                return getter(self.type)
            except Exception:
                pass
        return torch.float16

    def set_tf32(self, enabled: bool) -> None:
        """Allows or forbids TF32 in float32 matmuls (and convolutions where the backend has the switch)."""
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        for path in self.reduced_precision:
            owner, name = _switch(path)
            if owner is not None:
                setattr(owner, name, enabled)

    def tf32_state(self) -> Dict[str, object]:
        """The switches that :meth:`set_tf32` sets, by name, as they are now; ``None`` for one that
        this torch build (or a plugin not imported) lacks."""
        state: Dict[str, object] = {"torch.float32_matmul_precision": torch.get_float32_matmul_precision()}
        for path in self.reduced_precision:
            owner, name = _switch(path)
            state[path] = getattr(owner, name) if owner is not None else None
        return state

    def restore_tf32(self, state: Mapping[str, object]) -> None:
        torch.set_float32_matmul_precision(state["torch.float32_matmul_precision"])
        for path in self.reduced_precision:
            owner, name = _switch(path)
            if owner is not None and state.get(path) is not None:
                setattr(owner, name, state[path])

    def set_onednn(self, enabled: bool) -> None:
        """Lets the backend take oneDNN's kernels or not, where that is a switch (the CPU's)."""

    def name(self, device: torch.device) -> str:
        get_name = getattr(self.module(), "get_device_name", None)
        return str(get_name(device)) if get_name is not None else str(device)

    def driver_version(self) -> Optional[str]:
        """The version of the device's kernel driver; None where it cannot be read."""
        try:
            return getattr(self.module().get_device_properties(self.current_device()), "driver_version", None)
        except Exception:
            return None

    def runtime_version(self) -> Dict[str, str]:
        """The versions of the runtime libraries torch was built against for this device, by library."""
        version = getattr(torch.version, self.type, None)
        return {self.type: str(version)} if version else {}

    def settings(self) -> Dict[str, object]:
        """Settings of this process that change the device's speed, for benchmark records."""
        return {}

    def kernels(self) -> ContextManager:
        """The context that runs and replayed ops execute in; only variants switch anything."""
        return contextlib.nullcontext()


class CudaBackend(Backend):
    """NVIDIA's CUDA, and AMD's ROCm, which torch also calls ``cuda``."""

    def __init__(self):
        super().__init__("cuda", dist_backend="nccl", math_library="cuda",
                         visible_devices=("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"),
                         reduced_precision=("torch.backends.cuda.matmul.allow_tf32", "torch.backends.cudnn.allow_tf32"))


    def driver_version(self) -> Optional[str]:
        """The kernel module's version and the CUDA version it supports: ``535.104.05, CUDA 12.2``."""
        found = []
        module = re.search(r"Kernel Module\s+(\S+)", _read("/proc/driver/nvidia/version") or "")
        if module:
            found.append(module.group(1))
        api = compat.cuda_driver_api_version()
        if api:
            found.append(f"CUDA {api // 1000}.{api % 1000 // 10}")
        return ", ".join(found) or None

    def runtime_version(self) -> Dict[str, str]:
        cudnn = torch.backends.cudnn
        versions = {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                    "cudnn": str(cudnn.version()) if cudnn.is_available() and self.available() else None}
        return {k: v for k, v in versions.items() if v}


class PrivateUse1Backend(Backend):
    """The out-of-tree device a vendor's extension registers as privateuse1, under the name it gives it."""

    def __init__(self):
        super().__init__(PRIVATEUSE1)

    @property
    def type(self) -> str:
        return compat.privateuse1_backend_name()

    def available(self) -> bool:
        return self.type != "privateuseone" and super().available()


class CpuBackend(Backend):
    """The host CPU: one device, no queue to wait for, peak memory as the process's peak resident size."""

    accelerator = False

    def __init__(self):
        super().__init__("cpu")

    def available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def set_device(self, device: torch.device) -> None:
        pass

    def synchronize(self, device: torch.device) -> None:
        pass

    def memory_allocated(self, device: torch.device) -> int:
        """The process's resident set size now (its peak where /proc/self/statm is missing)."""
        statm = _read("/proc/self/statm")
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm else _peak_rss()

    def max_memory_allocated(self, device: torch.device) -> int:
        """The process's peak resident set size since the last reset (see the module's docstring)."""
        # The kernel's counters lag the resident size by a few pages: never report a peak below it.
        return max(_peak_rss(), self.memory_allocated(device))

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident size to the current one (Linux >= 4.0)
        except OSError:
            pass

    def total_memory(self, device: torch.device) -> int:
        """The machine's physical memory."""
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def rng_state(self, device: torch.device) -> Any:
        return torch.get_rng_state(), None

    def autocast_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def set_onednn(self, enabled: bool) -> None:
        torch.backends.mkldnn.enabled = enabled

    def name(self, device: torch.device) -> str:
        return f"CPU: {cpu_model()}"

    def driver_version(self) -> Optional[str]:
        return None

    def runtime_version(self) -> Dict[str, str]:
        return {}

    def settings(self) -> Dict[str, object]:
        return {"threads": torch.get_num_threads()}


class OtherCpuKernels(CpuBackend):
    """``cpu-alt``: the CPU with oneDNN off and one thread inside :meth:`kernels`."""

    @contextlib.contextmanager
    def kernels(self) -> Iterator[None]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with warnings.catch_warnings():
                # flags() also sets oneDNN's TF32 switch and warns that this build has no Intel GPU.
                warnings.simplefilter("ignore", UserWarning)
                flags = torch.backends.mkldnn.flags(enabled=False)
                flags.__enter__()
            try:
                yield
            finally:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    flags.__exit__(None, None, None)
        finally:
            torch.set_num_threads(threads)


class SplitKCpuKernels(CpuBackend):
    """``cpu-splitk``: the CPU with its reductions in split-K and blocked fp32 orders inside :meth:`kernels`."""

    def kernels(self) -> ContextManager:
        return SplitK()


# In the order ``auto`` probes them when torch.accelerator is missing; the CPU comes last.
BACKENDS: Dict[str, Backend] = {
    "cuda": CudaBackend(),
    # Kunlunxin's XPU_VISIBLE_DEVICES and Intel's ZE_AFFINITY_MASK: both vendors' devices are "xpu".
    "xpu": Backend("xpu", dist_backend="xccl", visible_devices=("XPU_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")),
    # torch_npu's HF32 switches: convolutions allow HF32 by default, matmuls do not.
    "npu": Backend("npu", dist_backend="hccl", visible_devices=("ASCEND_RT_VISIBLE_DEVICES",),
                   reduced_precision=("torch.npu.conv.allow_hf32", "torch.npu.matmul.allow_hf32")),
    "mlu": Backend("mlu", dist_backend="cncl", visible_devices=("MLU_VISIBLE_DEVICES",)),
    "musa": Backend("musa", dist_backend="mccl", visible_devices=("MUSA_VISIBLE_DEVICES",)),
    PRIVATEUSE1: PrivateUse1Backend(),
    "cpu": CpuBackend(),
    "cpu-alt": OtherCpuKernels(),
    "cpu-splitk": SplitKCpuKernels(),
}


# What a registration replaced: name -> the backend it replaced, for the report.
REPLACED: Dict[str, str] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*(-[a-z0-9_]+)*")


def register_backend(name: str, backend: Backend, replace: bool = False) -> None:
    """Adds the backend of device type ``name``; a ``name`` other than the backend's type makes it a
    variant that ``--xpu name`` selects, like ``cpu-alt``. A name that is registered already (the
    suite's ``cpu``, ``cpu-alt``, ``cuda``, ... or another plugin's) is replaced only with
    ``replace=True``, and :data:`REPLACED` records it. DeviceError says what is wrong."""
    if not isinstance(name, str) or name == "auto" or not _NAME.fullmatch(name):
        raise DeviceError(f"register({name!r}, ...): a backend's name is a device type or a variant in lower case, "
                          "such as 'npu' or 'cpu-fp64acc'; 'auto' is reserved")
    if not isinstance(backend, Backend):
        raise DeviceError(f"register({name!r}, {backend!r}): expected an instance of runtime.device.Backend, "
                          f"got {type(backend).__name__}")
    if name in BACKENDS and BACKENDS[name] is not backend:
        if not replace:
            raise DeviceError(f"register({name!r}, ...): {name!r} is registered already ({BACKENDS[name]!r}); "
                              "pass replace=True to replace it")
        REPLACED[name] = repr(BACKENDS[name])
    BACKENDS[name] = backend


def variants() -> List[str]:
    """Registered names that are not a device type: a device type run another way."""
    return [name for name, backend in BACKENDS.items() if name not in (backend.type, PRIVATEUSE1)]


class _Variants(Mapping):
    """The variants' backends by name, as registered now."""

    def __getitem__(self, name: str) -> Backend:
        if name not in variants():
            raise KeyError(name)
        return BACKENDS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(variants())

    def __len__(self) -> int:
        return len(variants())


VARIANTS: Mapping[str, Backend] = _Variants()


def backend_for(name: str) -> Backend:
    """The backend registered as ``name`` (a device type or a variant), else a generic one over ``torch.<name>``."""
    if name in BACKENDS:
        return BACKENDS[name]
    if name == BACKENDS[PRIVATEUSE1].type:
        return BACKENDS[PRIVATEUSE1]
    return Backend(name)


def device_types() -> List[str]:
    """The device types of the registered backends, variants left out."""
    skip = set(variants())
    return [backend.type for name, backend in BACKENDS.items() if name not in skip]


def available_backends() -> List[str]:
    """Device types that can run tensors here, accelerator first, ``cpu`` last."""
    found = []
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        found.append(accelerator.current_accelerator().type)
    for device_type in device_types():
        backend = backend_for(device_type)
        if backend.accelerator and device_type not in found and backend.available():
            found.append(device_type)
    return found + ["cpu"]


def import_plugins(modules: Iterable[str], option: str = "--xpu-plugin") -> List[str]:
    """Imports vendor extensions (e.g. ``torch_npu``) so that they register their device."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a plugin can fail with anything: ImportError, OSError, RuntimeError
            raise DeviceError(
                f"{option} {name}: import failed with {type(exc).__name__}: {exc}. "
                f"Install the vendor's PyTorch extension (known: {', '.join(KNOWN_PLUGINS)})"
            ) from exc
        loaded.append(name)
    return loaded


def resolve(
    spec: str, index: Optional[int] = None, option: str = "--xpu", plugin_option: str = "--xpu-plugin"
) -> "Device":
    """``--xpu`` as a :class:`Device`: ``auto``, a torch device string, or a variant (``cpu-alt``).
    ``index``: the device an accelerator's string without one takes (a torchrun rank's LOCAL_RANK)."""
    if spec in VARIANTS:
        return Device(torch.device(VARIANTS[spec].type), variant=spec)
    return Device(resolve_device(spec, index, option, plugin_option))


def resolve_device(spec: str, index: Optional[int] = None, option: str = "--xpu",
                   plugin_option: str = "--xpu-plugin") -> torch.device:
    """``auto`` -> the best available device; any torch device string otherwise, checked for use.
    ``option`` and ``plugin_option`` are the command-line names the messages use."""
    if spec == "auto" and index is None:
        return torch.device(available_backends()[0])
    try:
        device = torch.device(available_backends()[0] if spec == "auto" else spec)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(
            f"{option} {spec!r} is not a torch device ({exc}). Accepted: auto, cpu, or a device "
            f"string such as cuda, cuda:1, xpu, npu:0, or {', '.join(VARIANTS)} "
            f"(available here: {', '.join(available_backends())})"
        ) from None
    backend = backend_for(device.type)
    if not backend.available():
        raise DeviceError(
            f"{option} {spec!r}: device type {device.type!r} is not available here (no such device visible, "
            "or this torch build lacks it) "
            f"(available here: {', '.join(available_backends())}). Did you forget {plugin_option}?"
        )
    if backend.accelerator and device.index is None and index is not None:
        device = torch.device(device.type, index)
    if backend.accelerator and device.index is not None:
        count = backend.device_count()
        if device.index >= count:
            raise DeviceError(f"{option} {spec!r}: index {device.index} out of range, {count} device(s) visible")
    try:
        torch.empty(1, device=device)
    except Exception as exc:
        raise DeviceError(f"{option} {spec!r}: allocating a tensor failed: {type(exc).__name__}: {exc}") from None
    return device


def device_count(device: torch.device) -> int:
    return backend_for(device.type).device_count()


def collective_device(dist_backend: str) -> torch.device:
    """Where the tensors of a ``dist_backend`` collective live: this process's current device of
    the type that ships the library, the CPU for gloo."""
    for device_type in device_types():
        backend = backend_for(device_type)
        if backend.dist_backend == dist_backend and backend.available():
            return backend.current_device()
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    return torch.device("cpu")


@dataclass
class Device:
    """One device (or a variant of one) and the uniform operations of its :class:`Backend`."""

    device: torch.device
    variant: Optional[str] = None

    @property
    def backend(self) -> Backend:
        return backend_for(self.variant or self.device.type)

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def accelerator(self) -> bool:
        """False for the host CPU and its variants."""
        return self.backend.accelerator

    @property
    def label(self) -> str:
        """``cpu-alt`` for a variant, else the torch device string (``cuda:0``)."""
        return self.variant or str(self.device)

    def kernels(self) -> ContextManager:
        """The context every run and replayed op of this device executes in: a variant's kernel
        switches, else nothing."""
        return self.backend.kernels()

    def set_current(self) -> None:
        """Makes this the process's current device of its type."""
        self.backend.set_device(self.device)

    def synchronize(self) -> None:
        self.backend.synchronize(self.device)

    def name(self) -> str:
        return self.backend.name(self.device)

    def count(self) -> int:
        return self.backend.device_count()

    def memory_allocated(self) -> int:
        return self.backend.memory_allocated(self.device)

    def max_memory_allocated(self) -> int:
        """Peak bytes since the last reset; on the CPU the process's peak resident size."""
        return self.backend.max_memory_allocated(self.device)

    def reset_peak_memory_stats(self) -> None:
        self.backend.reset_peak_memory_stats(self.device)

    def total_memory(self) -> int:
        """Bytes of device memory (physical memory for the CPU)."""
        return self.backend.total_memory(self.device)

    def manual_seed(self, seed: int) -> None:
        self.backend.manual_seed(seed)

    def rng_state(self) -> Any:
        return self.backend.rng_state(self.device)

    def set_rng_state(self, state: Any) -> None:
        self.backend.set_rng_state(state, self.device)

    def math_library(self) -> str:
        """The math library whose documented accuracy this device has (``cuda`` or ``default``)."""
        return self.backend.math_library

    def autocast_dtype(self) -> torch.dtype:
        """The low-precision dtype that ``torch.autocast`` uses on this device."""
        return self.backend.autocast_dtype()

    def set_tf32(self, enabled: bool) -> None:
        """Allows or forbids TF32 in matmuls and convolutions where the backend has the switch."""
        self.backend.set_tf32(enabled)

    def precision_switches(self) -> str:
        """The backend's reduced-precision switches as they are now, for the report; or, on an
        accelerator whose switches nobody registered, that float32 is not enforced there."""
        state = self.backend.tf32_state()
        if self.backend.reduced_precision:
            return ", ".join(f"{k}={'absent' if v is None else v}" for k, v in state.items())
        if self.accelerator:
            return (f"no reduced-precision switch is known for {self.type}: fp32 is not enforced there beyond "
                    f"torch.float32_matmul_precision={state['torch.float32_matmul_precision']}")
        return f"torch.float32_matmul_precision={state['torch.float32_matmul_precision']}"

    @contextlib.contextmanager
    def tf32(self, enabled: bool) -> Iterator[None]:
        """:meth:`set_tf32` for the duration of the context; the backend's switches are restored after."""
        saved = self.backend.tf32_state()
        try:
            self.backend.set_tf32(enabled)
            yield
        finally:
            self.backend.restore_tf32(saved)

    def set_onednn(self, enabled: bool) -> None:
        self.backend.set_onednn(enabled)

    def driver_version(self) -> Optional[str]:
        return self.backend.driver_version()

    def runtime_version(self) -> Dict[str, str]:
        return self.backend.runtime_version()

    def settings(self) -> Dict[str, object]:
        return self.backend.settings()


def _switch(path: str):
    """(the object that holds the switch, its name) for ``torch.a.b.flag``; (None, name) where absent."""
    parts = path.split(".")
    owner: Any = torch
    for part in parts[1:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, parts[-1]
    return (owner, parts[-1]) if hasattr(owner, parts[-1]) else (None, parts[-1])


def cpu_model() -> str:
    """The host CPU's model name, from /proc/cpuinfo where there is one."""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _peak_rss() -> int:
    """The peak resident size: Linux's VmHWM, which /proc/self/clear_refs rewinds. getrusage's
    maximum elsewhere, which nothing rewinds (on Linux it also keeps the peak of exited threads)."""
    found = re.search(r"^VmHWM:\s+(\d+) kB", _read("/proc/self/status") or "", re.MULTILINE)
    if found:
        return int(found.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None

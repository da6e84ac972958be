"""The device under test: resolution of ``--xpu`` and ``--xpu-plugin``, and one small interface
(synchronise, memory, name, seed, autocast dtype, TF32, kernel switches) over torch.accelerator
and the older per-backend modules, so that vendors' lagging torch builds (>= 2.1) keep working.

``cpu-alt`` is the CPU with other real kernels: oneDNN off (convolutions and their gradients take
ATen's native kernels) and one thread (sums, norms and matmuls split their work differently). It
is a correct implementation that is not the baseline, so every machine can show that the parity
rule passes a correct device: with ``cpu`` the device runs the baseline's own kernels.
"""
import contextlib
import importlib
import warnings
from dataclasses import dataclass
from typing import ContextManager, Iterable, Iterator, List, Optional

import torch

# Backends probed by ``auto`` when torch.accelerator is missing, in order of preference.
PROBED_BACKENDS = ("cuda", "xpu", "npu", "mlu", "musa")
KNOWN_PLUGINS = ("torch_xmlir", "torch_npu", "torch_mlu", "torch_musa", "intel_extension_for_pytorch")


class DeviceError(ValueError):
    """A device or plugin given on the command line cannot be used; the message says why."""


def import_plugins(modules: Iterable[str]) -> List[str]:
    """Imports vendor extensions (e.g. ``torch_npu``) so that they register their device."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a plugin can fail with anything: ImportError, OSError, RuntimeError
            raise DeviceError(
                f"--xpu-plugin {name}: import failed with {type(exc).__name__}: {exc}. "
                f"Install the vendor's PyTorch extension (known: {', '.join(KNOWN_PLUGINS)})"
            ) from exc
        loaded.append(name)
    return loaded


def _backend_module(device_type: str):
    return getattr(torch, device_type, None)


def _backend_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    module = _backend_module(device_type)
    is_available = getattr(module, "is_available", None)
    try:
        return bool(is_available()) if is_available else False
    except Exception:
        return False


def _privateuse1_name() -> Optional[str]:
    name = torch._C._get_privateuse1_backend_name()
    return None if name == "privateuseone" else name


def available_backends() -> List[str]:
    """Device types that can run tensors here, accelerator first, ``cpu`` last."""
    found = []
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        found.append(accelerator.current_accelerator().type)
    candidates = list(PROBED_BACKENDS)
    if _privateuse1_name():
        candidates.append(_privateuse1_name())
    found += [t for t in candidates if t not in found and _backend_available(t)]
    return found + ["cpu"]


@contextlib.contextmanager
def _other_cpu_kernels() -> Iterator[None]:
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


# Named variants of a device: name -> (device type, the context its runs and replayed ops use).
VARIANTS = {"cpu-alt": ("cpu", _other_cpu_kernels)}


def resolve(spec: str) -> "Device":
    """``--xpu`` as a :class:`Device`: ``auto``, a torch device string, or a variant (``cpu-alt``)."""
    if spec in VARIANTS:
        return Device(torch.device(VARIANTS[spec][0]), variant=spec)
    return Device(resolve_device(spec))


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the best available device; any torch device string otherwise, checked for use."""
    if spec == "auto":
        return torch.device(available_backends()[0])
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(
            f"--xpu {spec!r} is not a torch device ({exc}). Accepted: auto, cpu, or a device "
            f"string such as cuda, cuda:1, xpu, npu:0, or {', '.join(VARIANTS)} (available here: {', '.join(available_backends())})"
        ) from None
    if not _backend_available(device.type):
        raise DeviceError(
            f"--xpu {spec!r}: device type {device.type!r} is not available here (no such device visible, or this torch build lacks it) "
            f"(available here: {', '.join(available_backends())}). Did you forget --xpu-plugin?"
        )
    if device.index is not None and device.type != "cpu":
        count = device_count(device)
        if device.index >= count:
            raise DeviceError(f"--xpu {spec!r}: index {device.index} out of range, {count} device(s) visible")
    try:
        torch.empty(1, device=device)
    except Exception as exc:
        raise DeviceError(f"--xpu {spec!r}: allocating a tensor failed: {type(exc).__name__}: {exc}") from None
    return device


def device_count(device: torch.device) -> int:
    if device.type == "cpu":
        return 1
    module = _backend_module(device.type)
    return int(module.device_count()) if module is not None and hasattr(module, "device_count") else 1


@dataclass
class Device:
    """Uniform operations on one device; every method is a no-op or a best estimate on the CPU."""

    device: torch.device
    variant: Optional[str] = None

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def label(self) -> str:
        """``cpu-alt`` for a variant, else the torch device string (``cuda:0``)."""
        return self.variant or str(self.device)

    def kernels(self) -> ContextManager:
        """The context every run and replayed op of this device executes in: a variant's kernel
        switches, else nothing."""
        return VARIANTS[self.variant][1]() if self.variant else contextlib.nullcontext()

    def _module(self):
        return _backend_module(self.device.type)

    def synchronize(self) -> None:
        if self.device.type == "cpu":
            return
        module = self._module()
        if module is not None and hasattr(module, "synchronize"):
            module.synchronize(self.device)
        else:
            torch.accelerator.synchronize(self.device)

    def name(self) -> str:
        if self.device.type == "cpu":
            import platform

            return platform.processor() or platform.machine() or "cpu"
        module = self._module()
        get_name = getattr(module, "get_device_name", None)
        return str(get_name(self.device)) if get_name else str(self.device)

    def memory_allocated(self) -> int:
        return self._memory_stat("memory_allocated")

    def max_memory_allocated(self) -> int:
        return self._memory_stat("max_memory_allocated")

    def reset_peak_memory_stats(self) -> None:
        if self.device.type != "cpu":
            reset = getattr(self._module(), "reset_peak_memory_stats", None)
            if reset:
                reset(self.device)

    def total_memory(self) -> int:
        """Bytes of device memory (physical memory for the CPU)."""
        if self.device.type == "cpu":
            import os

            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        module = self._module()
        props = getattr(module, "get_device_properties", None)
        if props:
            return int(props(self.device).total_memory)
        return int(module.mem_get_info(self.device)[1])

    def _memory_stat(self, stat: str) -> int:
        if self.device.type == "cpu":
            return 0
        fn = getattr(self._module(), stat, None)
        return int(fn(self.device)) if fn else 0

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        module = self._module()
        if self.device.type != "cpu" and hasattr(module, "manual_seed_all"):
            module.manual_seed_all(seed)

    def error_backend(self) -> str:
        """The error model's table for this device (``cuda`` or ``default``)."""
        return self.device.type

    def autocast_dtype(self) -> torch.dtype:
        """The low-precision dtype that ``torch.autocast`` uses on this device."""
        if self.device.type == "cpu":
            return torch.bfloat16
        getter = getattr(torch, "get_autocast_dtype", None)
        if getter is not None:
            try:
                return getter(self.device.type)
            except Exception:
                pass
        return torch.float16

    def set_tf32(self, enabled: bool) -> None:
        """Allows or forbids TF32 in matmuls and convolutions where the backend has the switch."""
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = enabled
            torch.backends.cudnn.allow_tf32 = enabled
        torch.set_float32_matmul_precision("high" if enabled else "highest")

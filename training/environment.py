"""What the report says about the machine: hardware, accelerator, OS, driver, framework and versions.

Only what can be read without a vendor tool; anything unknown is reported as unknown, never guessed.
"""
import os
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

UNKNOWN = "unknown"
DEPENDENCIES = ("torchvision", "numpy", "scipy", "pycocotools", "pillow", "matplotlib", "pytest", "pytest-benchmark", "hypothesis")


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or UNKNOWN


def memory_gib() -> Optional[float]:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def os_name() -> str:
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()


def driver(device_type: str) -> str:
    if device_type == "cuda":
        text = _read("/proc/driver/nvidia/version")
        if text:
            return text.splitlines()[0].strip()
        if torch.version.cuda:
            return f"CUDA runtime {torch.version.cuda} (driver version not readable)"
    if device_type == "cpu":
        return "n/a (CPU)"
    return UNKNOWN


def accelerator(device: torch.device) -> Dict[str, object]:
    if device.type == "cpu":
        return {"name": f"CPU: {cpu_model()}", "count": os.cpu_count(), "memory_gib": memory_gib()}
    module = getattr(torch, device.type, None)
    info: Dict[str, object] = {"name": UNKNOWN, "count": None, "memory_gib": None}
    try:
        props = module.get_device_properties(device)
        info["name"] = getattr(props, "name", UNKNOWN)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    except Exception:
        pass
    try:
        info["count"] = module.device_count()
    except Exception:
        pass
    return info


def versions(names: Iterable[str]) -> Dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe(device: torch.device, plugins: Iterable[str] = (), interconnect: Optional[str] = None) -> Dict[str, object]:
    """The environment block of the report, for the device under test."""
    plugin_versions = {}
    for name in plugins:
        module = __import__(name)
        plugin_versions[name] = str(getattr(module, "__version__", UNKNOWN))
    return {
        "host": socket.gethostname(),
        "hardware": f"{cpu_model()}, {os.cpu_count()} logical cores, {memory_gib()} GiB memory",
        "accelerator": accelerator(device),
        "interconnect": interconnect or ("shared memory (one host)" if device.type == "cpu" else UNKNOWN),
        "os": os_name(),
        "kernel": platform.release(),
        "driver": driver(device.type),
        "python": platform.python_version(),
        "framework": f"PyTorch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
        "plugins": plugin_versions,
        "dependencies": versions(DEPENDENCIES),
    }

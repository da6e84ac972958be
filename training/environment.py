"""What the report says about the machine: hardware, accelerator, OS, driver, framework and versions.

Only what can be read without a vendor tool; anything unknown is reported as unknown, never guessed.
What differs between device types (name, memory, driver, runtime) comes from :mod:`runtime.device`.
"""
import os
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from runtime.device import Device, cpu_model

UNKNOWN = "unknown"
DEPENDENCIES = (
    "torchvision",
    "numpy",
    "scipy",
    "pycocotools",
    "pillow",
    "matplotlib",
    "pytest",
    "pytest-benchmark",
    "hypothesis",
)


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def memory_gib() -> Optional[float]:
    """The host's physical memory."""
    try:
        return round(Device(torch.device("cpu")).total_memory() / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def os_name() -> str:
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()


def driver(xpu: Device) -> str:
    return xpu.driver_version() or (UNKNOWN if xpu.accelerator else "n/a (CPU)")


def accelerator(xpu: Device) -> Dict[str, object]:
    info: Dict[str, object] = {"name": UNKNOWN, "count": None, "memory_gib": None}
    for key, read in (
        ("name", xpu.name),
        ("count", xpu.count),
        ("memory_gib", lambda: round(xpu.total_memory() / 2**30, 1)),
    ):
        try:
            info[key] = read()
        except Exception:  # a vendor's backend without the call
            pass
    return info


def framework(xpu: Device) -> str:
    """PyTorch's version and, in brackets, the device runtime's libraries it was built against."""
    runtime = ", ".join(f"{name} {version}" for name, version in xpu.runtime_version().items())
    return f"PyTorch {torch.__version__}" + (f" ({runtime})" if runtime else "")


def versions(names: Iterable[str]) -> Dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe(
    device: torch.device, plugins: Iterable[str] = (), interconnect: Optional[str] = None
) -> Dict[str, object]:
    """The environment block of the report, for the device under test."""
    xpu = Device(device)
    plugin_versions = {}
    for name in plugins:
        module = __import__(name)
        plugin_versions[name] = str(getattr(module, "__version__", UNKNOWN))
    return {
        "host": socket.gethostname(),
        "hardware": f"{cpu_model()}, {os.cpu_count()} logical cores, {memory_gib()} GiB memory",
        "accelerator": accelerator(xpu),
        "interconnect": interconnect or (UNKNOWN if xpu.accelerator else "shared memory (one host)"),
        "os": os_name(),
        "kernel": platform.release(),
        "driver": driver(xpu),
        "python": platform.python_version(),
        "framework": framework(xpu),
        "plugins": plugin_versions,
        "dependencies": versions(DEPENDENCIES),
    }

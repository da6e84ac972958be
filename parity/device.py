"""The device under test: the suite's name for :mod:`detr.device`, which owns every difference
between device types (resolution of ``--xpu``, the backends, the ``cpu-alt`` variant)."""
from detr.device import (BACKENDS, KNOWN_PLUGINS, VARIANTS, Backend, Device, DeviceError, available_backends,
                         backend_for, device_count, import_plugins, register_backend, resolve, resolve_device,
                         variants)

__all__ = ["BACKENDS", "KNOWN_PLUGINS", "VARIANTS", "Backend", "Device", "DeviceError", "available_backends",
           "backend_for", "device_count", "import_plugins", "register_backend", "resolve", "resolve_device", "variants"]

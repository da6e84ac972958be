"""A worked vendor plugin: a new device in one small file, and a tolerance table given by hook.

Run it on this machine with ``pytest -p examples.vendor_plugin -m xpu --xpu cpu-1thread``. A real
vendor's version lives in its own package, registered with a ``pytest11`` entry point, or in the
``conftest.py`` of its CI checkout; the suite is not edited.
"""
import contextlib
from typing import Iterator

import torch

from runtime.device import CpuBackend

# A made-up vendor's math-library table (float32 ulps), to show the mechanism: a real one comes
# from the vendor's documentation, as CUDA's does for the suite's own "cuda" table.
EXAMPLE_ULP_TABLE = {"sin": 24, "cos": 24}


class OneThreadCpu(CpuBackend):
    """The CPU with oneDNN on but one thread: sums and matmuls split their work differently from
    the baseline's two threads, so it is a correct device that is not the baseline."""

    @contextlib.contextmanager
    def kernels(self) -> Iterator[None]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def pytest_detr_register_devices(register):
    register("cpu-1thread", OneThreadCpu())


def pytest_detr_adjust_error_model(model, part, precision, device):
    if device.label == "cpu-1thread" and precision == "fp32":
        for function, ulps in EXAMPLE_ULP_TABLE.items():
            model.set_ulp_budget(function, ulps, "example vendor math library table")

"""The numeric precision a part runs in: how its module and inputs are cast, and which switches
(autocast, TF32) are on while it runs.

``fp32``  float32, TF32 off.
``tf32``  float32 with TF32 allowed in matmuls and convolutions. The CPU baseline cannot be
          trusted to have TF32, so it emulates it: the float32 inputs of matmul-like ops are
          rounded to TF32 (10-bit mantissa) before the float32 kernel runs.
``amp``   float32 weights, ``torch.autocast`` to the device's low-precision dtype; the CPU
          baseline autocasts to the same dtype.
``fp16``, ``bf16``  module and floating inputs cast to that dtype.
"""
import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch

from runtime import compat
from runtime.device import Device
from runtime.precision import PRECISIONS, parse_precision_names

_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Ops whose float32 inputs a TF32 device rounds; the emulated CPU baseline rounds them likewise.
TF32_OPS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.addbmm", "aten.convolution",
            "aten.convolution_backward", "aten._convolution", "aten.matmul", "aten.linear")


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Rounds float32 values to the nearest TF32 value (10 explicit mantissa bits), ties to even.
    Non-float32 tensors and non-finite values come back unchanged. Any shape."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).reshape(x.shape)


class Tf32Emulation(compat.TorchDispatchMode):
    """Rounds the float32 tensor inputs of matmul-like ops to TF32, as TF32 hardware does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func.overloadpacket) in TF32_OPS:
            round_leaf = lambda t: round_to_tf32(t) if isinstance(t, torch.Tensor) else t
            args, kwargs = compat.tree_map(round_leaf, (args, kwargs))
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Precision:
    """One of :data:`PRECISIONS`; see the module docstring for what each means."""

    name: str

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"unknown precision {self.name!r}; accepted: {', '.join(PRECISIONS)}")

    def __str__(self) -> str:
        return self.name

    def cast_dtype(self) -> torch.dtype:
        """The dtype parameters and floating inputs are cast to."""
        return _CAST_DTYPES.get(self.name, torch.float32)

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        """The low-precision dtype of ``amp`` on ``device`` (the same dtype is used on the CPU)."""
        return Device(torch.device(device)).autocast_dtype()

    def prepare(self, module: torch.nn.Module, inputs: Any, device: torch.device) -> Tuple[torch.nn.Module, Any]:
        """Moves ``module`` (in place) and a pytree of ``inputs`` to ``device`` in this precision's
        dtype; integer and bool tensors only move."""
        dtype = self.cast_dtype()
        module = module.to(device=device, dtype=dtype)
        return module, cast_tree(inputs, device, dtype)

    @contextlib.contextmanager
    def backend(self, device: torch.device, emulate_tf32: bool = False) -> Iterator[None]:
        """TF32 switches for a run on ``device`` (and TF32 emulation when asked), restored after.
        No autocast: this is the context for replaying single aten ops."""
        emulated = Tf32Emulation() if (self.name == "tf32" and emulate_tf32) else contextlib.nullcontext()
        with Device(torch.device(device)).tf32(self.name == "tf32" and not emulate_tf32), emulated:
            yield

    @contextlib.contextmanager
    def run(self, device: torch.device, emulate_tf32: bool = False,
            autocast_dtype: Optional[torch.dtype] = None) -> Iterator[None]:
        """:meth:`backend` plus :meth:`autocast`: the context for running a whole module. The CPU
        baseline of ``amp`` passes the device under test's dtype as ``autocast_dtype``."""
        with self.backend(device, emulate_tf32), self.autocast(device, autocast_dtype):
            yield

    @contextlib.contextmanager
    def autocast(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
        """``torch.autocast`` on ``device`` to ``dtype`` (default: the device's) for ``amp``; a
        no-op for the other precisions."""
        device = torch.device(device)
        if self.name != "amp":
            yield
            return
        with torch.autocast(device_type=device.type, dtype=dtype or self.autocast_dtype(device)):
            yield


def cast_tree(tree: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Moves every tensor of a pytree to ``device``; floating ones are also cast to ``dtype``."""

    def cast(leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        moved = leaf.detach().to(device=device, dtype=dtype if leaf.is_floating_point() else None)
        return moved.requires_grad_(leaf.requires_grad) if moved.is_floating_point() else moved

    return compat.tree_map(cast, tree)


def parse_precisions(spec: str) -> List[Precision]:
    """``"fp32,bf16"`` -> [Precision("fp32"), Precision("bf16")]; ValueError names the accepted ones."""
    return [Precision(n) for n in parse_precision_names(spec)]


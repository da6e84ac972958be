"""A FLOP counter for matmuls and convolutions (forward and backward), for torch builds without
``torch.utils.flop_counter`` (before 2.1). It counts what ``FlopCounterMode`` counts for the ops
DETR runs, 2 FLOPs per multiply-add, and agrees with it where both exist (tests/test_flops.py).
"""
import math
from collections import Counter
from typing import Any, Callable, Dict, Sequence

import torch

from . import compat

aten = torch.ops.aten


def _mm(a: Sequence[int], b: Sequence[int]) -> int:
    """[m, k] @ [k, n]."""
    return 2 * a[0] * a[1] * b[1]


def _bmm(a: Sequence[int], b: Sequence[int]) -> int:
    """[B, m, k] @ [B, k, n]."""
    return 2 * a[0] * a[1] * a[2] * b[2]


def _conv(x: Sequence[int], w: Sequence[int], out: Sequence[int], transposed: bool) -> int:
    """A convolution of x [N, C, *] by w [C_out, C_in / groups, *kernel] into out [N, C_out, *]:
    every output position (input position when transposed) takes C_in / groups * kernel taps."""
    positions = math.prod((x if transposed else out)[2:])
    return 2 * x[0] * positions * w[0] * w[1] * math.prod(w[2:])


def _swap(shape: Sequence[int]) -> list:
    return [shape[1], shape[0], *shape[2:]]


def _conv_backward(args, out) -> int:
    grad_out, x, w = (t.shape for t in args[:3])
    transposed, mask = args[7], args[10]
    flops = 0
    if mask[0]:  # the input's gradient: a convolution of the output's gradient the other way
        flops += _conv(grad_out, w, out[0].shape, not transposed)
    if mask[1]:  # the weight's gradient: input and output gradient correlated over the batch
        first, second = (grad_out, x) if transposed else (x, grad_out)
        flops += _conv(_swap(first), _swap(second), _swap(out[1].shape), False)
    return flops


FORMULAS: Dict[object, Callable] = {
    aten.mm.default: lambda args, out: _mm(args[0].shape, args[1].shape),
    aten.addmm.default: lambda args, out: _mm(args[1].shape, args[2].shape),
    aten.bmm.default: lambda args, out: _bmm(args[0].shape, args[1].shape),
    aten.baddbmm.default: lambda args, out: _bmm(args[1].shape, args[2].shape),
    aten.convolution.default: lambda args, out: _conv(args[0].shape, args[1].shape, out.shape, args[6]),
    aten.convolution_backward.default: _conv_backward,
}


class FlopCounter(compat.TorchDispatchMode):
    """``with FlopCounter() as c: ...`` then ``c.get_total_flops()``; ``c.counts`` per op packet."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = FORMULAS.get(func)
        if formula is not None:
            self.counts[str(func.overloadpacket)] += int(formula(args, out))
        return out

    def get_total_flops(self) -> int:
        return sum(self.counts.values())


def flop_counter() -> Any:
    """A context that counts FLOPs, with ``get_total_flops()``: ``FlopCounterMode`` (torch 2.1 and
    newer), else the suite's own counter of matmuls and convolutions (:mod:`runtime.flops`)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        compat.fall_back("torch.utils.flop_counter", "FLOPs are counted by runtime.flops (matmuls and convolutions)")
        return FlopCounter()
    return FlopCounterMode(display=False)

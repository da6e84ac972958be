"""``cpu-splitk``: the CPU computing its reductions in other correct fp32 orders, from real torch ops.

Under :class:`SplitK` a matmul (mm, bmm, addmm, baddbmm) sums its K terms as ``parts`` partial
products added one after another in fp32, as a split-K GEMM does; a 2-d convolution (groups 1)
splits its input channels, its input gradient the output channels, and its weight and bias
gradients the images of the batch; a sum adds blocks of its first reduced dimension (all
dimensions when none are named). ``parts`` grows with K, one part per ``TERMS_PER_PART`` terms, up
to ``MAX_PARTS``. Each part runs the CPU's own kernel, so the result is another correct order, not
an emulation of one.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import compat

TERMS_PER_PART = 32
MAX_PARTS = 16


def parts_of(k: int) -> int:
    return max(1, min(MAX_PARTS, k // TERMS_PER_PART))


def _chunks(n: int, parts: int) -> List[slice]:
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def _added(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return total


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] as split-K partial products, added in order."""
    k = a.shape[-1]
    return _added([torch.matmul(a[..., s], b[..., s, :]) for s in _chunks(k, parts_of(k))])


def _mm(func, args, kwargs):
    return _matmul(args[0], args[1])


def _addmm(func, args, kwargs):
    names = ("self", "mat1", "mat2", "beta", "alpha")
    bound = dict(zip(names, args), **kwargs)
    beta, alpha = bound.get("beta", 1), bound.get("alpha", 1)
    product = _matmul(bound["mat1"], bound["mat2"])
    product = product * alpha if alpha != 1 else product
    return product if beta == 0 else product + (bound["self"] * beta if beta != 1 else bound["self"])


def _plain(weight: torch.Tensor, transposed: bool, groups: int) -> bool:
    return weight.dim() == 4 and not transposed and groups == 1


def _split(channels: int, per_channel: int) -> List[slice]:
    return _chunks(channels, min(parts_of(channels * per_channel), channels))


def _convolution(func, args, kwargs):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    if not _plain(w, transposed, groups) or len(_split(w.shape[1], w[0, 0].numel())) < 2:
        return None
    out = _added([torch.ops.aten.convolution(x[:, s], w[:, s], None, stride, padding, dilation, False,
                                             output_padding, 1) for s in _split(w.shape[1], w[0, 0].numel())])
    return out + bias.reshape(1, -1, 1, 1) if bias is not None else out


def _convolution_backward(func, args, kwargs):
    grad, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = args[:11]
    if not _plain(w, transposed, groups):
        return None
    geometry = (stride, padding, dilation, False, output_padding, 1)
    grad_input = grad_weight = grad_bias = None
    if mask[0]:
        grad_input = _added([torch.ops.aten.convolution_backward(grad[:, s], x, w[s], None, *geometry,
                                                                 [True, False, False])[0]
                             for s in _split(w.shape[0], w[0, 0].numel())])
    images = _chunks(x.shape[0], x.shape[0])
    if mask[1]:
        grad_weight = _added([torch.ops.aten.convolution_backward(grad[s], x[s], w, None, *geometry,
                                                                  [False, True, False])[1] for s in images])
    if mask[2]:
        grad_bias = _added([grad[s].sum((0, 2, 3)) for s in images])
    return grad_input, grad_weight, grad_bias


def _sum(func, args, kwargs):
    bound = dict(zip(("self", "dim", "keepdim"), args), **kwargs)
    x = bound["self"]
    if not x.is_floating_point() or bound.get("dtype") is not None or x.dim() == 0:
        return None
    dims = sorted({d % x.dim() for d in bound.get("dim") or range(x.dim())})
    k = math.prod(x.shape[d] for d in dims)
    blocks = _chunks(x.shape[dims[0]], min(parts_of(k), x.shape[dims[0]]))
    if len(blocks) < 2:
        return None
    out = _added([x.narrow(dims[0], s.start, s.stop - s.start).sum(dims, keepdim=True) for s in blocks])
    if not bound.get("keepdim", False):
        for d in reversed(dims):
            out = out.squeeze(d)
    return out


ORDERS: Dict[str, Callable[..., Optional[Any]]] = {
    "aten.mm": _mm, "aten.bmm": _mm, "aten.addmm": _addmm, "aten.baddbmm": _addmm,
    "aten.convolution": _convolution, "aten.convolution_backward": _convolution_backward,
    "aten.sum": _sum,
}


class SplitK(compat.TorchDispatchMode):
    """Runs the ops of :data:`ORDERS` in split-K and blocked fp32 orders (float32 CPU tensors only;
    every other call, and a call an order declines, runs as it is)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        order = ORDERS.get(str(func.overloadpacket))
        tensors = [t for t in compat.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if order is not None and func._schema.is_mutable is False and tensors and all(
                t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors if t.is_floating_point()):
            result = order(func, args, kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)

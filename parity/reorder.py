"""The error of summing in another order, drawn at random: what a correct device whose reductions
use other blocks, tiles or split-K parts than the CPU's looks like to the judge.

A sum of K terms t_k, added one by one in float arithmetic of unit roundoff u, rounds each running
sum s_i once. Rounded to nearest, that error is uniform over one spacing of floats, 2 u 2^e for
|s_i| in [2^e, 2^(e+1)); with the leading digits of s_i log-uniform (Benford's law) its variance is
u^2 s_i^2 / (8 ln 2). For terms of mixed signs (gradients, centred activations) the running sums
walk like a random walk, sum_i s_i^2 ~ K E / 2 with E = sum_k t_k^2, and one element's error has
standard deviation

    sigma = u sqrt(K E / (16 ln 2)),

which a sequential float32 sum of normal terms matches within a few per cent for K from 64 to
16384 and magnitudes from 1e-3 to 1e4 (tests/parity/test_reorder.py).

``E`` costs one more call of the same op on squared operands (mm(a^2, b^2), convolution(x^2, w^2),
convolution_backward(g^2, x^2, w^2), sum(x^2)), which is why only these ops are covered. A
one-ulp change of the output, which :mod:`parity.ulp` gives every op, is far smaller where the
terms cancel: a weight gradient near zero is a difference of large partial sums, and after
gradient clipping AdamW turns its error into a visible change of the weight (eps = 1e-8).

Sequential order is the widest of the correct ones (pairwise and blocked orders err by less), so
members drawn this way bound the orders a device may use; drifting sums of one sign err more and
are not modelled (they do not cancel, and their relative error stays small).
"""
import math
from typing import List, Optional, Sequence

import torch

COVERED = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "sum", "mean")


def _squared(t):
    """t^2, in float32 at least: a half-precision square overflows above 256."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    t = t.float() if t.element_size() < 4 else t
    return t * t


def convolution_terms(weight: torch.Tensor, transposed: bool, groups: int) -> int:
    """Terms of each output element of a convolution: input channels per group times the kernel."""
    channels = weight.shape[0] // groups if transposed else weight.shape[1]
    return int(channels * math.prod(weight.shape[2:]))


def input_grad_terms(weight: torch.Tensor, transposed: bool, groups: int) -> int:
    """Terms of each element of a convolution's input gradient: output channels per group times the kernel."""
    channels = weight.shape[1] if transposed else weight.shape[0] // groups
    return int(channels * math.prod(weight.shape[2:]))


def energies(func: torch._ops.OpOverload, args: Sequence, kwargs: dict) -> List[Optional[tuple]]:
    """Per output of the call: (E, K), the sum of squared terms of each output element [shape of the
    output] and the number of terms, or None where the op or output is not covered."""
    name = str(func.overloadpacket).split(".")[-1]
    if name not in COVERED or kwargs.get("out") is not None:
        return []
    if name in ("mm", "bmm"):
        return [(func(_squared(args[0]), _squared(args[1])), args[0].shape[-1])]
    if name in ("addmm", "baddbmm"):
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        product = torch.mm if name == "addmm" else torch.bmm
        energy = product(_squared(args[1]), _squared(args[2])) * alpha ** 2
        energy = energy + _squared(args[0]) * beta ** 2 if beta else energy  # beta = 0 ignores the input
        return [(energy, args[1].shape[-1] + 1)]
    if name == "convolution":
        x, w = args[0], args[1]
        return [(func(_squared(x), _squared(w), None, *args[3:]), convolution_terms(w, args[6], args[8]))]
    if name == "convolution_backward":
        grad, x, w = args[0], args[1], args[2]
        transposed, groups = args[7], args[9]
        squared = func(_squared(grad), _squared(x), _squared(w), *args[3:])
        k_input = input_grad_terms(w, transposed, groups)
        k_weight = grad.shape[0] * math.prod((x if transposed else grad).shape[2:])
        return [(squared[0], k_input) if squared[0] is not None else None,
                (squared[1], k_weight) if squared[1] is not None else None,
                (squared[2], grad.shape[0] * math.prod(grad.shape[2:])) if squared[2] is not None else None]
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return []
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    squared = _squared(x)
    # a whole-tensor sum has one element whatever keepdim says; draw reshapes it to the output
    energy = squared.sum(dims, keepdim=keepdim) if dims is not None and len(dims) else squared.sum()
    k = x.numel() // max(energy.numel(), 1)
    if name == "mean":
        energy = energy / (k * k)
    return [(energy, k)]


def draw(output: torch.Tensor, energy: torch.Tensor, terms: int, scale: float,
         generator: torch.Generator) -> torch.Tensor:
    """``output`` plus ``scale`` times a Gaussian draw of the error of another summation order."""
    u = torch.finfo(output.dtype).eps / 2
    variance = energy.to(torch.float64) * (terms / (16 * math.log(2)))
    sigma = variance.clamp(min=0).sqrt().nan_to_num(0.0, 0.0, 0.0) * (u * scale)
    noise = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.device)
    return (output.to(torch.float64) + noise * sigma.reshape(output.shape)).to(output.dtype)

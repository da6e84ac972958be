"""Units in the last place: the error of a correct float result, and perturbations of that size.

``perturb_ulps`` moves each element by a whole number of representable steps, so "k ulps" is exact
(no second rounding): it models a correct accelerator's last-bit differences in self-tests and
gives the ensemble's members their ulp-level perturbations.
"""
from typing import Optional

import torch

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding to ``dtype`` (2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def perturb_ulps(x: torch.Tensor, k: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x`` with each finite non-zero element moved by j representable steps, j a whole number
    drawn uniformly from -floor(k)..floor(k): never more than k ulps of the larger of the old and
    the new value (a step across a power of two changes the ulp); zeros, NaN and Inf stay. Any shape and float
    dtype; same device and dtype. A step that would cross zero or overflow keeps the element."""
    steps_max = int(k)
    if not x.is_floating_point() or x.dtype not in _INT_VIEW or steps_max < 1 or x.numel() == 0:
        return x
    cpu = x.detach().to("cpu").contiguous()
    bits = cpu.view(_INT_VIEW[x.dtype])
    steps = torch.randint(-steps_max, steps_max + 1, cpu.shape, generator=generator, dtype=bits.dtype)
    # A step on the bit pattern moves the magnitude by one representable value, either sign.
    moved = (bits + steps).view(cpu.dtype)
    keep = ~torch.isfinite(cpu) | (cpu == 0) | ~torch.isfinite(moved) | (torch.sign(moved) != torch.sign(cpu))
    return torch.where(keep, cpu, moved).to(x.device)


def ulps_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in ulps of ``b``'s dtype at the larger of |a| and |b| (float64, their shape)."""
    eps = torch.finfo(b.dtype).eps
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    _, exponent = torch.frexp(torch.maximum(a64.abs(), b64.abs()))
    # below the smallest normal number the spacing stays that of the subnormals
    ulp = torch.ldexp(torch.full_like(b64, eps), exponent - 1).clamp(min=torch.finfo(b.dtype).tiny * eps)
    return (a64 - b64).abs() / ulp

"""Error metrics of one tensor against its golden value, all in float64 on the CPU, and the values
that index outputs (argmax, sort and topk indices, max-pool indices) select.

Metrics cover the positions that are finite in every tensor compared; where NaN and Inf are is
judged separately from :func:`nonfinite_masks`.
"""
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from runtime import compat

# Denominator floor of the relative error, as a share of the golden tensor's largest magnitude:
# near-zero golden values would otherwise turn tiny absolute errors into huge relative ones.
REL_FLOOR = 1e-3


@dataclass
class TensorMetrics:
    """Errors of ``actual`` against ``golden`` over the ``compared`` positions finite in both."""

    max_abs: float
    max_rel: float
    cosine: float
    rmse: float
    compared: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU view of ``t``: no copy when it already is one."""
    return t.detach().to("cpu", torch.float64)


def nonfinite_masks(t: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Boolean CPU masks, shape of ``t``: ``nan``, ``posinf``, ``neginf``."""
    x = t.detach().cpu()
    if not (x.is_floating_point() or x.is_complex()):
        none = torch.zeros(x.shape, dtype=torch.bool)
        return {"nan": none, "posinf": none, "neginf": none}
    return {"nan": torch.isnan(x), "posinf": torch.isposinf(x), "neginf": torch.isneginf(x)}


def rms(t: torch.Tensor) -> float:
    """Root mean square of the finite elements, float64."""
    x = as_float64(t)
    x = x[torch.isfinite(x)]
    return float(x.square().mean().sqrt()) if x.numel() else 0.0


def as_numpy64(t: torch.Tensor) -> np.ndarray:
    """A flat float64 numpy copy of ``t``. The metrics run in numpy: single-threaded, they do not
    stall on a loaded host the way small multi-threaded torch ops do."""
    x = t.detach().cpu()
    if x.dtype == torch.bfloat16 or compat.itemsize(x.dtype) == 1:
        x = x.float()
    return x.numpy().astype(np.float64).reshape(-1)


def all_finite(a: np.ndarray) -> bool:
    """One pass: a float64 sum of float values is finite exactly when every value is."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(a.sum()))


def rms_finite(a: np.ndarray) -> float:
    return math.sqrt(float((a * a).sum()) / a.size) if a.size else 0.0


def compare_finite(a: np.ndarray, g: np.ndarray) -> TensorMetrics:
    """:func:`compare` for flat float64 arrays known to be finite everywhere: no masking passes."""
    if a.size == 0:
        return TensorMetrics(0.0, 0.0, 1.0, 0.0, 0)
    diff = a - g
    rmse = rms_finite(diff)
    np.abs(diff, out=diff)
    g_abs = np.abs(g)
    floor = max(REL_FLOOR * float(g_abs.max()), torch.finfo(torch.float64).tiny)
    a_norm, g_norm = math.sqrt(float((a * a).sum())), math.sqrt(float((g * g).sum()))
    if a_norm * g_norm > 0:
        cosine = float((a * g).sum()) / (a_norm * g_norm)
    else:
        cosine = 1.0 if a_norm == g_norm == 0.0 else 0.0
    max_abs = float(diff.max())
    np.maximum(g_abs, floor, out=g_abs)
    return TensorMetrics(
        max_abs=max_abs,
        max_rel=float(np.divide(diff, g_abs, out=diff).max()),
        cosine=max(-1.0, min(1.0, cosine)),
        rmse=rmse,
        compared=int(a.size),
    )


def metrics_of_difference(diff: np.ndarray, g: np.ndarray) -> TensorMetrics:
    """:func:`compare_finite` from ``actual - golden`` (flat, finite), in fewer passes."""
    if diff.size == 0:
        return TensorMetrics(0.0, 0.0, 1.0, 0.0, 0)
    abs_diff, g_abs = np.abs(diff), np.abs(g)
    floor = max(REL_FLOOR * float(g_abs.max()), torch.finfo(torch.float64).tiny)
    gg, dg, dd = float(g @ g), float(diff @ g), float(diff @ diff)
    aa = gg + 2 * dg + dd
    cosine = (gg + dg) / math.sqrt(aa * gg) if aa * gg > 0 else (1.0 if aa == gg == 0.0 else 0.0)
    np.maximum(g_abs, floor, out=g_abs)
    return TensorMetrics(max_abs=float(abs_diff.max()), max_rel=float((abs_diff / g_abs).max()),
                         cosine=max(-1.0, min(1.0, cosine)), rmse=math.sqrt(dd / diff.size), compared=int(diff.size))


def rmse_of_difference(diff: np.ndarray) -> TensorMetrics:
    """Only the RMSE (and count) of ``actual - golden``: the other fields are NaN. For the
    baseline beside a device, where reports show its RMSE alone."""
    nan = float("nan")
    rmse = math.sqrt(float(diff @ diff) / diff.size) if diff.size else 0.0
    return TensorMetrics(max_abs=nan, max_rel=nan, cosine=nan, rmse=rmse, compared=int(diff.size))


def compare(actual: torch.Tensor, golden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> TensorMetrics:
    """Metrics of ``actual`` vs ``golden`` (same shape), restricted to ``mask`` if given and to the
    positions finite in both. Cosine of two all-zero tensors is 1, of one all-zero tensor 0."""
    a, g = as_float64(actual).reshape(-1), as_float64(golden).reshape(-1)
    keep = torch.isfinite(a) & torch.isfinite(g)
    if mask is not None:
        keep &= mask.reshape(-1).cpu()
    return compare_finite(a[keep].numpy(), g[keep].numpy())


def mismatches(actual: torch.Tensor, golden: torch.Tensor) -> int:
    """Positions where two integer or bool tensors differ."""
    return int((actual.detach().cpu() != golden.detach().cpu()).sum())


# Ops whose outputs at these positions are indices into the input ``self`` along ``dim``.
INDEX_OUTPUTS = {
    "aten.argmax": (0,), "aten.argmin": (0,),
    "aten.max": (1,), "aten.min": (1,), "aten.median": (1,), "aten.nanmedian": (1,),
    "aten.mode": (1,), "aten.kthvalue": (1,), "aten.topk": (1,), "aten.sort": (1,),
    "aten.cummax": (1,), "aten.cummin": (1,),
    "aten.max_pool2d_with_indices": (1,), "aten.max_pool3d_with_indices": (1,),
}


def is_index_output(op: str, position: int, output: Optional[torch.Tensor]) -> bool:
    """True when output ``position`` of ``op`` (packet name, e.g. ``aten.topk``) holds indices
    to be judged by the values they select."""
    return output is not None and not output.is_floating_point() and position in INDEX_OUTPUTS.get(op, ())


def bind_arguments(func: Any, args: Sequence, kwargs: Mapping) -> Dict[str, Any]:
    """Argument name -> value for an aten overload call, defaults filled in."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def selected_values(func: Any, args: Sequence, kwargs: Mapping, indices: torch.Tensor) -> torch.Tensor:
    """The float64 values of the op's input ``self`` that ``indices`` (an index output of ``func``,
    see :data:`INDEX_OUTPUTS`) select; shape of ``indices``. Ties select equal values, so a device
    that breaks ties differently is not wrong."""
    bound = bind_arguments(func, args, kwargs)
    source = as_float64(bound["self"])
    idx = indices.detach().cpu().long()
    op = str(func.overloadpacket)
    if op.startswith("aten.max_pool"):
        spatial = 2 if "2d" in op else 3
        flat_src = source.flatten(-spatial)
        return flat_src.gather(-1, idx.flatten(-spatial)).reshape(idx.shape)
    dim = bound.get("dim")
    if dim is None:
        return source.reshape(-1)[idx]
    if source.dim() == 0:
        return source.reshape(idx.shape)
    keepdim = bool(bound.get("keepdim") or False)
    if idx.dim() < source.dim() and not keepdim:
        return source.gather(dim, idx.unsqueeze(dim)).squeeze(dim)
    return source.gather(dim, idx)


def finite_everywhere(*tensors: torch.Tensor) -> torch.Tensor:
    """Positions finite in every tensor (CPU bool mask, their common shape)."""
    mask = None
    for t in tensors:
        m = torch.isfinite(t.detach().cpu()) if t.is_floating_point() else torch.ones(t.shape, dtype=torch.bool)
        mask = m if mask is None else mask & m
    return mask

"""The judgement rule. For one output of one op, with golden G (float64), baseline B (trusted CPU
in the precision under test) and device D:

    ratio = rmse(D, G) / max(rmse(B, G), floor)        pass  <=>  ratio <= bound
                                                             and NaN/+Inf/-Inf in D exactly where in B

``floor = FLOOR_ULPS * eps(dtype) * max(rms(G), tiny(dtype))`` with ``FLOOR_ULPS = 1/4``: a quarter
of a unit of rounding of the output's dtype at the output's magnitude, just below the RMS error of
a correctly rounded result (about 0.3 eps rms), so it only matters where the baseline is better
than rounding. Without it an op the baseline computes exactly (relu, a cast, a max: rmse 0) would
make 0/0, or fail the device for any last-bit difference; with it an exact device (0/floor)
passes and a device within ``bound/4`` units of rounding (RMS) passes. ``tiny`` keeps the floor
positive for all-zero outputs, where any non-zero device value then fails. ``eps`` is that of the
baseline's output dtype (of the op's input for index outputs).

Index outputs (argmax, sort, topk, max-pool indices) are judged as the float values they select
from the op's input, so ties broken differently pass. Other integer and bool outputs pass when the
device equals the baseline, or disagrees with golden at no more positions than the baseline does.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .metrics import (TensorMetrics, all_finite, as_numpy64, compare, compare_finite, finite_everywhere, mismatches,
                      nonfinite_masks, rms, rms_finite)

FLOOR_ULPS = 0.25


@dataclass
class OutputJudgement:
    """Verdict on one output tensor of one op."""

    position: int
    kind: str  # "float", "index", "integer"
    passed: bool
    verdict: str
    ratio: float
    floor: float = 0.0
    device: Optional[TensorMetrics] = None
    baseline: Optional[TensorMetrics] = None
    mismatches: Optional[int] = None


def error_floor(golden: torch.Tensor, dtype: torch.dtype, golden_rms: Optional[float] = None) -> float:
    """A quarter unit of rounding of ``dtype`` at the magnitude (RMS) of ``golden``."""
    info = torch.finfo(dtype if dtype.is_floating_point else torch.float32)
    return FLOOR_ULPS * info.eps * max(rms(golden) if golden_rms is None else golden_rms, info.tiny)


def error_ratio(device_rmse: float, baseline_rmse: float, floor: float) -> float:
    """``device_rmse / max(baseline_rmse, floor)``; 0 when the device is exact, inf for NaN."""
    if device_rmse == 0:
        return 0.0
    if math.isnan(device_rmse):
        return math.inf
    return device_rmse / max(baseline_rmse, floor)


def format_bound(bound: float) -> str:
    return f"{bound:g}"


def nonfinite_verdict(device: torch.Tensor, baseline: torch.Tensor) -> Optional[str]:
    """Why the NaN/Inf layout of ``device`` differs from ``baseline``'s, or None."""
    d, b = nonfinite_masks(device), nonfinite_masks(baseline)
    baseline_finite = ~(b["nan"] | b["posinf"] | b["neginf"])
    for key, label in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf")):
        extra = d[key] & ~b[key]
        count = int(extra.sum())
        if count:
            where = "is finite" if bool(baseline_finite[extra].all()) else f"has no {label}"
            return f"fail: {label} at {count} position{'s' * (count != 1)} where baseline {where}"
    for key, label in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf")):
        missing = int((b[key] & ~d[key]).sum())
        if missing:
            return f"fail: baseline has {label} at {missing} position{'s' * (missing != 1)} where device has not"
    return None


def _structure_verdict(device: torch.Tensor, baseline: torch.Tensor) -> Optional[str]:
    if tuple(device.shape) != tuple(baseline.shape):
        return f"fail: shape {list(device.shape)} != baseline {list(baseline.shape)}"
    if device.dtype != baseline.dtype:
        return f"fail: dtype {str(device.dtype)[6:]} != baseline {str(baseline.dtype)[6:]}"
    return None


def judge_float(device: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor, bound: float,
                dtype: Optional[torch.dtype] = None, position: int = 0, kind: str = "float",
                check_dtype: bool = True) -> OutputJudgement:
    """Judges one floating output (any shape; all three the same shape). ``dtype`` sets the floor's
    eps, default the baseline's dtype."""
    problem = _structure_verdict(device, baseline) if check_dtype else (
        None if tuple(device.shape) == tuple(baseline.shape)
        else f"fail: shape {list(device.shape)} != baseline {list(baseline.shape)}")
    if problem is None and tuple(golden.shape) != tuple(baseline.shape):
        problem = f"fail: golden shape {list(golden.shape)} != baseline {list(baseline.shape)}"
    if problem:
        return OutputJudgement(position, kind, False, problem, math.inf)
    d64, b64, g64 = as_numpy64(device), as_numpy64(baseline), as_numpy64(golden)
    if all_finite(d64) and all_finite(b64) and all_finite(g64):
        # The common case, in one pass per metric: no NaN/Inf layout to compare, nothing to mask.
        floor = error_floor(golden, dtype or baseline.dtype, rms_finite(g64))
        dev, base = compare_finite(d64, g64), compare_finite(b64, g64)
        verdict = None
    else:
        floor = error_floor(golden, dtype or baseline.dtype)
        mask = finite_everywhere(device, baseline, golden)
        dev, base = compare(device, golden, mask), compare(baseline, golden, mask)
        verdict = nonfinite_verdict(device, baseline)
    ratio = error_ratio(dev.rmse, base.rmse, floor)
    if verdict is None and ratio > bound:
        verdict = f"fail: error ratio {ratio:.3g} > {format_bound(bound)}"
    return OutputJudgement(position, kind, verdict is None, verdict or "pass", ratio, floor, dev, base)


def judge_integer(device: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor,
                  position: int = 0) -> OutputJudgement:
    """Judges an integer or bool output that is not an index: exact, or no worse than baseline."""
    problem = _structure_verdict(device, baseline)
    if problem:
        return OutputJudgement(position, "integer", False, problem, math.inf)
    if torch.equal(device.cpu(), baseline.cpu()):
        return OutputJudgement(position, "integer", True, "pass", 0.0, mismatches=0)
    golden = golden.to(baseline.dtype) if tuple(golden.shape) == tuple(baseline.shape) else baseline
    dev_bad, base_bad = mismatches(device, golden), mismatches(baseline, golden)
    ratio = dev_bad / max(base_bad, 1)
    if dev_bad <= base_bad:
        return OutputJudgement(position, "integer", True, "pass", ratio, mismatches=dev_bad)
    return OutputJudgement(position, "integer", False,
                           f"fail: {dev_bad} of {device.numel()} integer values differ from golden "
                           f"(baseline: {base_bad})", ratio, mismatches=dev_bad)

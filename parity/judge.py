"""The judgement rule. For one output of one op, with golden G (float64), baseline B (the trusted
CPU in the precision under test) and device D, and the allowed error A of each element from
:mod:`parity.errormodel`:

    margin = max |D - G| / A          pass  <=>  margin <= 1
                                             and NaN/+Inf/-Inf in D exactly where in B

The margin is the device's error in units of its allowance; the baseline's own margin is reported
beside it, so a reader sees how close a correct CPU kernel comes. Index outputs (argmax, sort,
topk, max-pool indices) are judged as the float values they select from the op's input, so ties
broken differently pass. Other integer and bool outputs pass when the device equals the baseline,
or disagrees with golden at no more positions than the baseline does.

An output bit-identical to the baseline's passes without a golden or an allowance: the baseline
is within its own allowance by construction (its margin is at most 1 / ``BASELINE_FACTOR``), so no
judgement could fail it. Reports count such outputs and leave their margin empty.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .errormodel import BASELINE_FACTOR, Allowance
from .metrics import (
    TensorMetrics,
    all_finite,
    as_numpy64,
    metrics_of_difference,
    mismatches,
    nonfinite_masks,
    rmse_of_difference,
)

IDENTICAL = "pass: bit-identical to the baseline"
_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def identical(device, baseline) -> bool:
    """True when both are tensors of one dtype and shape with the same bits everywhere: NaNs with
    the same payload are equal, -0.0 and +0.0 are not."""
    if not (isinstance(device, torch.Tensor) and isinstance(baseline, torch.Tensor)):
        return False
    if device.dtype != baseline.dtype or tuple(device.shape) != tuple(baseline.shape):
        return False
    device, baseline = device.detach().cpu(), baseline.detach().cpu()
    if device.is_complex():
        device, baseline = torch.view_as_real(device), torch.view_as_real(baseline)
    if device.is_floating_point():
        bits = _SAME_SIZE_INT[device.element_size()]
        return torch.equal(device.contiguous().view(bits), baseline.contiguous().view(bits))
    return torch.equal(device, baseline)


def identical_judgement(position: int = 0) -> "OutputJudgement":
    return OutputJudgement(position, "identical", True, IDENTICAL, 0.0, "identical")


@dataclass
class OutputJudgement:
    """Verdict on one output tensor of one op (or one final output of a part)."""

    position: int
    kind: str  # "float", "index", "integer", "ensemble", "structure", "identical"
    passed: bool
    verdict: str
    margin: float
    component: str = ""
    device: Optional[TensorMetrics] = None
    baseline: Optional[TensorMetrics] = None
    baseline_margin: Optional[float] = None
    mismatches: Optional[int] = None


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


def structure_verdict(device: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor,
                      check_dtype: bool = True) -> Optional[str]:
    """Why the three tensors cannot be compared element by element, or None."""
    if tuple(device.shape) != tuple(baseline.shape):
        return f"fail: shape {list(device.shape)} != baseline {list(baseline.shape)}"
    if check_dtype and device.dtype != baseline.dtype:
        return f"fail: dtype {str(device.dtype)[6:]} != baseline {str(baseline.dtype)[6:]}"
    if tuple(golden.shape) != tuple(baseline.shape):
        return f"fail: golden shape {list(golden.shape)} != baseline {list(baseline.shape)}"
    return None


def margin_of(difference: np.ndarray, allowed: np.ndarray) -> "tuple[float, int]":
    """The largest ``|difference| / allowed`` and where it is (-1 when empty). An exact element
    has margin 0 even where its allowance is 0."""
    if difference.size == 0:
        return 0.0, -1
    units = np.abs(difference)
    if allowed.min(initial=np.inf) > 0:
        np.divide(units, allowed, out=units)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            units = np.where(units == 0, 0.0, units / allowed)
    i = int(units.argmax())
    return float(units[i]), i


def rms_units(difference: np.ndarray, sigma: np.ndarray) -> float:
    """The RMS of ``difference / sigma`` (0 where both are 0, infinite where only sigma is)."""
    if difference.size == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.where(difference == 0, 0.0, difference / sigma)
    return float(np.sqrt(np.mean(np.square(units))))


def judge_float(device: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor, allowance: Allowance,
                position: int = 0, kind: str = "float", check_dtype: bool = True) -> OutputJudgement:
    """Judges one floating output (any shape; all three the same shape) against ``allowance``
    (one allowed error per element, flat, from :class:`parity.errormodel.ErrorModel`)."""
    problem = structure_verdict(device, baseline, golden, check_dtype)
    if problem:
        return OutputJudgement(position, kind, False, problem, math.inf)
    d, b, g = as_numpy64(device), as_numpy64(baseline), as_numpy64(golden)
    everywhere = all_finite(d) and all_finite(b) and all_finite(g)
    verdict, where = None, None
    allowed = allowance.values
    if not everywhere:
        finite = np.isfinite(d) & np.isfinite(b) & np.isfinite(g)
        verdict, where = nonfinite_verdict(device, baseline), np.flatnonzero(finite)
        d, b, g, allowed = d[finite], b[finite], g[finite], allowed[finite]
    d -= g
    b -= g
    margin, at = margin_of(d, allowed)
    base_margin, _ = margin_of(b, allowed)
    component = allowance.component(at if where is None else where[at]) if at >= 0 else ""
    if allowance.sigma is not None:
        sigma = allowance.sigma if where is None else allowance.sigma[where]
        device_rms, baseline_rms = rms_units(d, sigma), rms_units(b, sigma)
        limit = allowance.rms_limit * max(1.0, BASELINE_FACTOR * baseline_rms)
        base_margin = max(base_margin, baseline_rms / limit)
        if device_rms / limit > margin:
            margin, component = device_rms / limit, "reduction rms"
    if verdict is None and not margin <= 1:
        what = "RMS error" if component == "reduction rms" else "error"
        verdict = f"fail: {what} {margin:.3g}x its allowance ({component})"
    return OutputJudgement(position, kind, verdict is None, verdict or "pass", margin, component,
                           metrics_of_difference(d, g), rmse_of_difference(b), base_margin)


def judge_integer(device: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor,
                  position: int = 0) -> OutputJudgement:
    """Judges an integer or bool output that is not an index: exact, or no worse than baseline.
    The margin is the device's mismatches against golden over the baseline's."""
    problem = structure_verdict(device, baseline, baseline)
    if problem:
        return OutputJudgement(position, "integer", False, problem, math.inf)
    if torch.equal(device.cpu(), baseline.cpu()):
        return OutputJudgement(position, "integer", True, "pass", 0.0, "exact", mismatches=0)
    golden = golden.to(baseline.dtype) if tuple(golden.shape) == tuple(baseline.shape) else baseline
    dev_bad, base_bad = mismatches(device, golden), mismatches(baseline, golden)
    margin = dev_bad / base_bad if base_bad else (math.inf if dev_bad else 0.0)
    if dev_bad <= base_bad:
        return OutputJudgement(position, "integer", True, "pass", margin, "baseline", mismatches=dev_bad)
    return OutputJudgement(position, "integer", False,
                           f"fail: {dev_bad} of {device.numel()} integer values differ from golden "
                           f"(baseline: {base_bad})", margin, "baseline", mismatches=dev_bad)

"""Isolated replay and whole-run comparison.

Isolated replay takes a baseline :class:`~parity.capture.Trace` captured with ``keep="tensors"``
and, for every op, runs the same aten overload (a) on the device under test with the baseline's
exact inputs, in the baseline's dtypes, and (b) on the CPU in float64 (floating inputs and dtype
arguments upcast) as its golden; (c) the baseline output is the one recorded. Every op is judged
on its own, so the first failing op in execution order is the culprit, not an heir of its error.

Random ops (dropout, rand*, bernoulli: aten's ``nondeterministic_seeded`` tag) are skipped and
reported as skipped: their outputs depend on the device's generator, and the ops that consume a
dropout mask are still replayed with the baseline's mask. Where a float64 kernel is missing on the
CPU the golden falls back to float32, then to the baseline output itself, and the check says so.

An op whose every output is bit-identical to the baseline's passes without a golden (see
:mod:`parity.judge`). Each other output is judged against its allowance from
:class:`~parity.errormodel.ErrorModel`, computed from the op's own float64 inputs. The whole-run
comparison aligns the golden, baseline and device traces op by op and shows how error accumulates
through the model, as the ratio of the device's RMSE to the baseline's: information, not a verdict,
since inherited error is not the op's fault.
"""
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from runtime import compat

from .capture import OpRecord, Trace, cpu_copy, flat_outputs, loaded
from .errormodel import ErrorModel
from .faults import FaultSpec, parse_faults, run_with_faults
from .judge import IDENTICAL, OutputJudgement, identical, judge_float, judge_integer
from .metrics import (
    all_finite,
    as_numpy64,
    bind_arguments,
    is_index_output,
    metrics_of_difference,
    rms_finite,
    rmse_of_difference,
    selected_values,
)
from .precision import Precision

# Arguments that ask for low-precision results and make no sense for a float64 golden.
_GOLDEN_FIXUPS = {
    "aten._softmax": {"half_to_float": False},
    "aten._log_softmax": {"half_to_float": False},
}
# Dtype casts: the golden run has none of autocast's, so they are left out of whole-run alignment.
CAST_OPS = ("aten._to_copy",)


@dataclass
class OpCheck:
    """The judgement of one op: ``status`` is ``pass``, ``fail`` or ``skipped``."""

    index: int
    op: str
    overload: str
    module: str
    phase: str
    shapes: str
    status: str
    verdict: str
    outputs: List[OutputJudgement] = field(default_factory=list)
    golden: str = "float64"
    faults: List[str] = field(default_factory=list)
    identical: bool = False

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    @property
    def worst(self) -> Optional[OutputJudgement]:
        """The first failing output, else the one with the largest margin."""
        failing = [o for o in self.outputs if not o.passed]
        if failing:
            return failing[0]
        return max(self.outputs, key=lambda o: o.margin, default=None)

    @property
    def margin(self) -> float:
        """The worst output's error in units of its allowance (<= 1 passes)."""
        worst = self.worst
        return worst.margin if worst is not None else 0.0

    def row(self) -> dict:
        """Flat dict for reports: identity, worst output's metrics, verdict."""
        worst = self.worst
        dev = worst.device if worst is not None else None
        return {
            "index": self.index, "op": self.op, "overload": self.overload, "module": self.module,
            "phase": self.phase, "shapes": self.shapes, "status": self.status, "verdict": self.verdict,
            "max_abs": dev.max_abs if dev else None, "max_rel": dev.max_rel if dev else None,
            "cosine": dev.cosine if dev else None, "rmse": dev.rmse if dev else None,
            "baseline_rmse": worst.baseline.rmse if worst is not None and worst.baseline else None,
            "margin": self.margin if self.status != "skipped" and not self.identical else None,
            "identical": self.identical,
            "baseline_margin": worst.baseline_margin if worst is not None else None,
            "allowance": worst.component if worst is not None else None,
            "golden": self.golden, "faults": list(self.faults),
        }


@dataclass
class ReplayResult:
    checks: List[OpCheck]

    @property
    def first_failure(self) -> Optional[OpCheck]:
        return next((c for c in self.checks if c.status == "fail"), None)

    @property
    def passed(self) -> bool:
        return self.first_failure is None

    @property
    def skipped(self) -> List[OpCheck]:
        return [c for c in self.checks if c.status == "skipped"]

    @property
    def checked(self) -> int:
        return sum(c.status != "skipped" for c in self.checks)

    @property
    def identical(self) -> int:
        """Checked ops whose every output is bit-identical to the baseline's."""
        return sum(c.identical for c in self.checks)

    def worst(self) -> Optional[OpCheck]:
        """The op with the largest margin among those judged against golden."""
        judged = [c for c in self.checks if c.status != "skipped" and not c.identical]
        return max(judged, key=lambda c: c.margin, default=None)


def _to_golden(tree: Any, dtype: torch.dtype) -> Any:
    def up(leaf):
        if isinstance(leaf, torch.Tensor):
            return leaf.to("cpu", dtype=dtype if leaf.is_floating_point() else None, copy=True)
        if isinstance(leaf, torch.dtype) and leaf.is_floating_point:
            return dtype
        if isinstance(leaf, torch.device):
            return torch.device("cpu")
        return leaf

    return compat.tree_map(up, tree)


def _to_device(tree: Any, device: torch.device) -> Any:
    def move(leaf):
        if isinstance(leaf, torch.Tensor):
            return leaf.to(device, copy=True)
        if isinstance(leaf, torch.device):
            return device
        return leaf

    return compat.tree_map(move, tree)


def _fixup(record: OpRecord, args, kwargs):
    fixes = _GOLDEN_FIXUPS.get(record.op)
    if not fixes:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for i, arg in enumerate(record.func._schema.arguments):
        if arg.name in fixes:
            if i < len(args) and not arg.kwarg_only:
                args[i] = fixes[arg.name]
            elif arg.name in kwargs:
                kwargs[arg.name] = fixes[arg.name]
    return tuple(args), kwargs


@dataclass
class Golden:
    """An op's golden outputs (flat), its arguments bound by name in the golden's dtype (before the
    op ran: in-place ops mutate a copy), and which golden it is."""

    outputs: List[Optional[torch.Tensor]]
    args: dict
    note: str


def golden_outputs(record: OpRecord) -> Golden:
    """Re-runs ``record``'s op on the CPU in float64; falls back to float32, then to the baseline
    output."""
    errors = []
    for dtype in (torch.float64, torch.float32):
        args, kwargs = _fixup(record, *_to_golden((record.args, record.kwargs), dtype))
        # an in-place op overwrites its input: the error model needs the values before it ran
        bound = _to_golden((args, kwargs), dtype) if record.func._schema.is_mutable else (args, kwargs)
        inputs = bind_arguments(record.func, *bound)
        try:
            with Precision("fp32").backend("cpu"):
                out = flat_outputs(record.func(*args, **kwargs))
        except Exception as exc:  # a missing kernel raises RuntimeError or NotImplementedError
            errors.append(f"{str(dtype)[6:]}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if dtype == torch.float64:
            return Golden(out, inputs, "float64")
        return Golden(out, inputs, f"float32 (float64 failed: {errors[0]})")
    inputs = bind_arguments(record.func, record.args, record.kwargs)
    return Golden(list(record.outputs), inputs, f"baseline (no higher-precision CPU kernel: {'; '.join(errors)})")


def device_outputs(record: OpRecord, device: torch.device, precision: Precision,
                   faults: Sequence[FaultSpec] = (), context=None) -> List[Optional[torch.Tensor]]:
    """Re-runs ``record``'s op on ``device`` with the baseline's exact inputs; faults applied."""
    # An op that writes none of its arguments may read the recorded ones in place on their device.
    same_place = not record.func._schema.is_mutable and all(
        t.device == device for t in compat.tree_leaves((record.args, record.kwargs)) if isinstance(t, torch.Tensor))
    args, kwargs = (record.args, record.kwargs) if same_place else _to_device((record.args, record.kwargs), device)
    with precision.backend(device), (context() if context else contextlib.nullcontext()):
        out = run_with_faults(faults, record.func, args, kwargs)
    # A CPU output is already a fresh tensor (views are not replayed, and a writing op wrote copies
    # of the inputs), so only an accelerator's outputs are copied over.
    return [t.detach() if t is not None and t.device.type == "cpu" else cpu_copy(t) for t in flat_outputs(out)]


def judge_record(record: OpRecord, device_out: Sequence, golden: Golden, model: ErrorModel) -> List[OutputJudgement]:
    """Judges each output position of one op (positions that are non-tensors everywhere are left out)."""
    baseline_out, golden_out = record.outputs, golden.outputs
    if not (len(device_out) == len(baseline_out) == len(golden_out)):
        return [OutputJudgement(0, "float", False, f"fail: op returned {len(device_out)} outputs, "
                                f"baseline {len(baseline_out)}, golden {len(golden_out)}", math.inf)]
    judgements = []
    input_dtypes = {t.dtype for t in compat.tree_leaves((record.args, record.kwargs))
                    if isinstance(t, torch.Tensor) and t.is_floating_point()}
    for pos, (d, b, g) in enumerate(zip(device_out, baseline_out, golden_out)):
        if b is None and d is None:
            continue
        if b is None or d is None or g is None:
            which = "device" if d is None else "golden" if g is None else "baseline"
            judgements.append(OutputJudgement(pos, "float", False, f"fail: output {pos} missing on {which}", math.inf))
        elif is_index_output(record.op, pos, b):
            values = [selected_values(record.func, record.args, record.kwargs, t) for t in (d, b, g)]
            source_dtype = bind_arguments(record.func, record.args, record.kwargs)["self"].dtype
            allowance = model.for_values(values[2], values[1], source_dtype)
            judgements.append(judge_float(*values, allowance, position=pos, kind="index", check_dtype=False))
        elif b.is_floating_point() or b.is_complex():
            if tuple(g.shape) != tuple(b.shape):
                judgements.append(judge_float(d, b, g, model.for_values(b, b, b.dtype), position=pos))
                continue
            allowance = model.allowance(record.op, golden.args, golden_out, pos, b, input_dtypes=input_dtypes)
            judgements.append(judge_float(d, b, g, allowance, position=pos))
        else:
            judgements.append(judge_integer(d, b, g, position=pos))
    return judgements


def replay(trace: Trace, device: torch.device, precision: Precision = Precision("fp32"),
           model: Optional[ErrorModel] = None, faults: Sequence = (), context=None) -> ReplayResult:
    """Isolated replay of every op of a baseline ``trace`` (captured with ``keep="tensors"``) on
    ``device`` in ``precision``, each output judged against ``model``'s allowance; ``faults``
    perturb the device's ops (their counters go up). ``context`` (a zero-argument callable that
    returns a context manager) wraps each device op: the device's own kernel switches."""
    model = model or ErrorModel()
    faults = parse_faults(faults)
    checks = []
    for record in trace:
        if record.args is None or record.outputs is None:
            raise ValueError("isolated replay needs a trace captured with keep='tensors'")
        record = loaded(record)
        check = OpCheck(record.index, record.op, record.overload, record.module, record.phase,
                        record.shapes, "pass", "pass")
        if record.random:
            check.status, check.verdict, check.golden = "skipped", "skipped: random op (depends on the RNG)", "-"
            checks.append(check)
            continue
        fired = [f.fired for f in faults]
        try:
            dev = device_outputs(record, device, precision, faults, context)
        except Exception as exc:
            check.status = "fail"
            check.verdict = f"fail: device raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            checks.append(check)
            continue
        finally:
            check.faults = [f.spec for f, n in zip(faults, fired) if f.fired > n]
        if len(dev) == len(record.outputs) and all(
                (d is None and b is None) or identical(d, b) for d, b in zip(dev, record.outputs)):
            check.identical, check.verdict, check.golden = True, IDENTICAL, "-"
            checks.append(check)
            continue
        gold = golden_outputs(record)
        check.golden = gold.note
        check.outputs = judge_record(record, dev, gold, model)
        failing = [o for o in check.outputs if not o.passed]
        if failing:
            check.status, check.verdict = "fail", failing[0].verdict
            if len(check.outputs) > 1:
                check.verdict += f" (output {failing[0].position})"
        checks.append(check)
    return ReplayResult(checks)


@dataclass
class WholeRun:
    """The three runs side by side: per aligned op, device and baseline error against golden."""

    rows: List[dict]
    aligned: int
    diverged: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"aligned": self.aligned, "diverged": self.diverged, "notes": list(self.notes), "rows": list(self.rows)}


def _aligned(trace: Trace) -> List[OpRecord]:
    return [r for r in trace if r.op not in CAST_OPS]


def compare_runs(golden: Trace, baseline: Trace, device: Trace) -> WholeRun:
    """Aligns three traces of the same computation (cast ops left out) and judges each op's
    outputs as they came out of each run, so errors are inherited and accumulate. The sequences
    should be identical; where they diverge the comparison stops and says where."""
    g, b, d = _aligned(golden), _aligned(baseline), _aligned(device)
    rows, notes, diverged = [], [], None
    for i, (rg, rb, rd) in enumerate(zip(g, b, d)):
        if not rg.overload == rb.overload == rd.overload:
            diverged = (f"op {i} (casts left out): golden ran {rg.overload}, baseline {rb.overload}, "
                        f"device {rd.overload}")
            break
        if rb.random and not notes:
            notes.append(f"random op {rb.overload} at baseline op #{rb.index}: later whole-run errors include "
                         "different random draws (use eval mode or p=0 to avoid)")
        rows.append(_whole_run_row(rg, loaded(rb), rd))
    else:
        if not len(g) == len(b) == len(d):
            diverged = f"lengths differ (casts left out): golden {len(g)}, baseline {len(b)}, device {len(d)} ops"
    return WholeRun(rows, len(rows), diverged, notes)


def error_ratio(device: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor) -> Optional[dict]:
    """RMSE(D, G) / RMSE(B, G) over positions finite in all three, the baseline's RMSE floored at a
    quarter unit of rounding at the golden's RMS (so exact ops do not make 0/0); None when the
    shapes differ."""
    if not (tuple(device.shape) == tuple(baseline.shape) == tuple(golden.shape)):
        return None
    d, b, g = as_numpy64(device), as_numpy64(baseline), as_numpy64(golden)
    nonfinite = 0
    if not (all_finite(d) and all_finite(b) and all_finite(g)):
        keep = np.isfinite(d) & np.isfinite(b) & np.isfinite(g)
        d, b, g, nonfinite = d[keep], b[keep], g[keep], int((~keep).sum())
    d -= g  # fresh copies: as_numpy64 never returns a view of the tensor
    b -= g
    dev, base = metrics_of_difference(d, g), rmse_of_difference(b)
    eps = torch.finfo(baseline.dtype).eps if baseline.is_floating_point() else torch.finfo(torch.float32).eps
    floor = max(0.25 * eps * rms_finite(g), torch.finfo(torch.float64).tiny)
    ratio = 0.0 if dev.rmse == 0 else dev.rmse / max(base.rmse, floor)
    return {"max_abs": dev.max_abs, "max_rel": dev.max_rel, "cosine": dev.cosine, "rmse": dev.rmse,
            "baseline_rmse": base.rmse, "ratio": ratio, "nonfinite": nonfinite}


def _whole_run_row(rg: OpRecord, rb: OpRecord, rd: OpRecord) -> dict:
    row = {"index": rb.index, "op": rb.op, "overload": rb.overload, "module": rb.module, "phase": rb.phase,
           "shapes": rb.shapes, "max_abs": None, "max_rel": None, "cosine": None, "rmse": None,
           "baseline_rmse": None, "ratio": None}
    if rb.outputs is None or rd.outputs is None or rg.outputs is None:
        stats = [s for s in rd.stats if s is not None]
        row["device_rms"] = stats[0].rms if stats else None
        return row
    ratios = []
    for pos, (tg, tb, td) in enumerate(zip(rg.outputs, rb.outputs, rd.outputs)):
        if tb is None or td is None or tg is None or is_index_output(rb.op, pos, tb) or not tb.is_floating_point():
            continue
        found = error_ratio(td, tb, tg)
        if found is not None:
            ratios.append(found)
    if ratios:
        row.update(max(ratios, key=lambda r: r["ratio"]))
    return row

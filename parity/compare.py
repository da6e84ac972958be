"""The orchestrator the conformance tests call: one part of a model, three runs (golden, baseline,
device), isolated replay of the baseline's ops on the device, a whole-run comparison, and an
end-to-end check of the part's outputs and parameter gradients.

``passed`` means every replayed op passed and the final outputs and gradients pass the same rule;
the whole-run rows show how error accumulates but do not decide on their own (an op may inherit a
little more error than the baseline by chance). Dropout and other random ops are skipped in
replay; run the part in eval mode or with p=0 so that the three runs draw the same numbers.
"""
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree

from .capture import Trace, capture, cpu_copy
from .device import Device
from .faults import FaultSpec, inject, never_fired, parse_faults
from .judge import OutputJudgement, judge_float, judge_integer
from .precision import Precision, cast_tree
from .replay import OpCheck, ReplayResult, WholeRun, compare_runs, replay

RunFn = Callable[[torch.nn.Module, Any], Any]


@dataclass
class EndToEnd:
    """One final output or parameter gradient judged as it came out of each whole run."""

    name: str
    judgement: OutputJudgement

    def row(self) -> dict:
        j = self.judgement
        return {"name": self.name, "verdict": j.verdict, "ratio": j.ratio,
                **({k: getattr(j.device, k) for k in ("max_abs", "max_rel", "cosine", "rmse")} if j.device else {}),
                "baseline_rmse": j.baseline.rmse if j.baseline else None}


@dataclass
class PartResult:
    part: str
    device: str
    precision: str
    bound: float
    replay: ReplayResult
    end_to_end: List[EndToEnd]
    whole_run: Optional[WholeRun] = None
    faults: List[FaultSpec] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    rerun_options: str = ""

    @property
    def passed(self) -> bool:
        return self.replay.passed and all(e.judgement.passed for e in self.end_to_end)

    @property
    def ops_checked(self) -> int:
        return self.replay.checked

    @property
    def never_fired(self) -> List[str]:
        return [f.spec for f in never_fired(self.faults)]

    @property
    def first_failure(self) -> Optional[dict]:
        """The first failing op of isolated replay; else the first failing whole-run op or final
        output when only the end-to-end check failed; None when the part passed."""
        check = self.replay.first_failure
        if check is not None:
            return {**_failure_fields(check.row()), "source": "isolated replay"}
        failing = [e for e in self.end_to_end if not e.judgement.passed]
        if not failing:
            return None
        rows = self.whole_run.rows if self.whole_run else []
        row = next((r for r in rows if r["verdict"].startswith("fail")), None)
        if row is not None:
            return {**_failure_fields(row), "source": "whole run"}
        end = failing[0].row()
        return {"index": None, "op": None, "overload": None, "module": failing[0].name, "phase": "end-to-end",
                "shapes": None, **{k: end.get(k) for k in ("max_abs", "max_rel", "cosine", "rmse", "ratio")},
                "verdict": end["verdict"], "source": "end-to-end"}

    def rows(self) -> List[dict]:
        return [c.row() for c in self.replay.checks]

    def worst(self) -> Optional[OpCheck]:
        return self.replay.worst()

    def rerun_command(self, nodeid: Optional[str] = None) -> str:
        target = f"'{nodeid}'" if nodeid else "<test id>"
        faults = "".join(f" --inject-fault '{f.spec}'" for f in self.faults)
        extra = f" {self.rerun_options}" if self.rerun_options else ""
        return f"pytest {target} --xpu {self.device} --precision {self.precision}{extra}{faults}"

    def failure_message(self, nodeid: Optional[str] = None) -> str:
        """What failed, where, by how much, and how to re-run; empty when the part passed."""
        fail = self.first_failure
        if fail is None:
            return ""
        lines = [f"{self.part} [{self.precision} on {self.device}, bound {self.bound:g}]: {fail['source']} failed"]
        if fail["op"]:
            lines.append(f"  first failing op: #{fail['index']} {fail['overload']} ({fail['phase']}) "
                         f"in module {fail['module']}")
            lines.append(f"  shapes: {fail['shapes']}")
        else:
            lines.append(f"  output: {fail['module']}")
        if fail.get("rmse") is not None:
            lines.append(f"  max abs {fail['max_abs']:.3g}, max rel {fail['max_rel']:.3g}, "
                         f"cosine {fail['cosine']:.6f}, rmse {fail['rmse']:.3g}, error ratio {fail['ratio']:.3g}")
        lines.append(f"  verdict: {fail['verdict']}")
        lines.append(f"  {self.ops_checked} ops checked, {sum(not c.passed for c in self.replay.checks)} failed")
        if self.faults:
            lines.append("  injected faults: " + ", ".join(f"{f.spec} (fired {f.fired}x)" for f in self.faults))
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  re-run: {self.rerun_command(nodeid)}")
        return "\n".join(lines)

    def to_dict(self, nodeid: Optional[str] = None) -> dict:
        """The report entry of this part (see :mod:`parity.report`)."""
        return {
            "nodeid": nodeid, "part": self.part, "device": self.device, "precision": self.precision,
            "bound": self.bound, "passed": self.passed, "ops_checked": self.ops_checked,
            "ops_skipped": len(self.replay.skipped), "first_failure": self.first_failure,
            "ops": self.rows(), "whole_run": self.whole_run.as_dict() if self.whole_run else None,
            "end_to_end": [e.row() for e in self.end_to_end],
            "faults": [{"spec": f.spec, "fired": f.fired} for f in self.faults],
            "notes": list(self.notes),
        }


def _failure_fields(row: dict) -> dict:
    keys = ("index", "op", "overload", "module", "phase", "shapes", "max_abs", "max_rel", "cosine", "rmse",
            "ratio", "verdict")
    return {k: row.get(k) for k in keys}


def _differentiable(out: Any) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def _output_grads(tensors: Sequence[torch.Tensor], seed: int) -> Optional[List[torch.Tensor]]:
    """None for a scalar loss (backward from 1); else fixed standard-normal gradients, the same
    values (rounded to each dtype) in every run."""
    if len(tensors) == 1 and tensors[0].numel() == 1:
        return None
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype) for t in tensors]


def _suspended_capture():
    disable = getattr(torch.utils._python_dispatch, "_disable_current_modes", None)
    return disable() if disable is not None else contextlib.nullcontext()


@dataclass
class _Run:
    outputs: Any
    grads: List[Tuple[str, Optional[torch.Tensor]]]
    trace: Optional[Trace]


def _execute(module: torch.nn.Module, inputs: Any, run: RunFn, device: torch.device, backend, autocast,
             seed: int, keep: Optional[str], faults: Sequence[FaultSpec]) -> _Run:
    """One run. ``backend`` (TF32 switches and emulation) wraps the capture so that emulation's own
    ops stay out of the trace; ``autocast`` wraps only ``run``."""
    def body():
        with autocast:
            out = run(module, inputs)
        tensors = _differentiable(out)
        if tensors:
            with _suspended_capture():
                grads = _output_grads(tensors, seed)
            torch.autograd.backward(tensors, grads)
        return out

    Device(device).manual_seed(seed)
    with backend:
        if keep is None:
            with inject(faults):
                out, trace = body(), None
        else:
            out, trace = capture(body, root_module=module, faults=faults, keep=keep)
    grads = [(f"grad {name}", cpu_copy(p.grad) if p.grad is not None else None) for name, p in module.named_parameters()]
    return _Run(cpu_copy(pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)), grads, trace)


def _named_leaves(out: Any) -> List[Tuple[str, Any]]:
    with_path = getattr(pytree, "tree_flatten_with_path", None)
    if with_path is not None:
        leaves, _ = with_path(out)
        return [(f"output{pytree.keystr(path)}", leaf) for path, leaf in leaves]
    return [(f"output[{i}]", leaf) for i, leaf in enumerate(pytree.tree_leaves(out))]


def _end_to_end(golden: _Run, baseline: _Run, device: _Run, bound: float) -> List[EndToEnd]:
    results = []
    pairs = list(zip(_named_leaves(golden.outputs), _named_leaves(baseline.outputs), _named_leaves(device.outputs)))
    pairs += list(zip(golden.grads, baseline.grads, device.grads))
    for (name, g), (_, b), (_, d) in pairs:
        if not all(isinstance(t, torch.Tensor) for t in (g, b, d)):
            continue
        if b.is_floating_point():
            results.append(EndToEnd(name, judge_float(d, b, g, bound, check_dtype=False)))
        else:
            results.append(EndToEnd(name, judge_integer(d, b, g)))
    return results


def compare_part(part: str, build: Union[Callable[[], torch.nn.Module], torch.nn.Module], inputs: Any,
                 run: RunFn, device: Union[str, torch.device], precision: Union[str, Precision],
                 faults: Sequence[Union[str, FaultSpec]] = (), bound: Optional[float] = None, *,
                 seed: int = 0, keep: str = "outputs", whole_run: bool = True, replay_ops: bool = True) -> PartResult:
    """Checks one part on ``device`` in ``precision``.

    ``build`` makes the module (or is it); its weights are copied into a float64 CPU golden, a CPU
    baseline and a device copy. ``inputs`` is a pytree of tensors, cast and moved like the weights.
    ``run(module, inputs)`` returns a scalar loss or outputs; when they require grad, backward runs
    (from 1 for a scalar, else from fixed random gradients). ``faults`` perturb only the device's run
    and its replayed ops. ``bound`` defaults to ``precision.default_bound``. ``keep`` is what the
    golden and device traces hold for the whole-run comparison (``"outputs"`` or ``"stats"``).
    ``replay_ops=False`` skips isolated replay: only the final outputs and gradients (and the
    whole run, if asked) are judged, for long runs whose every op another check already replays.
    """
    device = torch.device(device)
    precision = precision if isinstance(precision, Precision) else Precision(precision)
    bound = precision.default_bound if bound is None else float(bound)
    faults = parse_faults(faults)
    source = build if isinstance(build, torch.nn.Module) else build()
    source = copy.deepcopy(source).cpu()
    cpu = torch.device("cpu")
    trace_keep = keep if whole_run else None

    golden_module = copy.deepcopy(source).to(torch.float64)
    golden = _execute(golden_module, cast_tree(inputs, cpu, torch.float64), run, cpu,
                      Precision("fp32").backend(cpu), contextlib.nullcontext(), seed, trace_keep, ())
    base_module, base_inputs = precision.prepare(copy.deepcopy(source), inputs, cpu)
    baseline = _execute(base_module, base_inputs, run, cpu, precision.backend(cpu, emulate_tf32=True),
                        precision.autocast(cpu, precision.autocast_dtype(device)), seed,
                        "tensors" if replay_ops else trace_keep, ())
    dev_module, dev_inputs = precision.prepare(copy.deepcopy(source), inputs, device)
    dut = _execute(dev_module, dev_inputs, run, device, precision.backend(device), precision.autocast(device),
                   seed, trace_keep, faults)

    replayed = replay(baseline.trace, device, precision, bound, faults) if replay_ops else ReplayResult([])
    whole = compare_runs(golden.trace, baseline.trace, dut.trace, bound) if whole_run else None
    notes = []
    if replayed.skipped:
        names = sorted({c.overload for c in replayed.skipped})
        notes.append(f"{len(replayed.skipped)} random op call(s) skipped in replay ({', '.join(names)}); "
                     "use eval mode or dropout 0 for comparable whole runs")
    fallbacks = sorted({f"{c.overload}: golden {c.golden}" for c in replayed.checks if c.golden not in ("float64", "-")})
    notes += fallbacks
    if whole is not None:
        notes += whole.notes
        if whole.diverged:
            notes.append(f"whole run diverged at {whole.diverged}")
    notes += [f"fault {spec!r} never fired: no op of this part matches it" for spec in
              [f.spec for f in never_fired(faults)]]
    return PartResult(part, str(device), precision.name, bound, replayed,
                      _end_to_end(golden, baseline, dut, bound), whole, faults, notes)

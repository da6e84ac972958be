"""The orchestrator the conformance tests call: one part of a model, three runs (golden, baseline,
device), isolated replay of the baseline's ops on the device, a whole-run comparison, and an
end-to-end check of the part's outputs and parameter gradients.

``passed`` means every replayed op is within its allowance (:mod:`parity.errormodel`) and every
final output and gradient lies inside the envelope of an ensemble of perturbed CPU baselines
(:mod:`parity.ensemble`), with the same structure as the baseline's: as many outputs, tensors
where it has tensors, gradients where it has gradients. The whole-run rows show how error
accumulates but do not decide. Dropout and other random ops are skipped in replay; run the part in
eval mode or with p=0 so that the runs draw the same numbers.
"""
import contextlib
import copy
import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from runtime import compat
from runtime.device import Device, resolve

from . import ensemble
from .capture import Trace, capture, capture_mode, cpu_copy
from .compiled import (
    CompileSpec,
    CompileStats,
    GraphFault,
    compiled_run,
    count_breaks,
    decomposed_run,
    fullgraph_failure,
    split_faults,
)
from .errormodel import ErrorModel
from .faults import FaultSpec, inject, never_fired, parse_fault, parse_faults
from .judge import OutputJudgement, identical, identical_judgement, judge_integer
from .localise import Localisation, Prefix, bisect, bisect_passes
from .precision import Precision, cast_tree
from .replay import OpCheck, ReplayResult, WholeRun, compare_runs, replay
from .spill import spill_enabled

RunFn = Callable[[torch.nn.Module, Any], Any]


@dataclass
class EndToEnd:
    """One final output or parameter gradient judged as it came out of each whole run."""

    name: str
    judgement: OutputJudgement

    def row(self) -> dict:
        j = self.judgement
        margin = None if j.kind == "identical" else j.margin
        return {"name": self.name, "verdict": j.verdict, "margin": margin, "baseline_margin": j.baseline_margin,
                **({k: getattr(j.device, k) for k in ("max_abs", "max_rel", "cosine", "rmse")} if j.device else {}),
                "baseline_rmse": j.baseline.rmse if j.baseline else None}


@dataclass
class PartResult:
    part: str
    device: str
    precision: str
    replay: ReplayResult
    end_to_end: List[EndToEnd]
    whole_run: Optional[WholeRun] = None
    faults: List[FaultSpec] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    rerun_options: str = ""
    ensemble_size: int = 0
    compiled: List[EndToEnd] = field(default_factory=list)  # the compiled run's outputs and gradients
    compile_stats: Optional[CompileStats] = None
    graph_faults: List[GraphFault] = field(default_factory=list)
    localised: Optional[Localisation] = None  # the node a failing compiled run is bisected to
    decomposed: Optional[ReplayResult] = None  # the decomposed aten graphs' ops, replayed
    decomposed_end_to_end: List[EndToEnd] = field(default_factory=list)  # the decomposed run's outputs
    statistic: str = "rms"  # how the end-to-end judgement sized each run's error

    @property
    def passed(self) -> bool:
        return self.replay.passed and (self.decomposed is None or self.decomposed.passed) and \
            all(e.judgement.passed for e in self.end_to_end + self.decomposed_end_to_end + self.compiled)

    @property
    def ops_checked(self) -> int:
        return self.replay.checked

    @property
    def all_faults(self) -> list:
        """The aten faults, then the ``compiled.*`` graph faults."""
        return list(self.faults) + list(self.graph_faults)

    @property
    def never_fired(self) -> List[str]:
        return [f.spec for f in never_fired(self.all_faults)]

    @property
    def first_failure(self) -> Optional[dict]:
        """The first failing op of isolated replay; else the first failing whole-run op or final
        output when only the end-to-end check failed; None when the part passed."""
        for source, replayed in (("isolated replay", self.replay), ("decomposed graph", self.decomposed)):
            check = replayed.first_failure if replayed is not None else None
            if check is not None:
                return {**_failure_fields(check.row()), "source": source}
        for source, rows in (("end-to-end", self.end_to_end), ("decomposed graph", self.decomposed_end_to_end),
                             ("compiled graph", self.compiled)):
            failing = [e for e in rows if not e.judgement.passed]
            if failing:
                end = failing[0].row()
                return {"index": None, "op": None, "overload": None, "module": failing[0].name, "phase": source,
                        "shapes": None,
                        **{k: end.get(k) for k in ("max_abs", "max_rel", "cosine", "rmse", "margin")},
                        "verdict": end["verdict"], "source": source,
                        **({"node": vars(self.localised.node)} if self.localised and self.localised.node else {})}
        return None

    def rows(self) -> List[dict]:
        return [c.row() for c in self.replay.checks]

    def worst(self) -> Optional[OpCheck]:
        return self.replay.worst()

    def worst_end_to_end(self) -> Optional[EndToEnd]:
        return _worst(self.end_to_end)

    def worst_compiled(self) -> Optional[EndToEnd]:
        return _worst(self.compiled)

    def rerun_command(self, nodeid: Optional[str] = None) -> str:
        target = shlex.quote(nodeid) if nodeid else "<test id>"
        faults = "".join(f" --inject-fault {shlex.quote(f.spec)}" for f in self.all_faults)
        extra = f" {self.rerun_options}" if self.rerun_options else ""
        return f"pytest {target} --xpu {self.device} --precision {self.precision}{extra}{faults}"

    def failure_message(self, nodeid: Optional[str] = None) -> str:
        """What failed, where, by how much, and how to re-run; empty when the part passed."""
        fail = self.first_failure
        if fail is None:
            return ""
        lines = [f"{self.part} [{self.precision} on {self.device}]: {fail['source']} failed"]
        if fail["op"]:
            lines.append(f"  first failing op: #{fail['index']} {fail['overload']} ({fail['phase']}) "
                         f"in module {fail['module']}")
            lines.append(f"  shapes: {fail['shapes']}")
        else:
            lines.append(f"  output: {fail['module']}")
        if fail.get("rmse") is not None:
            lines.append(f"  max abs {fail['max_abs']:.3g}, max rel {fail['max_rel']:.3g}, "
                         f"cosine {fail['cosine']:.6f}, rmse {fail['rmse']:.3g}, "
                         f"error {fail['margin']:.3g}x its allowance")
        lines.append(f"  verdict: {fail['verdict']}")
        lines.append(f"  {self.ops_checked} ops checked, {sum(not c.passed for c in self.replay.checks)} failed")
        if self.all_faults:
            lines.append("  injected faults: " + ", ".join(f"{f.spec} (fired {f.fired}x)" for f in self.all_faults))
        if self.compile_stats is not None:
            lines.append(f"  compiled with {self.compile_stats.summary()}")
        if self.localised is not None:
            lines.append(f"  {self.localised.text()}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  re-run: {self.rerun_command(nodeid)}")
        return "\n".join(lines)

    def to_dict(self, nodeid: Optional[str] = None) -> dict:
        """The report entry of this part (see :mod:`parity.report`)."""
        worst_end, worst_compiled = self.worst_end_to_end(), self.worst_compiled()
        return {
            "nodeid": nodeid, "part": self.part, "device": self.device, "precision": self.precision,
            "passed": self.passed, "ops_checked": self.ops_checked, "ops_identical": self.replay.identical,
            "worst_op_margin": self.worst().margin if self.worst() else None,
            "worst_end_to_end_margin": worst_end.judgement.margin if worst_end else None,
            "ensemble_size": self.ensemble_size, "statistic": self.statistic,
            "tensors_judged": len(self.end_to_end),
            "tensors_identical": sum(e.judgement.kind == "identical" for e in self.end_to_end),
            "ops_skipped": len(self.replay.skipped), "first_failure": self.first_failure,
            "ops": self.rows(), "whole_run": self.whole_run.as_dict() if self.whole_run else None,
            "end_to_end": [e.row() for e in self.end_to_end],
            "faults": [{"spec": f.spec, "fired": f.fired} for f in self.all_faults],
            "notes": list(self.notes),
            "compiled": self.compile_stats.as_dict() if self.compile_stats else None,
            "compiled_end_to_end": [e.row() for e in self.compiled],
            "worst_compiled_margin": worst_compiled.judgement.margin if worst_compiled else None,
            "localised": self.localised.as_dict() if self.localised else None,
            "decomposed": None if self.decomposed is None else {
                "ops_checked": self.decomposed.checked, "ops_identical": self.decomposed.identical,
                "worst_op_margin": self.decomposed.worst().margin if self.decomposed.worst() else None,
                "ops": [c.row() for c in self.decomposed.checks],
                "end_to_end": [e.row() for e in self.decomposed_end_to_end]},
        }


def _worst(rows: Sequence[EndToEnd]) -> Optional[EndToEnd]:
    judged = [e for e in rows if e.judgement.kind != "identical"]
    return max(judged, key=lambda e: e.judgement.margin, default=None)


def _failure_fields(row: dict) -> dict:
    keys = ("index", "op", "overload", "module", "phase", "shapes", "max_abs", "max_rel", "cosine", "rmse",
            "margin", "verdict")
    return {k: row.get(k) for k in keys}


def _differentiable(out: Any) -> List[torch.Tensor]:
    return [t for t in compat.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def _output_grads(tensors: Sequence[torch.Tensor], seed: int) -> Optional[List[torch.Tensor]]:
    """None for a scalar loss (backward from 1); else fixed standard-normal gradients, the same
    values (rounded to each dtype) in every run."""
    if len(tensors) == 1 and tensors[0].numel() == 1:
        return None
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype) for t in tensors]


@dataclass
class _Run:
    outputs: Any
    grads: List[Tuple[str, Optional[torch.Tensor]]]
    trace: Optional[Trace]


def _execute(module: torch.nn.Module, inputs: Any, run: RunFn, device: torch.device, backend, autocast,
             seed: int, keep: Optional[str], faults: Sequence[FaultSpec]) -> _Run:
    """One run. ``backend`` (TF32 switches and emulation, the device's kernel switches) wraps the
    capture so that emulation's own ops stay out of the trace; ``autocast`` wraps only ``run``."""
    def body():
        with autocast:
            out = run(module, inputs)
        tensors = _differentiable(out)
        if tensors:
            with compat.disable_current_modes():
                grads = _output_grads(tensors, seed)
            torch.autograd.backward(tensors, grads)
        return out

    Device(device).manual_seed(seed)
    with backend:
        if keep is None:
            with inject(faults):
                out, trace = body(), None
        else:
            # the replay trace goes to a temporary file: a training step's inputs and outputs are GiBs
            spill = keep == "tensors" and spill_enabled()
            out, trace = capture(body, root_module=module, faults=faults, keep=keep, spill=spill)
    grads = [(f"grad {name}", cpu_copy(p.grad) if p.grad is not None else None)
             for name, p in module.named_parameters()]
    outputs = cpu_copy(compat.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out))
    return _Run(outputs, grads, trace)


def _leaves(run: _Run) -> List[Tuple[str, Any]]:
    return compat.named_leaves(run.outputs) + list(run.grads)


def _missing(name: str, baseline: Any, device: Any) -> Optional[str]:
    """Why one leaf of the device's result does not match the baseline's kind, or None."""
    b_tensor, d_tensor = isinstance(baseline, torch.Tensor), isinstance(device, torch.Tensor)
    if name.startswith("grad ") and (baseline is None) != (device is None):
        side = "device" if device is None else "baseline"
        return f"fail: gradient is None on the {side} but not on the {'baseline' if side == 'device' else 'device'}"
    if b_tensor and not d_tensor:
        return f"fail: expected a tensor, the device returned {type(device).__name__}"
    if d_tensor and not b_tensor:
        return f"fail: the device returned a tensor where the baseline returned {type(baseline).__name__}"
    if not b_tensor and baseline != device:
        return f"fail: device returned {device!r}, baseline {baseline!r}"
    return None


def _structure(b: List[Tuple[str, Any]], d: List[Tuple[str, Any]]) -> Optional[EndToEnd]:
    """The failure when the device returned other outputs or gradients than the baseline, or None."""
    if len(d) == len(b) and [n for n, _ in d] == [n for n, _ in b]:
        return None
    extra = sorted({n for n, _ in d} ^ {n for n, _ in b})
    verdict = (f"fail: the device returned {len(d)} outputs and gradients, the baseline {len(b)}"
               + (f" (differing: {', '.join(extra[:5])})" if extra else ""))
    return EndToEnd("outputs", OutputJudgement(0, "structure", False, verdict, float("inf")))


def _end_to_end(golden: Callable[[], _Run], baseline: _Run, device: _Run,
                members: Callable[[], Sequence[_Run]], statistic: str = "rms") -> List[EndToEnd]:
    """Every final output and gradient: structure first; then floats that differ from the baseline
    against the ensemble, each run's error sized by ``statistic`` (``golden`` and ``members`` are
    called only when one does)."""
    b, d = _leaves(baseline), _leaves(device)
    mismatch = _structure(b, d)
    if mismatch is not None:
        return [mismatch]
    tests = sum(isinstance(t, torch.Tensor) and t.is_floating_point() for _, t in b)
    results, g, runs = [], None, None
    for i, ((name, tb), (_, td)) in enumerate(zip(b, d)):
        problem = _missing(name, tb, td)
        if problem:
            results.append(EndToEnd(name, OutputJudgement(0, "structure", False, problem, float("inf"))))
        elif not isinstance(tb, torch.Tensor):
            continue
        elif identical(td, tb):
            results.append(EndToEnd(name, identical_judgement()))
        else:
            g = g if g is not None else _leaves(golden())
            tg = g[i][1]
            if tb.is_floating_point():
                runs = runs if runs is not None else [b] + [_leaves(m) for m in members()]
                draws = [run[i][1] if i < len(run) else None for run in runs]
                results.append(EndToEnd(name, ensemble.judge_against_ensemble(td, tb, tg, draws, tests, statistic)))
            else:
                results.append(EndToEnd(name, judge_integer(td, tb, tg)))
    return results


def _ensemble(part: str, source: torch.nn.Module, inputs: Any, run: RunFn, precision: Precision,
              device: Device, model: ErrorModel, seed: int, size: int) -> List[_Run]:
    """``size`` CPU runs in ``precision`` with weights and inputs moved by up to one ulp and the
    elementwise functions and reductions perturbed like a correct device by ``model``, cached by part,
    precision, seed, model and the content of weights and inputs."""
    cpu = torch.device("cpu")
    autocast_dtype = precision.autocast_dtype(device.device)
    profile = model.correct_device_profile()

    def build() -> List[_Run]:
        members = []
        for j in range(size):
            member_seed = 1_000_003 * (j + 1) + seed
            generator = torch.Generator().manual_seed(member_seed)
            module, member_inputs = precision.prepare(copy.deepcopy(source), inputs, cpu)
            module = ensemble.perturb_module(module, generator)
            member_inputs = ensemble.perturb_inputs(member_inputs, generator)
            faults = [parse_fault(spec, seed=member_seed + i) for i, spec in enumerate(profile)]
            members.append(_execute(module, member_inputs, run, cpu, precision.backend(cpu, emulate_tf32=True),
                                    precision.autocast(cpu, autocast_dtype), seed, None, faults))
        return members

    key = (part, precision.name, str(autocast_dtype), seed, size, tuple(profile),
           ensemble.digest(source.state_dict(), inputs))
    return ensemble.CACHE.get(key, build)


@dataclass
class _Comparison:
    """What the runs of one :func:`compare_part` share: the part's CPU weights ``source``, its inputs,
    the device under test, the precision and error model, and the golden run and ensemble, each made
    at most once and only when a final output differs from the baseline's."""

    part: str
    source: torch.nn.Module
    inputs: Any
    run: RunFn
    dut: Device
    precision: Precision
    model: ErrorModel
    faults: List[FaultSpec]
    seed: int
    trace_keep: Optional[str]
    ensemble_size: int
    graph_faults: List[GraphFault] = field(default_factory=list)
    statistic: str = "rms"
    golden: Optional[_Run] = None
    members: List[_Run] = field(default_factory=list)

    def baseline(self, keep: Optional[str]) -> _Run:
        """The CPU run in the precision, TF32 emulated; ``keep`` is what its trace holds."""
        cpu = torch.device("cpu")
        module, inputs = self.precision.prepare(copy.deepcopy(self.source), self.inputs, cpu)
        return _execute(module, inputs, self.run, cpu, self.precision.backend(cpu, emulate_tf32=True),
                        self.precision.autocast(cpu, self.precision.autocast_dtype(self.dut.device)), self.seed,
                        keep, ())

    def device_run(self) -> _Run:
        """The device's run under its kernel switches, with the injected faults."""
        module, inputs = self.precision.prepare(copy.deepcopy(self.source), self.inputs, self.dut.device)
        with self.dut.kernels():
            return _execute(module, inputs, self.run, self.dut.device, self.precision.backend(self.dut.device),
                            self.precision.autocast(self.dut.device), self.seed, self.trace_keep, self.faults)

    def compiled_device_run(self, spec: CompileSpec, stats: CompileStats, prefix: Prefix,
                            faults: Optional[List[GraphFault]] = None, breaks: bool = True) -> _Run:
        """The device's run through ``torch.compile`` with the graph faults (or ``faults``),
        compiled up to ``prefix``'s budget, captured by nothing: an active dispatch mode (capture,
        an aten fault) would make dynamo run the frame eagerly. ``breaks`` counts graph breaks."""
        module, inputs = self.precision.prepare(copy.deepcopy(self.source), self.inputs, self.dut.device)
        if breaks:
            count_breaks(spec, self.run, copy.deepcopy(module), copy.deepcopy(inputs), stats)
        run = compiled_run(spec, self.run, self.graph_faults if faults is None else faults, stats, prefix)
        with self.dut.kernels():
            return _execute(module, inputs, run, self.dut.device, self.precision.backend(self.dut.device),
                            self.precision.autocast(self.dut.device), self.seed, None, ())

    def fresh_graph_faults(self) -> List[GraphFault]:
        """Copies of the graph faults with their counters at 0: the compiled run counts the firings."""
        return [dataclasses.replace(f, fired=0) for f in self.graph_faults]

    def decomposed_runs(self, spec: CompileSpec, replay_ops: bool) -> Tuple[ReplayResult, _Run]:
        """The decomposed depth: the CPU baseline's decomposed aten graphs (Inductor's decompositions,
        run eagerly) captured op by op and replayed on the device (unless not ``replay_ops``), and
        the device's own decomposed run with the graph faults (fresh copies: the compiled run counts
        their firings)."""
        replayed = ReplayResult([])
        if replay_ops:
            cpu = torch.device("cpu")
            mode, trace = capture_mode("tensors", spill_enabled())
            module, inputs = self.precision.prepare(copy.deepcopy(self.source), self.inputs, cpu)
            _execute(module, inputs, decomposed_run(spec, self.run, (), mode), cpu,
                     self.precision.backend(cpu, emulate_tf32=True),
                     self.precision.autocast(cpu, self.precision.autocast_dtype(self.dut.device)), self.seed, None, ())
            replayed = replay(trace, self.dut.device, self.precision, self.model, self.faults, self.dut.kernels)
        module, inputs = self.precision.prepare(copy.deepcopy(self.source), self.inputs, self.dut.device)
        with self.dut.kernels():
            run = _execute(module, inputs, decomposed_run(spec, self.run, self.fresh_graph_faults()), self.dut.device,
                           self.precision.backend(self.dut.device), self.precision.autocast(self.dut.device),
                           self.seed, None, ())
        return replayed, run

    def golden_run(self) -> _Run:
        """The float64 CPU run (fp32 backend switches, no autocast)."""
        if self.golden is None:
            cpu = torch.device("cpu")
            self.golden = _execute(copy.deepcopy(self.source).to(torch.float64),
                                   cast_tree(self.inputs, cpu, torch.float64), self.run, cpu,
                                   Precision("fp32").backend(cpu), contextlib.nullcontext(), self.seed,
                                   self.trace_keep, ())
        return self.golden

    def ensemble_runs(self) -> List[_Run]:
        if not self.members:
            self.members.extend(_ensemble(self.part, self.source, self.inputs, self.run, self.precision, self.dut,
                                          self.model, self.seed, self.ensemble_size))
        return self.members


def _setup(part: str, build: Union[Callable[[], torch.nn.Module], torch.nn.Module], inputs: Any, run: RunFn,
           device: Union[str, torch.device, Device], precision: Union[str, Precision],
           faults: Sequence[Union[str, FaultSpec]], model: Optional[ErrorModel], seed: int,
           trace_keep: Optional[str], ensemble_size: int, statistic: str = "rms") -> _Comparison:
    """Resolves the device, precision, error model and faults of :func:`compare_part`, and builds the
    module once, onto the CPU."""
    dut = device if isinstance(device, Device) else (resolve(device) if isinstance(device, str) else Device(device))
    precision = precision if isinstance(precision, Precision) else Precision(precision)
    model = model or ErrorModel(dut.math_library())
    aten, graph_faults = split_faults(faults)
    faults = parse_faults(aten)
    source = build if isinstance(build, torch.nn.Module) else build()
    return _Comparison(part, copy.deepcopy(source).cpu(), inputs, run, dut, precision, model, faults, seed,
                       trace_keep, ensemble_size, graph_faults, statistic)


def _notes(same: bool, replayed: ReplayResult, whole: Optional[WholeRun], faults: Sequence[FaultSpec]) -> List[str]:
    """What the report says besides the verdicts: checks not needed, ops skipped or replayed against
    a fallback golden, the whole run's divergence, faults that never fired."""
    notes = []
    if same:
        notes.append("every output and gradient is bit-identical to the baseline: no golden run, ensemble or "
                     "whole-run comparison was needed")
    if replayed.skipped:
        names = sorted({c.overload for c in replayed.skipped})
        notes.append(f"{len(replayed.skipped)} random op call(s) skipped in replay ({', '.join(names)}); "
                     "use eval mode or dropout 0 for comparable whole runs")
    notes += sorted({f"{c.overload}: golden {c.golden}" for c in replayed.checks
                     if c.golden not in ("float64", "-")})
    if whole is not None:
        notes += whole.notes
        if whole.diverged:
            notes.append(f"whole run diverged at {whole.diverged}")
    notes += [f"fault {spec!r} never fired: no op of this part matches it" for spec in
              [f.spec for f in never_fired(faults)]]
    return notes


def compare_part(part: str, build: Union[Callable[[], torch.nn.Module], torch.nn.Module], inputs: Any,
                 run: RunFn, device: Union[str, torch.device, Device], precision: Union[str, Precision],
                 faults: Sequence[Union[str, FaultSpec]] = (), model: Optional[ErrorModel] = None, *,
                 seed: int = 0, keep: str = "outputs", whole_run: bool = True, replay_ops: bool = True,
                 ensemble_size: int = ensemble.ENSEMBLE_SIZE, compile: Optional[CompileSpec] = None,
                 statistic: str = "rms") -> PartResult:
    """Checks one part on ``device`` (a torch device, a device string such as ``cpu-alt``, or a
    :class:`~runtime.device.Device`) in ``precision``.

    ``build`` makes the module (or is it); its weights are copied into a float64 CPU golden, a CPU
    baseline, the ensemble's perturbed CPU baselines and a device copy. ``inputs`` is a pytree of
    tensors, cast and moved like the weights. ``run(module, inputs)`` returns a scalar loss or
    outputs; when they require grad, backward runs (from 1 for a scalar, else from fixed random
    gradients). ``faults`` perturb only the device's run and its replayed ops. ``model`` gives each
    op's allowance (default: the device's table). ``keep`` is what the golden and device traces
    hold for the whole-run comparison (``"outputs"`` or ``"stats"``). ``replay_ops=False`` skips
    isolated replay: only the final outputs and gradients (and the whole run, if asked) are judged,
    for long runs whose every op another check already replays. ``compile`` runs the device once
    more through ``torch.compile`` (:mod:`parity.compiled`) and judges that run's outputs and
    gradients end to end too; faults ``compiled.*`` apply to its graphs only, aten faults to the
    eager run and replay only. The decomposed depth runs the graphs through AOTAutograd with
    Inductor's decompositions, eagerly: the CPU's decomposed ops are replayed on the device one by
    one, and the device's decomposed run is judged end to end. A failing compiled run is bisected
    to the first graph node whose compilation fails it (:mod:`parity.localise`), unless
    ``compile.bisect`` is off. ``statistic`` sizes each run's error in the end-to-end judgement
    (:func:`parity.ensemble.judge_against_ensemble`): ``"median"`` for parameters after optimizer
    steps, whose correct errors are heavy-tailed.
    """
    if statistic not in ensemble.STATISTICS:
        raise ValueError(f"statistic must be one of {ensemble.STATISTICS}, got {statistic!r}")
    job = _setup(part, build, inputs, run, device, precision, faults, model, seed, keep if whole_run else None,
                 ensemble_size, statistic)
    baseline = job.baseline("tensors" if replay_ops else job.trace_keep)
    result = job.device_run()
    replayed = replay(baseline.trace, job.dut.device, job.precision, job.model, job.faults, job.dut.kernels) \
        if replay_ops else ReplayResult([])
    end_to_end = _end_to_end(job.golden_run, baseline, result, job.ensemble_runs, job.statistic)
    # A device whose every output and gradient is the baseline's bit for bit passes the end-to-end
    # check by construction: the float64 golden and the ensemble were then not needed.
    same = all(e.judgement.kind == "identical" for e in end_to_end)
    whole = compare_runs(job.golden_run().trace, baseline.trace, result.trace) if whole_run and not same else None
    notes = _notes(same, replayed, whole, job.faults)
    compiled, stats, localised, decomposed, decomposed_rows = _compiled(job, compile, baseline, notes, replay_ops) \
        if compile is not None else ([], None, None, None, [])
    return PartResult(part, job.dut.label, job.precision.name, replayed, end_to_end, whole, job.faults, notes,
                      ensemble_size=len(job.members) + 1 if job.members else 0, compiled=compiled,
                      compile_stats=stats, graph_faults=job.graph_faults, localised=localised,
                      decomposed=decomposed, decomposed_end_to_end=decomposed_rows, statistic=statistic)


def _compiled(job: _Comparison, spec: CompileSpec, baseline: _Run, notes: List[str], replay_ops: bool):
    """The decomposed depth (its ops replayed, its outputs end to end, each name prefixed
    ``decomposed``); the compiled run judged end to end (prefixed ``compiled``); what it compiled;
    and, when it fails, the node it is bisected to (unless ``spec.bisect`` is off)."""
    decomposed, decomposed_run = job.decomposed_runs(spec, replay_ops)
    decomposed_rows = _judged(job, baseline, decomposed_run, "decomposed")
    if replay_ops and not decomposed.checks:
        notes.append("decomposed graph: no aten graph ran under capture (dynamo compiled nothing), so no op of it "
                     "was replayed")
    stats, prefix = CompileStats(spec.backend), Prefix()
    judged = _judged(job, baseline, job.compiled_device_run(spec, stats, prefix), "compiled")
    failing = [e for e in judged if not e.judgement.passed]
    localised = _localise(job, spec, baseline, prefix, failing[0]) if failing and spec.bisect else None
    broken = fullgraph_failure(stats) if spec.fullgraph else None
    if broken:
        judged.insert(0, EndToEnd("compiled graph", OutputJudgement(0, "structure", False, broken, float("inf"))))
    if not stats.graphs:
        judged.insert(0, EndToEnd("compiled graph", OutputJudgement(
            0, "structure", False, "fail: torch.compile compiled no graph: dynamo ran every frame eagerly (it does "
            "under an active TorchDispatchMode, such as cpu-splitk's)", float("inf"))))
    notes.append(f"compiled with {stats.summary()}")
    notes += [f"graph break: {b.text()}" for b in dict.fromkeys(stats.breaks)]
    notes += [f"fault {f.spec!r} never fired: no node of the compiled graphs matches it"
              for f in never_fired(job.graph_faults)]
    return judged, stats, localised, decomposed, decomposed_rows


def _localise(job: _Comparison, spec: CompileSpec, baseline: _Run, prefix: Prefix, first: EndToEnd) -> Localisation:
    """Bisects the failing compiled run to the first node whose compilation fails it, with the same
    end-to-end verdict (golden and ensemble made once) as the good/bad test."""

    def probe(budget: Optional[int]):
        run = job.compiled_device_run(spec, CompileStats(spec.backend), Prefix(budget), job.fresh_graph_faults(),
                                      breaks=False)
        judged = _judged(job, baseline, run, "compiled")
        failing = [e for e in judged if not e.judgement.passed]
        return bool(failing), _briefly(failing[0] if failing else _worst(judged))

    found = bisect(probe, list(prefix.nodes), _briefly(first))
    if spec.bisect_passes:
        found.passes = bisect_passes(lambda: not probe(None)[0])
    return found


def _judged(job: _Comparison, baseline: _Run, run: _Run, depth: str) -> List[EndToEnd]:
    """``run``'s outputs and gradients judged end to end, each name prefixed with its ``depth``."""
    return [EndToEnd(f"{depth} {e.name}", e.judgement)
            for e in _end_to_end(job.golden_run, baseline, run, job.ensemble_runs, job.statistic)]


def _briefly(row: Optional[EndToEnd]) -> str:
    if row is None:
        return "every output identical"
    return f"worst {row.name} at {row.judgement.margin:.3g}x its allowance"

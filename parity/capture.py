"""Capture of every aten op a run executes, forward and backward, in execution order, with the
module that ran it and (optionally) CPU copies of its inputs and outputs for replay.

What is not recorded (so that the traces of two devices line up and every record is checkable):
ops that return no tensor (``sym_size``, ``_local_scalar_dense``) or only a profiler's handle, view
ops whose outputs only alias their inputs (``view``, ``t``, ``expand``, ``split``: no arithmetic, and
backends differ in where they insert them), and allocations of uninitialised memory (``empty*``,
``new_empty*``, ``resize_``).

Module paths come from global module forward hooks and the root module's ``named_modules``. A
backward op is attributed to the forward module that created its autograd node: every tensor a
torch function or module returns claims its not-yet-claimed autograd ancestors for the module
running at the time, and during backward ``torch._C._current_autograd_node()`` is looked up.
Gradient accumulation into a parameter is attributed to the parameter's module.
"""
import contextlib
import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from runtime import compat

from .faults import FaultSpec, is_view_op, parse_faults, run_with_faults
from .metrics import bind_arguments
from .spill import Stored, TensorStore, load_tree

KEEP = ("tensors", "outputs", "stats")
UNINITIALISED = ("aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                 "aten.new_empty_strided", "aten.empty_permuted", "aten.resize_")
ROOT, OUTSIDE, UNKNOWN_BACKWARD = "(root)", "(outside)", "(backward)"
UNKNOWN_PHASE = "forward or backward"

@dataclass
class TensorMeta:
    shape: Tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"[{','.join(map(str, self.shape))}] {str(self.dtype).replace('torch.', '')}"


@dataclass
class TensorStats:
    """Summary of one tensor, float64, over its finite elements; enough to see error grow."""

    numel: int
    mean: float
    rms: float
    abs_max: float
    nan: int
    inf: int

    @staticmethod
    def of(t: torch.Tensor) -> "TensorStats":
        x = t.detach().to("cpu", torch.float64) if (t.is_floating_point() or t.is_complex()) \
            else t.detach().cpu().to(torch.float64)
        finite = x[torch.isfinite(x)]
        n = finite.numel()
        return TensorStats(
            numel=x.numel(), mean=float(finite.mean()) if n else 0.0,
            rms=float(finite.square().mean().sqrt()) if n else 0.0,
            abs_max=float(finite.abs().max()) if n else 0.0,
            nan=int(torch.isnan(x).sum()), inf=int(torch.isinf(x).sum()))


@dataclass
class OpRecord:
    """One executed aten op. ``args``/``kwargs`` hold CPU copies of the inputs (as passed, before any
    in-place update) when captured with ``keep="tensors"``; ``outputs`` holds CPU copies of the
    returned tensors (``None`` where the op returned a non-tensor) unless ``keep="stats"``."""

    index: int
    op: str
    overload: str
    module: str
    phase: str
    node: Optional[str]
    input_meta: List[TensorMeta]
    output_meta: List[Optional[TensorMeta]]
    stats: List[Optional[TensorStats]]
    args: Any = None
    kwargs: Any = None
    outputs: Optional[List[Optional[torch.Tensor]]] = None
    faults: List[str] = field(default_factory=list)
    random: bool = False
    func: Any = field(default=None, repr=False)

    @property
    def shapes(self) -> str:
        """``"[2,3] float32, [3] float32 -> [2,3] float32"``."""
        ins = ", ".join(map(str, self.input_meta))
        outs = ", ".join(str(m) for m in self.output_meta if m is not None)
        return f"{ins} -> {outs}"



class Trace(list):
    """The :class:`OpRecord` of one run, in execution order; ``store`` holds its spilled tensors."""

    store: Optional[TensorStore] = None

    def phase(self, phase: str) -> "Trace":
        return Trace(r for r in self if r.phase == phase)

    def find(self, op: str) -> "Trace":
        """Records whose packet (``aten.mm``) or overload (``aten.mm.default``) name is ``op``."""
        return Trace(r for r in self if op in (r.op, r.overload))

    def op_names(self) -> List[str]:
        return [r.overload for r in self]


def bookkeeping(func: Any) -> bool:
    """True for the profiler's ops (``record_function``'s enter and exit, which optimizers call): in
    torch 1.12 they return a tensor that is a handle, not a result."""
    return str(func.overloadpacket).startswith("profiler.")


def is_random(func: Any, args: Sequence, kwargs: Dict[str, Any]) -> bool:
    """True when this call's result depends on the RNG: aten's ``nondeterministic_seeded`` ops
    (dropout, rand*, bernoulli, attention kernels with dropout) unless the call switches the
    randomness off with ``train=False`` or a zero ``p``/``dropout_p``."""
    if not compat.is_nondeterministic_seeded(func):
        return False
    bound = bind_arguments(func, args, kwargs)
    if bound.get("train") is False:
        return False
    return not any(name in bound and isinstance(bound[name], (int, float)) and not isinstance(bound[name], bool)
                   and bound[name] == 0 for name in ("p", "dropout_p"))


def flat_outputs(out: Any) -> List[Any]:
    """An op's return value as a flat list: tensors, and ``None`` for anything else."""
    if isinstance(out, (tuple, list)):
        return [o for item in out for o in flat_outputs(item)]
    return [out if isinstance(out, torch.Tensor) else None]


def cpu_copy(tree: Any) -> Any:
    """Detached CPU copies of every tensor in a pytree; other leaves unchanged."""
    return compat.tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t, tree)


class _ModuleTracker:
    """Which module is running (a stack of paths) and which module created each autograd node."""

    def __init__(self, root: Optional[torch.nn.Module]):
        self.names: Dict[int, str] = {}
        self.param_paths: Dict[int, str] = {}
        if root is not None:
            for name, module in root.named_modules():
                self.names[id(module)] = name or ROOT
                for p in module.parameters(recurse=False):
                    self.param_paths.setdefault(id(p), name or ROOT)
        self.stack: List[str] = []
        self.owner: Dict[Any, str] = {}
        self.handles = []

    @property
    def path(self) -> str:
        return self.stack[-1] if self.stack else OUTSIDE

    def _pre(self, module, args):
        name = self.names.get(id(module))
        if name is None:
            parent = self.stack[-1] + "." if self.stack and self.stack[-1] != ROOT else ""
            name = parent + type(module).__name__
        self.stack.append(name)

    def _post(self, module, args, output):
        self.claim(output)
        if self.stack:
            self.stack.pop()

    def claim(self, out: Any) -> None:
        """Assigns the current module to the unclaimed autograd ancestors of ``out``'s tensors."""
        path = self.path
        todo = [t.grad_fn for t in compat.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or node in self.owner:
                continue
            self.owner[node] = path
            todo.extend(n for n, _ in node.next_functions)

    def node_path(self, node) -> str:
        path = self.owner.get(node)
        if path is not None:
            return path
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in self.param_paths:
            return self.param_paths[id(variable)]
        return UNKNOWN_BACKWARD

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        hooks = torch.nn.modules.module
        self.handles.append(hooks.register_module_forward_pre_hook(self._pre))
        try:
            self.handles.append(hooks.register_module_forward_hook(self._post, always_call=True))
        except TypeError:
            self.handles.append(hooks.register_module_forward_hook(self._post))
        try:
            with _NodeClaimer(self):
                yield
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()


class _NodeClaimer(compat.TorchFunctionMode):
    def __init__(self, tracker: _ModuleTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, (torch.Tensor, tuple, list)):
            self.tracker.claim(out)
        return out


class CaptureMode(compat.TorchDispatchMode):
    """Records each aten op into ``trace`` and applies ``faults`` to the outputs first."""

    def __init__(self, trace: Trace, tracker: _ModuleTracker, keep: str = "tensors",
                 faults: Sequence[FaultSpec] = (), store: Optional[TensorStore] = None):
        super().__init__()
        if keep not in KEEP:
            raise ValueError(f"keep={keep!r}; accepted: {', '.join(KEEP)}")
        self.trace, self.tracker, self.keep, self.faults = trace, tracker, keep, list(faults)
        self.store = store
        self._copies: Dict[int, Tuple[Any, int, torch.Tensor]] = {}
        self._by_storage: Dict[int, List[int]] = {}

    def _copy(self, t: Any, share: bool = True) -> Any:
        """A CPU copy of tensor ``t``, shared with the earlier records that saw ``t`` unchanged (the
        same object, at the same version, its memory written by no op since): an op's output is
        copied once, not again by each op that reads it, which halves what a training step's trace
        holds. ``share=False`` for the outputs of ops that write their inputs, whose version counter
        is bumped only after the op returns to the dispatcher."""
        if not isinstance(t, torch.Tensor):
            return t
        try:
            version, storage = t._version, compat.untyped_storage(t).data_ptr()
        except (RuntimeError, AttributeError, NotImplementedError):  # no version counter or storage
            return self._new_copy(t)
        hit = self._copies.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        copy = self._new_copy(t)
        if share:
            try:
                self._copies[id(t)] = (weakref.ref(t), version, copy)
                self._by_storage.setdefault(storage, []).append(id(t))
            except TypeError:
                pass
        return copy

    def _new_copy(self, t: torch.Tensor) -> Any:
        return self.store.put(t) if self.store is not None else t.detach().to("cpu", copy=True)

    def _forget_written(self, func, args, kwargs) -> None:
        """Drops the shared copies of every tensor whose memory ``func`` writes (views and ``.data``
        aliases included: they share the storage)."""
        bound = bind_arguments(func, args, kwargs)
        for name in compat.written_arguments(func):
            value = bound.get(name)
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor):
                    try:
                        storage = compat.untyped_storage(t).data_ptr()
                    except (RuntimeError, NotImplementedError):
                        continue
                    for key in self._by_storage.pop(storage, []):
                        self._copies.pop(key, None)

    def _phase(self, node: Optional[Any]) -> str:
        """Without the autograd node (torch before 2.0) an op outside every module may be either."""
        if node is not None:
            return "backward"
        if self.tracker.stack or compat.has_autograd_node():
            return "forward"
        return UNKNOWN_PHASE

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recorded = not is_view_op(func) and str(func.overloadpacket) not in UNINITIALISED and not bookkeeping(func)
        saved = compat.tree_map(self._copy, (args, kwargs)) if recorded and self.keep == "tensors" else None
        fired_before = [f.fired for f in self.faults]
        out = run_with_faults(self.faults, func, args, kwargs)
        writes = func._schema.is_mutable
        if writes and self.keep == "tensors":  # recorded or not (resize_, in-place ops returning nothing)
            self._forget_written(func, args, kwargs)
        flat = flat_outputs(out)
        if not recorded or not any(t is not None for t in flat):
            return out
        node = compat.current_autograd_node()
        record = OpRecord(
            index=len(self.trace), op=str(func.overloadpacket), overload=str(func),
            module=self.tracker.node_path(node) if node is not None else self.tracker.path,
            phase=self._phase(node),
            node=node.name() if node is not None else None,
            input_meta=[TensorMeta(tuple(t.shape), t.dtype) for t in compat.tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor)],
            output_meta=[TensorMeta(tuple(t.shape), t.dtype) if t is not None else None for t in flat],
            stats=[TensorStats.of(t) if t is not None else None for t in flat] if self.keep == "stats" else [],
            faults=[f.spec for f, n in zip(self.faults, fired_before) if f.fired > n],
            random=is_random(func, args, kwargs),
            func=func,
        )
        if saved is not None:
            record.args, record.kwargs = saved
        if self.keep == "tensors":
            record.outputs = [self._copy(t, share=not writes) for t in flat]
        elif self.keep == "outputs":
            record.outputs = [cpu_copy(t) for t in flat]
        self.trace.append(record)
        return out


@contextlib.contextmanager
def capturing(root_module: Optional[torch.nn.Module] = None, faults: Sequence = (),
              keep: str = "tensors", spill: bool = False) -> Iterator[Trace]:
    """``with capturing(model) as trace: ...`` records what runs inside into ``trace``."""
    trace = Trace()
    trace.store = TensorStore() if spill and keep == "tensors" else None
    tracker = _ModuleTracker(root_module)
    with tracker.installed(), CaptureMode(trace, tracker, keep, parse_faults(faults), trace.store):
        yield trace


def capture_mode(keep: str = "tensors", spill: bool = False) -> Tuple["CaptureMode", Trace]:
    """A capture mode not yet entered, and its trace: for code that enters it itself, such as the
    aten graphs a compiler runs (under an active dispatch mode dynamo would not compile). Its ops
    are attributed to no module."""
    trace = Trace()
    trace.store = TensorStore() if spill and keep == "tensors" else None
    return CaptureMode(trace, _ModuleTracker(None), keep, (), trace.store), trace


def capture(fn: Callable, *args, root_module: Optional[torch.nn.Module] = None,
            faults: Sequence = (), keep: str = "tensors", spill: bool = False, **kwargs) -> Tuple[Any, Trace]:
    """Runs ``fn(*args, **kwargs)`` (forward and, if ``fn`` calls it, backward) and returns its
    result with the :class:`Trace` of aten ops. ``faults`` (specs or :class:`FaultSpec`, whose
    ``fired`` counters are updated) perturb the run. ``keep``: ``"tensors"`` (inputs and outputs,
    for replay), ``"outputs"`` (outputs only) or ``"stats"`` (per-output :class:`TensorStats`, for
    runs too big to copy). ``spill``: with ``"tensors"``, the copies go to a temporary file and
    the records hold :class:`~parity.spill.Stored` handles (see :func:`loaded`)."""
    with capturing(root_module, faults, keep, spill) as trace:
        result = fn(*args, **kwargs)
    return result, trace


def loaded(record: OpRecord) -> OpRecord:
    """``record`` with its spilled inputs and outputs read back (itself when nothing was spilled)."""
    if not any(isinstance(leaf, Stored) for leaf in compat.tree_leaves((record.args, record.kwargs, record.outputs))):
        return record
    return dataclasses.replace(record, args=load_tree(record.args), kwargs=load_tree(record.kwargs),
                               outputs=load_tree(record.outputs))

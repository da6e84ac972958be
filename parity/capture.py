"""Capture of every aten op a run executes, forward and backward, in execution order, with the
module that ran it and (optionally) CPU copies of its inputs and outputs for replay.

What is not recorded (so that the traces of two devices line up and every record is checkable):
ops that return no tensor (``sym_size``, ``_local_scalar_dense``), view ops whose outputs only alias
their inputs (``view``, ``t``, ``expand``, ``split``: no arithmetic, and backends differ in where they
insert them), and allocations of uninitialised memory (``empty*``, ``new_empty*``, ``resize_``).

Module paths come from global module forward hooks and the root module's ``named_modules``. A
backward op is attributed to the forward module that created its autograd node: every tensor a
torch function or module returns claims its not-yet-claimed autograd ancestors for the module
running at the time, and during backward ``torch._C._current_autograd_node()`` is looked up.
Gradient accumulation into a parameter is attributed to the parameter's module.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .faults import FaultSpec, apply_faults, is_view_op, parse_faults
from .metrics import bind_arguments

KEEP = ("tensors", "outputs", "stats")
UNINITIALISED = ("aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                 "aten.new_empty_strided", "aten.empty_permuted", "aten.resize_")
ROOT, OUTSIDE, UNKNOWN_BACKWARD = "(root)", "(outside)", "(backward)"

_current_node = getattr(torch._C, "_current_autograd_node", lambda: None)


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
    """The :class:`OpRecord` of one run, in execution order."""

    def phase(self, phase: str) -> "Trace":
        return Trace(r for r in self if r.phase == phase)

    def find(self, op: str) -> "Trace":
        """Records whose packet (``aten.mm``) or overload (``aten.mm.default``) name is ``op``."""
        return Trace(r for r in self if op in (r.op, r.overload))

    def op_names(self) -> List[str]:
        return [r.overload for r in self]


def is_random(func: Any, args: Sequence, kwargs: Dict[str, Any]) -> bool:
    """True when this call's result depends on the RNG: aten's ``nondeterministic_seeded`` ops
    (dropout, rand*, bernoulli, attention kernels with dropout) unless the call switches the
    randomness off with ``train=False`` or a zero ``p``/``dropout_p``."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
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
    return pytree.tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t, tree)


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
        todo = [t.grad_fn for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
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


class _NodeClaimer(TorchFunctionMode):
    def __init__(self, tracker: _ModuleTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, (torch.Tensor, tuple, list)):
            self.tracker.claim(out)
        return out


class CaptureMode(TorchDispatchMode):
    """Records each aten op into ``trace`` and applies ``faults`` to the outputs first."""

    def __init__(self, trace: Trace, tracker: _ModuleTracker, keep: str = "tensors",
                 faults: Sequence[FaultSpec] = ()):
        super().__init__()
        if keep not in KEEP:
            raise ValueError(f"keep={keep!r}; accepted: {', '.join(KEEP)}")
        self.trace, self.tracker, self.keep, self.faults = trace, tracker, keep, list(faults)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recorded = not is_view_op(func) and str(func.overloadpacket) not in UNINITIALISED
        saved = cpu_copy((args, kwargs)) if recorded and self.keep == "tensors" else None
        fired_before = [f.fired for f in self.faults]
        out = func(*args, **kwargs)
        out = apply_faults(self.faults, func, out)
        flat = flat_outputs(out)
        if not recorded or not any(t is not None for t in flat):
            return out
        node = _current_node()
        record = OpRecord(
            index=len(self.trace), op=str(func.overloadpacket), overload=str(func),
            module=self.tracker.node_path(node) if node is not None else self.tracker.path,
            phase="backward" if node is not None else "forward",
            node=node.name() if node is not None else None,
            input_meta=[TensorMeta(tuple(t.shape), t.dtype) for t in pytree.tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor)],
            output_meta=[TensorMeta(tuple(t.shape), t.dtype) if t is not None else None for t in flat],
            stats=[TensorStats.of(t) if t is not None else None for t in flat] if self.keep == "stats" else [],
            faults=[f.spec for f, n in zip(self.faults, fired_before) if f.fired > n],
            random=is_random(func, args, kwargs),
            func=func,
        )
        if saved is not None:
            record.args, record.kwargs = saved
        if self.keep != "stats":
            record.outputs = [cpu_copy(t) for t in flat]
        self.trace.append(record)
        return out


@contextlib.contextmanager
def capturing(root_module: Optional[torch.nn.Module] = None, faults: Sequence = (),
              keep: str = "tensors") -> Iterator[Trace]:
    """``with capturing(model) as trace: ...`` records what runs inside into ``trace``."""
    trace = Trace()
    tracker = _ModuleTracker(root_module)
    with tracker.installed(), CaptureMode(trace, tracker, keep, parse_faults(faults)):
        yield trace


def capture(fn: Callable, *args, root_module: Optional[torch.nn.Module] = None,
            faults: Sequence = (), keep: str = "tensors", **kwargs) -> Tuple[Any, Trace]:
    """Runs ``fn(*args, **kwargs)`` (forward and, if ``fn`` calls it, backward) and returns its
    result with the :class:`Trace` of aten ops. ``faults`` (specs or :class:`FaultSpec`, whose
    ``fired`` counters are updated) perturb the run. ``keep``: ``"tensors"`` (inputs and outputs,
    for replay), ``"outputs"`` (outputs only) or ``"stats"`` (per-output :class:`TensorStats`, for
    runs too big to copy)."""
    with capturing(root_module, faults, keep) as trace:
        result = fn(*args, **kwargs)
    return result, trace

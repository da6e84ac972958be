"""The compile call of ``--compile``, shared by the parity engine, the benchmark and the trainer:
a checked :class:`CompileSpec` (backend, mode, options), ``torch.compile`` with it or a vendor's
compiler, a step compiled once for repeated calls, and dynamo's compilation metrics."""
import contextlib
import importlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch


class CompileError(Exception):
    """torch.compile cannot run as asked: no torch.compile, an unknown backend, a bad option."""


@dataclass(frozen=True)
class CompileSpec:
    """How the device side is compiled: ``torch.compile(fn, backend=backend, mode=mode,
    options=options)``, or a vendor's ``compiler(fn, spec)`` (the ``pytest_detr_compile`` hook; where
    it returns None, torch.compile)."""

    backend: str
    mode: Optional[str] = None
    options: Tuple[Tuple[str, Any], ...] = ()
    fullgraph: bool = False
    compiler: Optional[Callable[[Callable, "CompileSpec"], Callable]] = None
    optimizer: bool = False  # also compile optimizer steps (see :func:`eager_optimizer_steps`)
    bisect: bool = True  # bisect a failing compiled run to its node (:mod:`parity.localise`)
    bisect_passes: bool = False  # and, with inductor, to its subsystem or pass (CompilerBisector)

    def rerun_options(self) -> List[Tuple[str, str]]:
        options = [("--compile", self.backend)]
        options += [("--compile-mode", self.mode)] if self.mode else []
        options += [("--compile-options", f"{k}={v}") for k, v in self.options]
        options += [("--compile-optimizer", "")] if self.optimizer else []
        options += [] if self.bisect else [("--compile-no-bisect", "")]
        options += [("--compile-bisect-passes", "")] if self.bisect_passes else []
        return options + ([("--compile-fullgraph", "")] if self.fullgraph else [])


def available() -> bool:
    return hasattr(torch, "compile")


def backends() -> List[str]:
    """The backends ``torch.compile`` knows (with the debugging ones, such as ``aot_eager``)."""
    import torch._dynamo

    return sorted(set(torch._dynamo.list_backends(exclude_tags=())))


def parse_option(text: str) -> Tuple[str, Any]:
    """``"max_autotune=True"`` -> ``("max_autotune", True)``: booleans, integers and floats are read
    as such, anything else stays text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CompileError(f"--compile-options {text!r}: expected KEY=VALUE, e.g. max_autotune=True")
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    for kind in (int, float):
        try:
            return key.strip(), kind(raw)
        except ValueError:
            pass
    return key.strip(), raw


def make_spec(backend: str, mode: Optional[str] = None, options: Sequence[str] = (), fullgraph: bool = False,
              compiler: Optional[Callable] = None, optimizer: bool = False, bisect: bool = True,
              bisect_passes: bool = False) -> CompileSpec:
    """A checked :class:`CompileSpec`; :class:`CompileError` says what is wrong and what is accepted."""
    if not available():
        raise CompileError(f"--compile {backend}: torch {torch.__version__} has no torch.compile (it came with "
                           "torch 2.0); run without --compile")
    if compiler is None and backend not in backends():
        raise CompileError(f"--compile {backend!r}: unknown backend; torch.compile knows {', '.join(backends())} "
                           "(a vendor's backend is registered by importing its plugin: --xpu-plugin MODULE)")
    parsed = tuple(parse_option(o) for o in options)
    if mode is not None and backend == "inductor":
        modes = list(importlib.import_module("torch._inductor").list_mode_options())
        if mode not in modes:
            raise CompileError(f"--compile-mode {mode!r}: inductor knows {', '.join(modes)}")
    if bisect_passes and backend != "inductor":
        raise CompileError(f"--compile-bisect-passes bisects Inductor's passes; the backend is {backend!r}")
    return CompileSpec(backend, mode, parsed, fullgraph, compiler, optimizer, bisect, bisect_passes)


def backend_kwargs(spec: CompileSpec) -> Dict[str, Any]:
    """What torch.compile would pass the backend for ``mode`` and ``options``."""
    if spec.backend == "inductor":
        inductor = importlib.import_module("torch._inductor")
        patches = dict(inductor.list_mode_options(spec.mode)) if spec.mode else {}
        patches.update(spec.options)
        return {"config_patches": patches} if patches else {}
    kwargs: Dict[str, Any] = {"mode": spec.mode} if spec.mode else {}
    return {**kwargs, **({"options": dict(spec.options)} if spec.options else {})}


@contextlib.contextmanager
def eager_optimizer_steps() -> Iterator[None]:
    """Every ``torch.optim`` optimizer's ``step`` runs eagerly inside compiled frames.

    Why: dynamo traces AdamW with its step count as a float32 tensor, so ``1 - beta2 ** step`` is
    computed in float32 where eager computes it in double: at step 1 that is 0.99998713e-3 for 1e-3,
    and every update moves by 6.4e-6 relative. A zero-initialised bias then ends 8.8x outside the
    ensemble's allowance on the CPU itself (tiny, ``--compile aot_eager``). Whether that precision is
    a correct device is a calibration question for the whole-run ensemble, so the optimizer is
    compiled only with ``--compile-optimizer``."""
    classes = [c for c in vars(torch.optim).values()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and "step" in vars(c)]
    saved = {c: vars(c)["step"] for c in classes}
    dynamo = importlib.import_module("torch._dynamo")
    try:
        for c, step in saved.items():
            c.step = dynamo.disable(step)
        yield
    finally:
        for c, step in saved.items():
            c.step = step


def compilation_metrics() -> list:
    from torch._dynamo.utils import get_compilation_metrics

    return list(get_compilation_metrics())


def metrics_since(before: list) -> list:
    """dynamo's compilation metrics added since ``before``, told apart by identity since dynamo
    keeps only the latest ones."""
    seen = {id(m) for m in before}
    return [m for m in compilation_metrics() if id(m) not in seen]


def optimizer_steps(spec: CompileSpec):
    return contextlib.nullcontext() if spec.optimizer else eager_optimizer_steps()


def compile_callable(spec: CompileSpec, fn: Callable, on_graph: Optional[Callable[[int, float], None]] = None):
    """``fn`` (a function or module) compiled once by ``spec``, by the vendor's compiler where it
    gives one; ``on_graph(nodes, seconds)`` after each graph the backend compiles."""
    import torch._dynamo

    compiled = spec.compiler(fn, spec) if spec.compiler is not None else None
    if compiled is not None:
        return compiled
    kwargs, lookup = backend_kwargs(spec), torch._dynamo.lookup_backend(spec.backend)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        start = time.perf_counter()
        out = lookup(gm, example_inputs, **kwargs)
        if on_graph is not None:
            on_graph(len(gm.graph.nodes), time.perf_counter() - start)
        return out

    return torch.compile(fn, backend=backend, fullgraph=spec.fullgraph)


class CompiledStep:
    """``fn()`` compiled once by ``spec`` for repeated calls (a benchmark's step): the optimizer
    step stays eager unless ``spec.optimizer``. ``compile_s`` and ``graphs`` sum dynamo's
    compilation metrics over the calls so far, so a recompilation in the timed rounds shows."""

    def __init__(self, spec: CompileSpec, fn: Callable[[], Any]):
        importlib.import_module("torch._dynamo").reset()
        self.spec, self.fn = spec, compile_callable(spec, fn)
        self.compile_s, self.graphs, self.recompilations = 0.0, 0, 0

    def __call__(self) -> Any:
        before = compilation_metrics()
        with optimizer_steps(self.spec):
            out = self.fn()
        metrics = metrics_since(before)
        self.compile_s += sum(m.entire_frame_compile_time_s or 0.0 for m in metrics)
        self.graphs += sum(1 for m in metrics if m.graph_node_count)
        self.recompilations += sum(1 for m in metrics if m.recompile_reason)
        return out

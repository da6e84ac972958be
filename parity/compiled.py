"""A part's device run through ``torch.compile``: the compile call, what it compiled (graphs, breaks
with their reasons and source lines, recompilations, compile time apart from run time), and faults
that only a compiler makes, applied as passes over the graph that dynamo hands the backend.

The baseline, the golden and the ensemble stay eager on the CPU. :func:`parity.compare.compare_part`
runs the device twice when a :class:`CompileSpec` is given: eagerly, judged as without it (op by op
and end to end), and compiled, whose outputs, gradients and parameters are judged end to end
against the same golden and ensemble.

Graph faults, ``compiled.<function or method>:<kind>[=<value>]``, each a miscompilation seen in the
wild: ``compiled.layer_norm:eps=10`` (a decomposition with ten times the epsilon),
``compiled.softmax:dtype=bf16`` (a fused softmax computed in bf16), ``compiled.mul:scalar=drop`` (a
pass that loses a constant scale, such as the sine encoding's 2 pi), ``compiled.linear:dtype=bf16``
(a fused reduction in bf16). They rewrite every matching node of every graph; a node matches by its
function's or method's name in dynamo's graph, before the backend's decompositions (so ``softmax``
inside ``multi_head_attention_forward``, one node there, is out of reach).
"""
import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from runtime.compiler import CompileSpec, backend_kwargs, compilation_metrics, metrics_since, optimizer_steps
from runtime.faultspec import parse_kind

from .localise import Prefix

PREFIX = "compiled."
GRAPH_KINDS = {
    "eps": "eps=<factor>: multiplies the node's eps argument (a wrong decomposition of a norm)",
    "dtype": "dtype=bf16|fp16: computes the node in that dtype (a fused kernel in low precision)",
    "scalar": "scalar=drop|double: a number operand replaced by 1, or applied twice (a lost or repeated scale)",
}
GRAPH_GRAMMAR = f"{PREFIX}<function or method>:<kind>=<value>, kinds {', '.join(GRAPH_KINDS)}"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GraphFault:
    """One parsed graph fault; ``fired`` counts the nodes it rewrote."""

    spec: str
    target: str
    kind: str
    value: Any
    fired: int = 0

    def matches(self, node) -> bool:
        if node.op == "call_method":
            return node.target == self.target
        return node.op == "call_function" and getattr(node.target, "__name__", None) == self.target

    def rewrite(self, graph, node) -> bool:
        """Rewrites ``node`` in ``graph``; False where the node has no such argument."""
        return _REWRITES[self.kind](self, graph, node)


def is_graph_fault(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def split_faults(specs: Sequence[Any]) -> Tuple[List[Any], List[GraphFault]]:
    """(the aten fault specs as given, the ``compiled.*`` ones parsed); ValueError on a bad graph fault."""
    texts = [s if isinstance(s, str) else s.spec for s in specs]
    return ([s for s, t in zip(specs, texts) if not is_graph_fault(t)],
            [parse_graph_fault(t) for t in texts if is_graph_fault(t)])


def parse_graph_fault(spec: str) -> GraphFault:
    """``compiled.softmax:dtype=bf16`` -> GraphFault; ValueError says what is accepted."""
    body, sep, rest = spec.strip()[len(PREFIX):].partition(":")
    if not sep or not body or not rest:
        raise ValueError(f"fault spec {spec!r}: expected {GRAPH_GRAMMAR}")
    kind, _, raw = parse_kind(rest, GRAPH_KINDS, spec, needs_value=GRAPH_KINDS)
    if kind == "dtype":
        if raw not in DTYPES:
            raise ValueError(f"fault spec {spec!r}: dtype must be one of {', '.join(DTYPES)}")
        return GraphFault(spec, body, kind, DTYPES[raw])
    if kind == "scalar":
        if raw not in ("drop", "double"):
            raise ValueError(f"fault spec {spec!r}: scalar must be drop or double")
        return GraphFault(spec, body, kind, raw)
    try:
        return GraphFault(spec, body, kind, float(raw))
    except ValueError:
        raise ValueError(f"fault spec {spec!r}: {kind} needs a number, got {raw!r}") from None


def _eps(fault: GraphFault, graph, node) -> bool:
    if "eps" in node.kwargs:
        node.kwargs = {**node.kwargs, "eps": node.kwargs["eps"] * fault.value}
        return True
    if node.target is torch.nn.functional.layer_norm and len(node.args) == 5:
        node.args = node.args[:4] + (node.args[4] * fault.value,)
        return True
    return False


def _floating(arg) -> bool:
    value = arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _dtype(fault: GraphFault, graph, node) -> bool:
    out = node.meta.get("example_value")
    tensors = [a for a in node.args if _floating(a)]
    if not tensors or not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return False
    for arg in dict.fromkeys(tensors):
        with graph.inserting_before(node):
            low = graph.call_method("to", (arg, fault.value))
        node.replace_input_with(arg, low)
    with graph.inserting_after(node):
        back = graph.call_method("to", (node, out.dtype))
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    return True


def _scalar(fault: GraphFault, graph, node) -> bool:
    numbers = [i for i, a in enumerate(node.args) if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if not numbers or not any(isinstance(a, torch.fx.Node) for a in node.args):
        return False
    args = list(node.args)
    args[numbers[0]] = 1.0 if fault.value == "drop" else args[numbers[0]] ** 2
    node.args = tuple(args)
    return True


_REWRITES = {"eps": _eps, "dtype": _dtype, "scalar": _scalar}


def apply_graph_faults(gm: torch.fx.GraphModule, faults: Sequence[GraphFault]) -> None:
    """Rewrites ``gm`` in place with every fault that matches one of its nodes."""
    if not faults:
        return
    for node in list(gm.graph.nodes):
        for fault in faults:
            if fault.matches(node) and fault.rewrite(gm.graph, node):
                fault.fired += 1
    gm.graph.lint()
    gm.recompile()


@dataclass(frozen=True)
class Break:
    reason: str
    where: str  # file:line of the user code that broke the graph

    def text(self) -> str:
        return f"{self.reason} at {self.where}"


@dataclass
class CompileStats:
    """What one compiled run compiled and how long it took."""

    backend: str
    graphs: List[int] = field(default_factory=list)  # FX nodes of each graph the backend compiled
    breaks: List[Break] = field(default_factory=list)
    recompilations: int = 0
    compile_s: float = 0.0
    run_s: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        counts: Dict[str, int] = {}
        for b in self.breaks:
            counts[b.text()] = counts.get(b.text(), 0) + 1
        return {"backend": self.backend, "graphs": len(self.graphs), "graph_nodes": list(self.graphs),
                "breaks": len(self.breaks), "break_reasons": [{"break": k, "count": v} for k, v in counts.items()],
                "recompilations": self.recompilations, "compile_s": round(self.compile_s, 3),
                "run_s": round(self.run_s, 3)}

    def summary(self) -> str:
        return (f"{self.backend}: {len(self.graphs)} graph(s), {len(self.breaks)} break(s), "
                f"{self.recompilations} recompilation(s), compile {self.compile_s:.1f} s, run {self.run_s:.1f} s")


def compiled_run(spec: CompileSpec, run: Callable, faults: Sequence[GraphFault], stats: CompileStats,
                 prefix: Optional[Prefix] = None) -> Callable:
    """``run`` as compiled by ``spec``: each graph the backend receives is counted into ``stats``
    and rewritten by ``faults`` first. ``prefix`` lists the graphs' nodes and may hold a budget: the
    nodes past it run eagerly, unrewritten (:mod:`parity.localise`). The returned callable measures
    its own compile and run time."""
    import torch._dynamo

    kwargs = backend_kwargs(spec)
    prefix = prefix if prefix is not None else Prefix()

    def compile_fn(gm: torch.fx.GraphModule, example_inputs):
        apply_graph_faults(gm, faults)
        return torch._dynamo.lookup_backend(spec.backend)(gm, example_inputs, **kwargs)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        stats.graphs.append(len(gm.graph.nodes))
        return prefix.backend(gm, example_inputs, compile_fn)

    compiled = spec.compiler(run, spec) if spec.compiler is not None else None
    if compiled is None:
        compiled = torch.compile(run, backend=backend)

    def call(module, inputs):
        torch._dynamo.reset()
        prefix.nodes.clear()
        prefix.graphs = 0
        before = compilation_metrics()
        start = time.perf_counter()
        with optimizer_steps(spec):
            out = compiled(module, inputs)
        wall = time.perf_counter() - start
        metrics = metrics_since(before)
        if not stats.graphs:  # a vendor's compiler: dynamo's own count of the graphs it handed over
            stats.graphs.extend(m.graph_node_count for m in metrics if m.graph_node_count)
        stats.compile_s = sum(m.entire_frame_compile_time_s or 0.0 for m in metrics)
        stats.run_s = max(wall - stats.compile_s, 0.0)
        stats.recompilations = sum(1 for m in metrics if m.recompile_reason)
        return out

    return call


def decomposed_run(spec: CompileSpec, run: Callable, faults: Sequence[GraphFault], mode=None) -> Callable:
    """``run`` through dynamo and AOTAutograd with Inductor's decompositions and partitioner, each
    forward and backward aten graph run eagerly, under ``mode`` when given (a capture): the graph
    a backend lowers, before its own lowering. Graph faults rewrite dynamo's graphs first."""
    import torch._dynamo
    from torch._dynamo.backends import debugging

    def backend(gm: torch.fx.GraphModule, example_inputs):
        apply_graph_faults(gm, faults)
        if mode is None:
            return debugging.aot_eager_decomp_partition(gm, example_inputs)
        return debugging.aot_eager_decomp_partition_with_mode(gm, example_inputs, mode=mode)

    compiled = torch.compile(run, backend=backend)

    def call(module, inputs):
        torch._dynamo.reset()
        with optimizer_steps(spec):
            return compiled(module, inputs)

    return call


def count_breaks(spec: CompileSpec, run: Callable, module, inputs, stats: CompileStats) -> None:
    """Fills ``stats.breaks`` with every graph break of ``run(module, inputs)``, its reason and user
    line, from dynamo's explain: one more run, eagerly, so give it copies. The optimizer steps run as
    in the compiled run."""
    dynamo = importlib.import_module("torch._dynamo")
    dynamo.reset()
    with optimizer_steps(spec):
        explained = dynamo.explain(run)(module, inputs)
    dynamo.reset()
    stats.breaks = []
    for reason in explained.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
        stats.breaks.append(Break(reason.reason.strip().splitlines()[0], where))


def fullgraph_failure(stats: CompileStats) -> Optional[str]:
    """Why ``--compile-fullgraph`` fails the part, or None."""
    if not stats.breaks:
        return None
    first = stats.breaks[0]
    return (f"fail: --compile-fullgraph: {len(stats.breaks)} graph break(s), the first: {first.text()}")

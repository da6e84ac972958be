"""Names the FX node whose compilation fails a compiled run: the graphs dynamo hands the backend are
compiled up to a node budget, counted over all graphs in the order they are handed over, and the
nodes past it run eagerly (``torch.fx`` interprets them). A bisection over the budget, with the
suite's own end-to-end verdict as the good/bad test, finds the first node whose inclusion in the
compiled region turns a passing run into a failing one.

A fused kernel that is wrong only when its whole fusion is compiled fails at the node that completes
the fusion, so the culprit is where to look and not always the one op at fault. The budget 0 runs
every graph eagerly through dynamo: when that fails too, the failure is dynamo's tracing, not the
backend, and no node is named.
"""
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

COMPUTE = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class GraphNode:
    """One compute node of a graph dynamo handed the backend; ``index`` counts from 1 over all graphs."""

    index: int
    graph: int
    name: str
    target: str
    module: str
    where: str
    shapes: str

    def text(self) -> str:
        return (f"node #{self.index} {self.target} ({self.name}, graph {self.graph}) in module {self.module}, "
                f"output {self.shapes}, from {self.where}")


def _target(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", None) or str(node.target)
    module = "operator" if module == "_operator" else module
    return f"{module}.{name}" if module and not module.startswith("_") else name


def _module(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "(top level)"
    path = list(stack.values())[-1][0]
    # dynamo names the root module by its frame variable: L['module'].decoder.layers[0] -> decoder.layers.0
    path = re.sub(r"^L\['[^']*'\]\.?", "", str(path))
    return re.sub(r"\[(\d+)\]", r".\1", path) or "(root)"


def _where(node) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    return f"{frames[-1][0].rsplit('/', 1)[-1]}:{frames[-1][1]}" if frames else "?"


def _shapes(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    return type(value).__name__


def describe(node, index: int, graph: int) -> GraphNode:
    return GraphNode(index, graph, node.name, _target(node), _module(node), _where(node),
                     _shapes(node.meta.get("example_value")))


class _Deferred(torch.nn.Module):
    """A submodule compiled at its first call, when its real inputs are at hand. Backends such as
    AOTAutograd take graphs that return a tuple, so a single output is returned as one."""

    def __init__(self, module: torch.fx.GraphModule, compile_fn: Callable):
        super().__init__()
        self.module, self.compile_fn, self.compiled = module, compile_fn, None
        output = next(n for n in module.graph.nodes if n.op == "output")
        self.single = not isinstance(output.args[0], (tuple, list))
        if self.single:
            output.args = ((output.args[0],),)
            module.recompile()

    def forward(self, *args):
        if self.compiled is None:
            self.compiled = self.compile_fn(self.module, list(args))
        out = self.compiled(*args)
        return out[0] if self.single else out


@dataclass
class Prefix:
    """Compiles the first ``budget`` compute nodes (all when None) and runs the rest eagerly;
    ``nodes`` lists every compute node seen, in order."""

    budget: Optional[int] = None
    nodes: List[GraphNode] = field(default_factory=list)
    graphs: int = 0

    def backend(self, gm: torch.fx.GraphModule, example_inputs, compile_fn: Callable):
        """What the backend returns for ``gm``: ``compile_fn(gm, example_inputs)`` for the nodes
        within the budget, fx's eager run for the others."""
        from torch.fx.passes.split_module import split_module

        compute = [n for n in gm.graph.nodes if n.op in COMPUTE]
        start, self.graphs = len(self.nodes), self.graphs + 1
        self.nodes += [describe(n, start + i + 1, self.graphs) for i, n in enumerate(compute)]
        keep = len(compute) if self.budget is None else min(max(self.budget - start, 0), len(compute))
        if keep == len(compute):
            return compile_fn(gm, example_inputs)
        if keep == 0:
            return gm.forward
        order = {n: i for i, n in enumerate(compute)}

        def part(node) -> int:
            # an item of a tuple stays with the node that made it: AOTAutograd takes flat outputs only
            if node.target is operator.getitem and node.args[0] in order and \
                    isinstance(node.args[0].meta.get("example_value"), (tuple, list)):
                node = node.args[0]
            return 0 if order.get(node, keep) < keep else 1

        split = split_module(gm, None, part, keep_original_order=True)
        split.submod_0 = _Deferred(split.submod_0, compile_fn)
        return split.forward


@dataclass
class Probe:
    """One compiled run with a node budget: failed or not, and its worst compiled row."""

    budget: int
    failed: bool
    worst: str


@dataclass
class Localisation:
    """The outcome of the bisection: the culprit node (None when even the eager graphs fail), the
    node count, and the runs made."""

    node: Optional[GraphNode]
    total: int
    probes: List[Probe]
    passes: Optional[str] = None  # what Inductor's CompilerBisector found, when asked

    def text(self) -> str:
        return self._nodes() + (f"; {self.passes}" if self.passes else "")

    def _nodes(self) -> str:
        runs = len(self.probes)
        if not self.total:
            return "no node to bisect: the backend saw no graph (a vendor's compiler hands none over)"
        if self.node is None:
            return (f"no node is to blame: with all {self.total} nodes run eagerly through dynamo the part fails "
                    f"too ({self.probes[0].worst}), so the failure is in dynamo's tracing, not the backend "
                    f"({runs} run(s))")
        passing = max((p for p in self.probes if not p.failed), key=lambda p: p.budget)
        failing = min((p for p in self.probes if p.failed), key=lambda p: p.budget)
        return (f"culprit: {self.node.text()}; with {_first(passing.budget)} of {self.total} compiled the part "
                f"passes ({passing.worst}), with {_first(failing.budget)} it fails ({failing.worst}); bisected "
                f"in {runs} compiled run(s)")

    def as_dict(self) -> dict:
        return {"node": vars(self.node) if self.node else None, "total": self.total,
                "probes": [vars(p) for p in self.probes], "passes": self.passes, "text": self.text()}


def _first(budget: int) -> str:
    return {0: "no node", 1: "node 1"}.get(budget, f"nodes 1-{budget}")


def bisect(probe: Callable[[int], Tuple[bool, str]], nodes: List[GraphNode], worst: str) -> Localisation:
    """Bisects over the node budget between 0 (every graph eager) and all of ``nodes`` (the failing
    compiled run, whose worst row is ``worst``). ``probe(budget)`` runs the part compiled up to
    ``budget`` nodes and returns (failed, its worst compiled row): 1 + log2(nodes) runs."""
    total = len(nodes)
    probes = [Probe(total, True, worst)]
    if not total:
        return Localisation(None, total, probes)
    failed, seen = probe(0)
    probes.insert(0, Probe(0, failed, seen))
    if failed:
        return Localisation(None, total, probes)
    good, bad = 0, total
    while bad - good > 1:
        middle = (good + bad) // 2
        failed, seen = probe(middle)
        probes.append(Probe(middle, failed, seen))
        good, bad = (good, middle) if failed else (middle, bad)
    return Localisation(nodes[bad - 1], total, probes)


def bisect_passes(passes: Callable[[], bool]) -> str:
    """Drives Inductor's ``CompilerBisector`` with ``passes()``, the suite's verdict on one more
    compiled run: it tries dynamo alone, AOTAutograd, the decompositions, then Inductor with each
    subsystem (graph passes, config changes, lowerings) disabled or bisected in turn. Its runs
    compile with its own backend, so graph faults do not act in them."""
    try:
        from torch._inductor.compiler_bisector import CompilerBisector
    except ImportError:
        return f"passes not bisected: torch {torch.__version__} has no torch._inductor.compiler_bisector"
    found = CompilerBisector.do_bisect(passes)
    if found is None:
        return "CompilerBisector: every stage passed, so the failure did not reproduce under its backends"
    text = f"CompilerBisector, judged by this suite: the failure is in {found.backend}"
    if found.subsystem:
        text += f", subsystem {found.subsystem}"
        if found.bisect_number:
            text += f" (its application #{found.bisect_number}: {found.debug_info})"
    return text

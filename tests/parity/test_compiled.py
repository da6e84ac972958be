"""``--compile``: the compiled device run judged end to end from both sides. Inductor on this CPU (generated
C++, vectorised math, fused reductions) is a correct device that differs from eager and must pass; each
graph fault, a miscompilation made on purpose, must fail the compiled run and be named in the report."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.parts import PARTS
from parity import localise
from parity.compare import compare_part
from parity.compiled import parse_graph_fault
from parity.localise import GraphNode, bisect
from parity.report import summary_lines
from runtime import compiler
from runtime.compiler import CompileError, make_spec
from tests.test_fault_catalogue import tiny_parts

pytestmark = pytest.mark.skipif(not compiler.available(), reason="torch.compile came with torch 2.0")

# (what the miscompilation looks like, part, graph fault, the node it is bisected to: target, module)
COMPILE_CATALOGUE = [
    ("layer norm decomposed with 10x its epsilon", "transformer", "compiled.layer_norm:eps=10",
     ("torch.nn.functional.layer_norm", "transformer.encoder.layers.0.norm1")),
    ("the matcher's fused softmax in bf16", "matcher cost", "compiled.softmax:dtype=bf16",
     ("Tensor.softmax", "(top level)")),
    ("the sine encoding's 2 pi scale dropped", "position encoding (sine)", "compiled.mul:scalar=drop",
     ("operator.mul", "encoding")),
    ("the box head's fused matmuls in bf16", "heads", "compiled.linear:dtype=bf16",
     ("torch._C._nn.linear", "class_embed")),
]


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def check(parts, part, faults=(), **spec):
    module, inputs, run = parts[part]
    return compare_part(part, module, inputs, run, "cpu", "fp32", faults=faults,
                        compile=make_spec(spec.pop("backend", "inductor"), **spec),
                        **{**PARTS[part].judge, "whole_run": False})


@pytest.mark.parametrize("part", sorted({c[1] for c in COMPILE_CATALOGUE}))
def test_inductor_on_this_cpu_passes(parts, part):
    result = check(parts, part)
    assert result.passed, result.failure_message()
    # the decomposed depth replayed the aten ops of Inductor's decomposed graphs, each within its allowance
    decomposed = result.to_dict()["decomposed"]
    assert decomposed["ops_checked"] > 0 and decomposed["end_to_end"] and result.decomposed.passed
    stats = result.to_dict()["compiled"]
    assert stats["backend"] == "inductor" and stats["graphs"] >= 1 and stats["compile_s"] > 0
    assert result.compiled and all(e.name.startswith("compiled ") for e in result.compiled)


@pytest.mark.parametrize("bug, part, spec, culprit", COMPILE_CATALOGUE, ids=[c[0] for c in COMPILE_CATALOGUE])
def test_each_miscompilation_is_caught_and_bisected_to_its_node(parts, bug, part, spec, culprit):
    # aot_eager runs the rewritten graph as it is; inductor computes bf16 in fp32 and drops casts it
    # finds redundant, so it can absorb a cast-shaped fault (the matcher's softmax then passes)
    result = check(parts, part, [spec], backend="aot_eager")
    assert not result.passed and result.replay.passed, "the eager run must pass: the fault is in the graph only"
    # dynamo's graph is rewritten before the decompositions, so the decomposed run fails first; its
    # ops, replayed one by one from the CPU's unfaulted graph, pass: each is computed right
    failure = result.first_failure
    assert failure["source"] == "decomposed graph" and failure["margin"] > 1, failure
    assert result.decomposed.passed and result.decomposed.checked > 0
    assert any(not e.judgement.passed for e in result.compiled)
    assert result.graph_faults[0].fired >= 1 and not result.never_fired
    assert f"--inject-fault {spec}" in result.rerun_command()
    assert "decomposed graph failed" in result.failure_message()
    # the first node the fault rewrites is the one whose compilation turns the run from pass to fail
    node = result.localised.node
    assert (node.target, node.module) == culprit, result.localised.text()
    assert failure["node"]["index"] == node.index and node.where.endswith(".py:" + node.where.split(":")[-1])
    assert f"culprit: node #{node.index} {node.target}" in result.failure_message()
    probes = {p.budget: p.failed for p in result.localised.probes}
    assert probes[0] is False and probes[node.index] is True and probes.get(node.index - 1, False) is False
    assert result.to_dict()["localised"]["node"]["shapes"] == node.shapes


def test_a_passing_compiled_run_is_not_bisected(parts):
    result = check(parts, "heads", backend="aot_eager")
    assert result.passed and result.localised is None and result.to_dict()["localised"] is None


def test_a_graph_fault_that_matches_no_node_is_reported_as_never_fired(parts):
    # dynamo keeps multi_head_attention_forward as one node: the softmax inside it is out of reach
    result = check(parts, "transformer", ["compiled.softmax:dtype=bf16"], backend="aot_eager")
    assert result.passed and result.never_fired == ["compiled.softmax:dtype=bf16"]
    assert any("never fired: no node of the compiled graphs" in n for n in result.notes)


def test_breaks_are_reported_with_their_line_and_fail_with_fullgraph(parts):
    loose = check(parts, "matcher cost", backend="aot_eager")
    assert loose.passed and loose.compile_stats.breaks
    assert all(":" in b.where and b.where != "?" for b in loose.compile_stats.breaks)
    strict = check(parts, "matcher cost", backend="aot_eager", fullgraph=True)
    assert not strict.passed
    assert "--compile-fullgraph" in strict.first_failure["verdict"]
    assert loose.compile_stats.breaks[0].where in strict.first_failure["verdict"]


def test_graph_fault_specs_are_checked():
    assert parse_graph_fault("compiled.layer_norm:eps=10").value == 10.0
    assert parse_graph_fault("compiled.softmax:dtype=bf16").value is torch.bfloat16
    for spec, message in (("compiled.softmax:dtype=fp8", "dtype must be one of"),
                          ("compiled.mul:scalar=triple", "scalar must be drop or double"),
                          ("compiled.layer_norm:eps=big", "eps needs a number"),
                          ("compiled.softmax:wobble=1", "unknown kind 'wobble'"),
                          ("compiled.softmax", "expected compiled.<function or method>")):
        with pytest.raises(ValueError, match=message):
            parse_graph_fault(spec)


def test_a_bad_compile_request_says_what_is_accepted(monkeypatch):
    with pytest.raises(CompileError, match="unknown backend; torch.compile knows .*inductor"):
        make_spec("nosuchbackend")
    with pytest.raises(CompileError, match="--compile-mode 'fastest': inductor knows .*max-autotune"):
        make_spec("inductor", mode="fastest")
    with pytest.raises(CompileError, match="expected KEY=VALUE"):
        make_spec("inductor", options=["max_autotune"])
    assert make_spec("inductor", options=["max_autotune=False", "x=2"]).options == (("max_autotune", False),
                                                                                   ("x", 2))
    monkeypatch.setattr(compiler, "available", lambda: False)
    with pytest.raises(CompileError, match="has no torch.compile"):
        make_spec("inductor")


def test_the_rerun_command_carries_the_compile_options():
    spec = make_spec("inductor", mode="max-autotune", options=["max_autotune=True"], fullgraph=True, optimizer=True,
                     bisect=False)
    assert spec.rerun_options() == [("--compile", "inductor"), ("--compile-mode", "max-autotune"),
                                    ("--compile-options", "max_autotune=True"), ("--compile-optimizer", ""),
                                    ("--compile-no-bisect", ""), ("--compile-fullgraph", "")]


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), data=st.data())
def test_bisection_finds_the_first_node_that_fails_the_run(total, data):
    culprit = data.draw(st.integers(1, total))
    seen = []

    def probe(budget):
        seen.append(budget)
        return budget >= culprit, f"at {budget}"

    nodes = [GraphNode(i + 1, 1, f"n{i}", "t", "m", "f.py:1", "[1] float32") for i in range(total)]
    found = bisect(probe, nodes, "whole run")
    assert found.node.index == culprit
    assert len(seen) <= 1 + math.ceil(math.log2(total)) if total > 1 else seen == [0]
    assert f"culprit: node #{culprit} " in found.text()


def test_a_failure_with_every_node_eager_blames_no_node():
    nodes = [GraphNode(i + 1, 1, f"n{i}", "t", "m", "f.py:1", "[1] float32") for i in range(8)]
    found = bisect(lambda budget: (True, "fails anyway"), nodes, "whole run")
    assert found.node is None and len(found.probes) == 2
    assert "failure is in dynamo's tracing, not the backend" in found.text()


def test_compiler_bisector_is_driven_by_the_suites_verdict(monkeypatch):
    bisector = pytest.importorskip("torch._inductor.compiler_bisector")
    verdicts = []

    def do_bisect(fn):
        verdicts.append(fn())
        return bisector.BisectionResult("inductor", "inductor_layout_optimization", 0, "inductor_layout_optimization")

    monkeypatch.setattr(bisector.CompilerBisector, "do_bisect", do_bisect)
    text = localise.bisect_passes(lambda: False)
    assert verdicts == [False]
    assert text == "CompilerBisector, judged by this suite: the failure is in inductor, subsystem " \
                   "inductor_layout_optimization"
    with pytest.raises(CompileError, match="bisects Inductor's passes; the backend is 'aot_eager'"):
        make_spec("aot_eager", bisect_passes=True)


def test_the_summary_line_names_the_depths_and_the_culprit(parts):
    result = check(parts, "position encoding (sine)", ["compiled.mul:scalar=drop"], backend="aot_eager")
    (line,) = summary_lines([result])
    assert line.startswith("FAIL position encoding (sine) [fp32]")
    assert f"{result.decomposed.checked} decomposed ops replayed, compiled with aot_eager: 1 graph(s)" in line
    assert "bisected to node #7 operator.mul in encoding" in line


def test_a_vendors_compile_call_replaces_torch_compile(parts):
    """``pytest_detr_compile`` hands the suite a compile call of its own (here torch.compile with
    aot_eager behind a name dynamo does not know): the compiled run goes through it, and the node
    bisection, which needs the graphs handed to the suite's own backend, says it has none."""
    calls = []

    def compiler(fn, spec):
        calls.append(spec.backend)
        return torch.compile(fn, backend="aot_eager")

    module, inputs, run = parts["heads"]
    spec = make_spec("vendor-graph-compiler", compiler=compiler)
    result = compare_part("heads", module, inputs, run, "cpu", "fp32", compile=spec,
                          **{**PARTS["heads"].judge, "whole_run": False})
    assert calls == ["vendor-graph-compiler"] and result.passed, result.failure_message()
    assert result.compile_stats.graphs, "the graphs dynamo compiled are counted from its metrics"
    assert localise.Localisation(None, 0, [localise.Probe(0, True, "x")]).text().startswith("no node to bisect")

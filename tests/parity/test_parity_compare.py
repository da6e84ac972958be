"""compare_part end to end with the CPU as the device under test: clean runs pass in every
precision, and each injected fault is caught with the faulted op named as the first failure."""
import shlex

import pytest
import torch

from parity import ensemble
from parity.compare import compare_part
from parity.errormodel import ErrorModel
from tests.parity.blocks import Block, cpu_cannot_capture, reported


def build_block():
    torch.manual_seed(0)
    return Block()


def build_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


IMAGES = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
FEATURES = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
TARGETS = torch.tensor([0, 2, 1, 1, 0])


def block_outputs(model, x):
    return model(x)


def mlp_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def check_block(precision="fp32", faults=(), **kw):
    return compare_part("block", build_block, IMAGES, block_outputs, "cpu", precision, faults, **kw)


@pytest.mark.parametrize("name", ["fp32", "tf32", "amp", "fp16", "bf16"])
def test_clean_run_passes(name):
    """The CPU against itself: every op and output is bit-identical and passes without a golden."""
    if cpu_cannot_capture(name):
        pytest.skip(cpu_cannot_capture(name))
    result = check_block(name)
    assert result.passed, result.failure_message("clean")
    assert result.first_failure is None and result.failure_message() == ""
    assert {r["phase"] for r in result.rows()} == {"forward", reported("", "backward")[1]}
    assert len(result.end_to_end) > 5 and result.ops_checked == len(result.rows()) > 40
    if name == "tf32":  # the baseline emulates TF32's rounding of matmul inputs; a CPU device has none
        assert 0 < result.replay.identical < result.ops_checked and result.worst().margin <= 1
        return
    assert result.replay.identical == result.ops_checked
    assert result.worst() is None and result.whole_run is None and result.ensemble_size == 0
    assert all(e.judgement.kind == "identical" for e in result.end_to_end)


@pytest.mark.parametrize("name", ["fp32", "tf32", "amp", "fp16", "bf16"])
def test_other_cpu_kernels_pass_in_every_precision(name):
    """cpu-alt, a correct device whose convolutions, norms and sums differ in the last bits: the
    differing ops are judged against golden and pass, as do the outputs against the ensemble."""
    if cpu_cannot_capture(name):
        pytest.skip(cpu_cannot_capture(name))
    result = compare_part("block", build_block, IMAGES, block_outputs, "cpu-alt", name)
    assert result.passed, result.failure_message("cpu-alt")
    if result.replay.identical == result.ops_checked:
        pytest.skip(f"cpu-alt runs the CPU's own kernels in {name} on torch {torch.__version__}: nothing to judge")
    assert result.replay.identical < result.ops_checked and 0 < result.worst().margin <= 1
    assert result.whole_run.diverged is None and result.whole_run.aligned > 40
    assert all(e.judgement.passed for e in result.end_to_end)
    assert any(e.judgement.kind == "ensemble" for e in result.end_to_end)
    assert result.ensemble_size == ensemble.ENSEMBLE_SIZE + 1


def test_mlp_scalar_loss_passes_and_covers_backward():
    result = compare_part("mlp", build_mlp, (FEATURES, TARGETS), mlp_loss, "cpu", "fp32")
    assert result.passed, result.failure_message()
    ops = {r["overload"] for r in result.rows() if r["phase"] == reported("", "backward")[1]}
    assert {"aten._log_softmax_backward_data.default", "aten.threshold_backward.default", "aten.mm.default"} <= ops
    assert {e.name for e in result.end_to_end} >= {"output", "grad 0.weight", "grad 2.bias"}


# (fault, expected first failing op, its module, phase)
CATALOGUE = [
    ("aten._softmax:noise=1e-3", "aten._softmax.default", "attn", "forward"),
    ("aten.softmax:scale=1.01", "aten._softmax.default", "attn", "forward"),
    ("aten.addmm:round=bf16", "aten.addmm.default", "attn", "forward"),
    ("aten.native_layer_norm:nan", "aten.native_layer_norm.default", "norm", "forward"),
    ("aten.native_layer_norm:inf", "aten.native_layer_norm.default", "norm", "forward"),
    ("aten.convolution:scale=1.001", "aten.convolution.default", "conv", "forward"),
    ("aten.relu:zero=0.1", "aten.relu.default", "act", "forward"),
    ("aten.bmm:round=tf32", "aten.bmm.default", "attn", "forward"),
    ("aten.mean.dim:noise=1e-4", "aten.mean.dim", "attn", "forward"),
    ("aten.mm:round=tf32", "aten.mm.default", "attn", "forward"),
    ("aten.convolution_backward:offset=1e-3", "aten.convolution_backward.default", "conv", "backward"),
    ("aten.native_layer_norm_backward:offset=1e-4", "aten.native_layer_norm_backward.default", "norm", "backward"),
    ("aten.threshold_backward:zero", "aten.threshold_backward.default", "act", "backward"),
    ("aten.sum.dim_IntList:scale=1.0001", "aten.sum.dim_IntList", "head", "backward"),
    ("aten._softmax_backward_data:noise=1e-3", "aten._softmax_backward_data.default", "attn", "backward"),
]
# torch 1.12's multi-head attention averages its heads' weights by a sum and a division, not a mean: there
# the first mean the fault meets is the block's own, and the first sum is the attention's.
SUM_AVERAGED_HEADS = {"aten.mean.dim:noise=1e-4": ("(root)", "forward"),
                      "aten.sum.dim_IntList:scale=1.0001": ("attn", "forward")}


@pytest.mark.parametrize("spec, op, module, phase", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_fault_is_detected_and_localised(spec, op, module, phase):
    result = check_block("fp32", [spec])
    assert not result.passed
    fail = result.first_failure
    places = [reported(module, phase), SUM_AVERAGED_HEADS.get(spec)]
    assert (fail["module"], fail["phase"]) in places and fail["overload"] == op, fail
    module, phase = fail["module"], fail["phase"]
    assert fail["source"] == "isolated replay" and fail["verdict"].startswith("fail: ")
    failing = [r for r in result.rows() if r["status"] == "fail"]
    assert all(r["overload"] == op and spec in r["faults"] for r in failing), "only the faulted op may fail"
    message = result.failure_message("tests/x.py::test_block")
    assert op in message and module in message and "x its allowance" in message or "NaN" in message or "Inf" in message
    assert f"--inject-fault {shlex.quote(spec)}" in message
    assert "pytest tests/x.py::test_block --xpu cpu --precision fp32" in message
    assert result.faults[0].fired >= 2, "fired in the device run and in replay"


def test_bf16_fault_is_detected_in_reduced_precision():
    result = check_block("bf16", ["aten.convolution:scale=1.03"])
    assert not result.passed and result.first_failure["overload"] == "aten.convolution.default"


def test_whole_run_shows_error_accumulating_after_the_fault():
    result = check_block("fp32", ["aten.convolution:scale=1.001"])
    rows = result.whole_run.rows
    assert rows[0]["overload"] == "aten.convolution.default" and rows[0]["ratio"] > 100
    later = [r for r in rows[1:] if r["phase"] == "forward" and r["ratio"] is not None]
    assert any(r["ratio"] > 100 for r in later), "downstream ops inherit the error"
    replayed = {r["overload"]: r["status"] for r in result.rows() if r["phase"] == "forward"}
    assert replayed["aten.native_layer_norm.default"] == "pass", "isolated replay does not blame heirs"


def test_fault_on_an_op_that_never_runs_is_reported_not_failed():
    result = check_block("fp32", ["aten.upsample_bilinear2d:nan", "aten.addmm:delay=0.001"])
    assert result.passed
    assert result.never_fired == ["aten.upsample_bilinear2d:nan"]
    assert any("never fired" in n and "aten.upsample_bilinear2d:nan" in n for n in result.notes)
    assert result.faults[1].fired > 0


def test_the_error_model_is_an_argument():
    class Lenient(ErrorModel):
        def allowance(self, *args, **kwargs):
            found = super().allowance(*args, **kwargs)
            found.values = found.values * 1e9
            return found

    result = check_block("fp32", ["aten.convolution:scale=1.001"], model=Lenient(), whole_run=False)
    assert result.replay.passed, result.failure_message()


def test_dropout_is_skipped_in_replay_and_noted():
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.5))

    result = compare_part("dropout", build, FEATURES, lambda m, x: m(x).square().sum(), "cpu", "fp32",
                          whole_run=False)
    skipped = [r for r in result.rows() if r["status"] == "skipped"]
    assert skipped and {r["op"] for r in skipped} <= {"aten.native_dropout", "aten.bernoulli", "aten.bernoulli_"}
    assert "random op" in skipped[0]["verdict"] and any("skipped in replay" in n for n in result.notes)
    assert result.replay.passed


def _run(outputs, grads=()):
    from parity.compare import _Run
    return _Run(outputs, list(grads), None)


def test_a_device_result_with_another_structure_fails_saying_what_is_missing():
    from parity.compare import _end_to_end

    x = torch.randn(4, 3, dtype=torch.float64)
    golden, baseline = _run((x, x.sum())), _run((x.float(), x.sum().float()))
    def verdicts(device):
        return [e.judgement.verdict for e in _end_to_end(lambda: golden, baseline, device, lambda: [])]

    assert verdicts(_run((x.float(), x.sum().float()))) == ["pass: bit-identical to the baseline"] * 2
    kinds = [e.judgement.kind for e in _end_to_end(lambda: golden, baseline, _run((x.float() * 2, x.sum().float())),
                                                   lambda: [])]
    assert kinds == ["ensemble", "identical"], "a differing output is judged, an identical one passes as such"
    assert "the device returned 1 outputs and gradients, the baseline 2" in verdicts(_run((x.float(),)))[0]
    assert "the device returned 3 outputs" in verdicts(_run((x.float(), x.sum().float(), x.float())))[0]
    assert "expected a tensor, the device returned float" in verdicts(_run((x.float(), float(x.sum()))))[1]
    grads_g, grads_b = [("grad w", x), ("grad b", None)], [("grad w", x.float()), ("grad b", None)]
    golden, baseline = _run((), grads_g), _run((), grads_b)
    assert "gradient is None on the device but not on the baseline" in \
        verdicts(_run((), [("grad w", None), ("grad b", None)]))[0]
    assert "gradient is None on the baseline but not on the device" in \
        verdicts(_run((), [("grad w", x.float()), ("grad b", x.float())]))[1]


def test_cpu_alt_runs_the_device_with_other_kernels():
    seen = []

    def spy(model, x):
        seen.append((torch.get_num_threads(), torch.backends.mkldnn.enabled))
        return model(x)

    result = compare_part("block", build_block, IMAGES, spy, "cpu-alt", "fp32", whole_run=False, ensemble_size=1)
    assert result.passed, result.failure_message()
    assert result.device == "cpu-alt" and seen.count((1, False)) == 1, seen
    others = [s for s in seen if s != (1, False)]
    assert torch.backends.mkldnn.enabled and others and all(s[1] for s in others), "references keep the default kernels"

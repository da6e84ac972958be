"""DETR trained under torchrun on the device under test: 1x1 to the target mAP; 1x8 and 2x8 with their
first steps equal to one process on the global batch (DDP equivalence) and all ranks in step. Each run
adds its row (e2e_time, p_whole, p_train, p_core, mAP, mem) to the report and judges its mAP curve
against the reference. Selected with ``-m training`` (and ``1x1``, ``1x8``, ``2x8``)."""
import math

import pytest

TOPOLOGIES = ("1x1", "1x8", "2x8")


@pytest.mark.training
@pytest.mark.parametrize("topology", [pytest.param(t, marks=getattr(pytest.mark, t), id=t) for t in TOPOLOGIES])
def test_training(topology, precision, training_run):
    run = training_run(topology, precision)
    m = run.metrics
    if run.topology.world_size > 1:
        ddp = run.result["ddp_equivalence"]
        failed = [s for s in ddp["steps"] if s["grad_margin"] > 1 or s["param_margin"] > 1]
        assert ddp["checked_steps"] and not failed, (
            f"DDP equivalence fails at step {failed[0]['step']}: the {failed[0]['what']} {failed[0]['tensor']} on rank "
            f"{failed[0]['rank']} is {failed[0]['max_abs']:.3g} from one process on the global batch, "
            f"{max(failed[0]['grad_margin'], failed[0]['param_margin']):.3g} times its tolerance "
            f"{failed[0]['tolerance']:.3g}"
            if failed
            else f"DDP equivalence was not checked: {ddp.get('note')}"
        )
    assert m["p_core"] > m["p_train"] > m["p_whole"] > 0, (
        f"expected p_core > p_train > p_whole, got {m['p_core']:.2f}, {m['p_train']:.2f}, {m['p_whole']:.2f}"
    )
    assert run.row["ranks_agree"], f"ranks ended with different parameters: {run.result['param_digests']}"
    assert run.result["world_size"] == run.topology.world_size
    assert all(math.isfinite(v) for v in run.result["step_losses"]), "a step's loss was not finite"
    if run.bounded:
        return  # no convergence claim: see BOUNDED_CLAIM in fixtures/training.py
    target = run.row["target_mAP"]
    assert run.result["target_reached"], (
        f"mAP {m['mAP']:.4f} (best {m['best_mAP']:.4f}) did not reach the target {target} in {m['steps']} steps, "
        f"{m['e2e_time']:.0f}s"
    )
    assert run.verdict.passed, f"convergence against the reference: {run.verdict.text()}"

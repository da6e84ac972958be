"""DETR trained under torchrun on the device under test: 1x1 to the target mAP, 1x8 and 2x8 with all
ranks in step. Each run adds its row (e2e_time, p_whole, p_train, p_core, mAP, mem) to the report and
judges its mAP curve against the reference. Selected with ``-m training`` (and ``1x1``, ``1x8``, ``2x8``)."""
import pytest

from training.metrics import loss_fell

TOPOLOGIES = ("1x1", "1x8", "2x8")


@pytest.mark.training
@pytest.mark.parametrize("topology", [pytest.param(t, marks=getattr(pytest.mark, t), id=t) for t in TOPOLOGIES])
def test_training(topology, precision, training_run):
    run = training_run(topology, precision)
    m = run.metrics
    assert m["p_core"] > m["p_train"] > m["p_whole"] > 0, f"expected p_core > p_train > p_whole, got {m['p_core']:.2f}, {m['p_train']:.2f}, {m['p_whole']:.2f}"
    assert run.row["ranks_agree"], f"ranks ended with different parameters: {run.result['param_digests']}"
    assert run.result["world_size"] == run.topology.world_size
    if run.bounded:
        fall = loss_fell(run.result["step_losses"])
        assert fall["fell"], f"the loss did not fall over {run.metrics['steps']} steps: first {fall['window']} steps {fall['first']:.3f}, last {fall['last']:.3f}"
    else:
        target = run.row["target_mAP"]
        assert run.result["target_reached"], (
            f"mAP {m['mAP']:.4f} (best {m['best_mAP']:.4f}) did not reach the target {target} in {m['steps']} steps, {m['e2e_time']:.0f}s"
        )
    assert run.verdict.passed, f"convergence against the reference: {run.verdict.text()}"

"""Parity of whole training steps: forward, loss, backward, gradient clipping and AdamW, once and
several times; the parameters after the steps are judged, and every op on the way."""
import pytest
import torch

import detr
from detr.engine import weighted_loss

pytestmark = pytest.mark.parity


def train_steps(num_steps: int):
    def run(model, batch):
        images, targets = batch
        criterion = model.criterion
        optimizer = torch.optim.AdamW(detr.param_groups(model.detr, 1e-4, 1e-5), weight_decay=1e-4)
        for _ in range(num_steps):
            losses = criterion(model.detr(images), targets)
            loss = weighted_loss(losses, criterion.weight_dict)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.detr.parameters(), 0.1)
            optimizer.step()
        return {n: p.detach().clone() for n, p in model.detr.named_parameters() if p.requires_grad}

    return run


class DetrWithCriterion(torch.nn.Module):
    def __init__(self, model, criterion):
        super().__init__()
        self.detr = model
        self.criterion = criterion


def test_train_step(check_part, detr_parts, eval_model, batch, precision):
    images, targets = batch
    module = DetrWithCriterion(eval_model, detr_parts[1])
    result = check_part("train step", module, (list(images), list(targets)), train_steps(1), precision, whole_run=False)
    ops = {row["op"].replace("_foreach_", "") for row in result.rows()}
    # backward, the clipping norm and AdamW's update were all replayed and judged
    assert {"aten.convolution_backward", "aten.addcdiv_"} <= ops and ("aten.norm" in ops or "aten.linalg_vector_norm" in ops)


def test_three_train_steps(check_part, detr_parts, eval_model, batch, precision):
    """The parameters after three steps, judged by the rule; every op of a step is replayed above."""
    images, targets = batch
    module = DetrWithCriterion(eval_model, detr_parts[1])
    result = check_part("train 3 steps", module, (list(images), list(targets)), train_steps(3), precision,
                        whole_run=False, replay_ops=False)
    judged = {e["name"] for e in result.to_dict()["end_to_end"]}
    trainable = {n for n, p in eval_model.named_parameters() if p.requires_grad}
    assert {f"output['{n}']" for n in trainable} <= judged

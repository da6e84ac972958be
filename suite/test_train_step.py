"""Parity of whole training steps: forward, loss, backward, gradient clipping and AdamW, once and
several times; the parameters after the steps are judged, and every op on the way."""
import pytest
import torch

import detr

pytestmark = pytest.mark.parity


def train_steps(num_steps: int):
    def run(model, batch):
        images, targets = batch
        criterion = model.criterion
        optimizer = torch.optim.AdamW(detr.param_groups(model.detr, 1e-4, 1e-5), weight_decay=1e-4)
        for _ in range(num_steps):
            losses = criterion(model.detr(images), targets)
            loss = sum(losses[k] * w for k, w in criterion.weight_dict.items())
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


@pytest.mark.parametrize("num_steps", [1, 2], ids=["1-step", "2-steps"])
def test_train_steps(check_part, detr_parts, eval_model, batch, precision, num_steps):
    images, targets = batch
    module = DetrWithCriterion(eval_model, detr_parts[1])
    result = check_part(f"train {num_steps} step(s)", module, (list(images), list(targets)), train_steps(num_steps),
                        precision, whole_run=False)
    ops = {row["op"].replace("_foreach_", "") for row in result.rows()}
    # backward, the clipping norm and AdamW's update were all replayed and judged
    assert {"aten.convolution_backward", "aten.addcdiv_"} <= ops and ("aten.norm" in ops or "aten.linalg_vector_norm" in ops)

"""SetCriterion: the reference's loss names, invariance under target order, perfect predictions."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detr
from detr.criterion import SetCriterion
from detr.matcher import HungarianMatcher

NUM_CLASSES = 7


def criterion(aux=True):
    weight_dict = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    return SetCriterion(NUM_CLASSES, HungarianMatcher(1, 5, 2), weight_dict, 0.1, ["labels", "boxes", "cardinality"])


def outputs_and_targets(seed, sizes, num_queries=6, aux_layers=2):
    g = torch.Generator().manual_seed(seed)

    def pred():
        return {
            "pred_logits": torch.randn(len(sizes), num_queries, NUM_CLASSES + 1, generator=g, dtype=torch.float64),
            "pred_boxes": (0.3 + 0.4 * torch.rand(len(sizes), num_queries, 4, generator=g, dtype=torch.float64)),
        }

    outputs = pred()
    outputs["aux_outputs"] = [pred() for _ in range(aux_layers)]
    targets = [
        {"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
         "boxes": 0.3 + 0.4 * torch.rand(n, 4, generator=g, dtype=torch.float64)}
        for n in sizes
    ]
    return outputs, targets


def test_loss_names_match_the_reference():
    outputs, targets = outputs_and_targets(0, [2, 3])
    losses = criterion()(outputs, targets)
    expected = {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}
    for i in range(2):
        expected |= {f"loss_ce_{i}", f"loss_bbox_{i}", f"loss_giou_{i}", f"cardinality_error_{i}"}
    assert set(losses) == expected
    assert all(v.ndim == 0 and math.isfinite(v.item()) for v in losses.values())


def test_classification_loss_by_hand():
    c = criterion()
    logits = torch.zeros(1, 2, NUM_CLASSES + 1, dtype=torch.float64)
    logits[0, 0, 3] = 2.0
    outputs = {
        "pred_logits": logits,
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]], dtype=torch.float64),
    }
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)}]
    losses = c(outputs, targets)
    logp = logits.log_softmax(-1)
    # query 0 matched to class 3 (weight 1), query 1 "no object" (weight eos_coef 0.1)
    expected = -(logp[0, 0, 3] * 1 + logp[0, 1, NUM_CLASSES] * 0.1) / 1.1
    torch.testing.assert_close(losses["loss_ce"], expected)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(0.0, dtype=torch.float64))
    assert losses["class_error"].item() == 0
    assert losses["cardinality_error"].item() == 1  # both queries predict an object, one exists


@settings(max_examples=25)
@given(st.integers(0, 10_000), st.lists(st.integers(0, 5), min_size=1, max_size=3), st.randoms(use_true_random=False))
def test_losses_do_not_depend_on_target_order(seed, sizes, rnd):
    outputs, targets = outputs_and_targets(seed, sizes)
    permuted = []
    for t in targets:
        order = list(range(len(t["labels"])))
        rnd.shuffle(order)
        permuted.append({k: v[order] for k, v in t.items()})
    a, b = criterion()(outputs, targets), criterion()(outputs, permuted)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_perfect_predictions_have_near_zero_box_losses():
    outputs, targets = outputs_and_targets(5, [3, 2])
    for b, t in enumerate(targets):
        n = len(t["labels"])
        outputs["pred_boxes"][b, :n] = t["boxes"]
        outputs["pred_logits"][b] = -20.0
        outputs["pred_logits"][b, :n, :].scatter_(1, t["labels"][:, None], 20.0)
        outputs["pred_logits"][b, n:, NUM_CLASSES] = 20.0
    losses = criterion()(outputs, targets)
    assert losses["loss_bbox"] < 1e-12 and losses["loss_giou"] < 1e-12
    assert losses["loss_ce"] < 1e-12 and losses["class_error"] == 0 and losses["cardinality_error"] == 0


def test_empty_targets_give_finite_losses_and_gradients():
    outputs, targets = outputs_and_targets(6, [0, 0])
    outputs["pred_logits"].requires_grad_(True)
    losses = criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == 0 and losses["class_error"].item() == 100  # accuracy of nothing is 0
    total = sum(losses[k] * w for k, w in criterion().weight_dict.items())
    total.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_num_boxes_is_clamped_to_one():
    c = criterion()
    assert c.num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1
    assert c.num_boxes([{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}], torch.device("cpu")) == 5


def test_tiny_model_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model, crit, _ = detr.build("tiny", dropout=0.0)
    images = [torch.randn(3, 96, 96), torch.randn(3, 64, 128)]
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.6, 0.4, 0.2, 0.5]])}]
    losses = crit(model(images), targets)
    sum(losses[k] * w for k, w in crit.weight_dict.items()).backward()
    missing = {
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    }
    # The decoder starts from zeros: its first self-attention sees zero values, so its output is
    # its bias alone and these weights get no gradient, in the reference as here.
    first = "transformer.decoder.layers.0."
    assert missing == {first + "self_attn.in_proj_weight", first + "self_attn.out_proj.weight", first + "norm1.weight"}

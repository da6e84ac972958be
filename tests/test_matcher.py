"""The Hungarian matcher: cost formula, optimality against brute force, empty targets, batching."""
import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detr.matcher import HungarianMatcher
from tests.test_box_ops import naive_giou

NUM_CLASSES = 5


def random_problem(seed, num_queries, sizes):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(sizes), num_queries, NUM_CLASSES + 1, generator=g, dtype=torch.float64),
        "pred_boxes": 0.2
        + 0.6
        * torch.rand(len(sizes), num_queries, 4, generator=g, dtype=torch.float64)
        * torch.tensor([1, 1, 0.5, 0.5], dtype=torch.float64),
    }
    targets = [
        {
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "boxes": 0.2
            + 0.6
            * torch.rand(n, 4, generator=g, dtype=torch.float64)
            * torch.tensor([1, 1, 0.5, 0.5], dtype=torch.float64),
        }
        for n in sizes
    ]
    return outputs, targets


def naive_cost(prob, box, label, tgt_box):
    cx, cy, w, h = box.tolist()
    tx, ty, tw, th = tgt_box.tolist()
    l1 = abs(cx - tx) + abs(cy - ty) + abs(w - tw) + abs(h - th)
    a = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    b = [tx - tw / 2, ty - th / 2, tx + tw / 2, ty + th / 2]
    return 5 * l1 - 1 * prob[label].item() - 2 * naive_giou(a, b)


def test_cost_matrix_matches_the_formula():
    outputs, targets = random_problem(0, 4, [3, 2])
    matcher = HungarianMatcher(1, 5, 2)
    cost = matcher.cost_matrix(outputs, targets)
    assert cost.shape == (2, 4, 5)
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    for b in range(2):
        prob = outputs["pred_logits"][b].softmax(-1)
        for q in range(4):
            for j in range(5):
                expected = naive_cost(prob[q], outputs["pred_boxes"][b, q], labels[j], boxes[j])
                assert abs(cost[b, q, j].item() - expected) < 1e-9


def brute_force_optimum(cost):
    q, t = cost.shape
    return min(sum(cost[p[j], j].item() for j in range(t)) for p in itertools.permutations(range(q), t))


@settings(max_examples=40)
@given(st.integers(0, 10_000), st.integers(1, 5), st.lists(st.integers(0, 4), min_size=1, max_size=3))
def test_assignment_is_optimal(seed, num_queries, sizes):
    sizes = [min(s, num_queries) for s in sizes]
    outputs, targets = random_problem(seed, num_queries, sizes)
    matcher = HungarianMatcher(1, 5, 2)
    indices = matcher(outputs, targets)
    cost = matcher.cost_matrix(outputs, targets)
    offsets = [0] + list(itertools.accumulate(sizes))
    for b, (i, j) in enumerate(indices):
        assert i.dtype == j.dtype == torch.int64
        assert len(i) == len(j) == sizes[b]
        assert len(set(i.tolist())) == len(i) and sorted(j.tolist()) == list(range(sizes[b]))
        block = cost[b, :, offsets[b] : offsets[b + 1]]
        achieved = block[i, j].sum().item()
        assert abs(achieved - brute_force_optimum(block)) < 1e-9


def test_empty_targets_give_empty_indices():
    outputs, targets = random_problem(1, 4, [0, 2])
    indices = HungarianMatcher(1, 5, 2)(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert len(indices[1][0]) == 2
    outputs, targets = random_problem(1, 4, [0, 0])
    assert all(len(i) == 0 for i, _ in HungarianMatcher(1, 5, 2)(outputs, targets))


def test_batch_matches_each_image_alone():
    outputs, targets = random_problem(2, 6, [3, 1, 4])
    matcher = HungarianMatcher(1, 5, 2)
    together = matcher(outputs, targets)
    for b in range(3):
        alone = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert together[b][0].tolist() == alone[0].tolist() and together[b][1].tolist() == alone[1].tolist()


def test_match_many_equals_separate_calls():
    matcher = HungarianMatcher(1, 5, 2)
    layers = [random_problem(s, 5, [2, 3])[0] for s in range(3)]
    _, targets = random_problem(0, 5, [2, 3])
    many = matcher.match_many(layers, targets)
    for layer, result in zip(layers, many):
        single = matcher(layer, targets)
        assert [(i.tolist(), j.tolist()) for i, j in result] == [(i.tolist(), j.tolist()) for i, j in single]


def test_non_finite_predictions_are_named():
    outputs, targets = random_problem(3, 4, [2])
    outputs["pred_logits"][0, 1, 2] = float("nan")
    try:
        HungarianMatcher(1, 5, 2)(outputs, targets)
    except ValueError as exc:
        assert "NaN or Inf" in str(exc) and "pred_logits" in str(exc)
    else:
        raise AssertionError("NaN logits must raise")

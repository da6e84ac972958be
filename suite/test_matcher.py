"""Matcher parity: the cost matrix op by op, and the device's assignment judged by its cost under
the golden (float64 CPU) cost matrix, so that ties cannot fail a correct device. The cost matrix
part is declared in fixtures/parts.py."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fixtures import parts

pytestmark = pytest.mark.parity

# Total golden cost of the device's assignment may exceed the golden optimum by this share of the
# optimum's magnitude (plus an absolute floor): rounding-level, far below a wrong assignment.
COST_RTOL = 1e-5
COST_ATOL = 1e-6


@pytest.fixture(scope="module")
def predictions(eval_model, batch):
    return parts.predictions(eval_model, batch[0])


test_cost_matrix = parts.part_test("matcher cost")


def assignment_cost(cost: torch.Tensor, rows, cols) -> float:
    return float(cost[torch.as_tensor(rows), torch.as_tensor(cols)].sum())


def test_assignment_is_optimal_under_the_golden_cost(detr_parts, predictions, batch, xpu, precision):
    if precision != "fp32":
        pytest.skip("the assignment is judged once, in fp32; the cost matrix covers the other precisions")
    matcher = detr_parts[1].matcher
    targets = list(batch[1])
    golden = matcher.cost_matrix({k: v.double() for k, v in predictions.items()},
                                 [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in targets])
    device_cost = matcher.cost_matrix({k: v.to(xpu.device) for k, v in predictions.items()},
                                      [{k: v.to(xpu.device) for k, v in t.items()} for t in targets]).cpu()
    sizes = [len(t["boxes"]) for t in targets]
    for b, (golden_block, device_block) in enumerate(zip(golden.split(sizes, -1), device_cost.split(sizes, -1))):
        g_rows, g_cols = linear_sum_assignment(golden_block[b].numpy())
        d_rows, d_cols = linear_sum_assignment(device_block[b].double().numpy())
        optimum = assignment_cost(golden_block[b], g_rows, g_cols)
        achieved = assignment_cost(golden_block[b], d_rows, d_cols)
        tolerance = COST_ATOL + COST_RTOL * abs(optimum)
        assert achieved - optimum <= tolerance, (
            f"image {b}: the device's assignment costs {achieved:.9g} under the golden cost, "
            f"the optimum is {optimum:.9g} (tolerance {tolerance:.2g}); device pairs {list(zip(d_rows, d_cols))}, "
            f"golden pairs {list(zip(g_rows, g_cols))}"
        )
        if second_best(golden_block[b], g_rows, g_cols) - optimum > tolerance:
            # No near-tie: the optimal assignment is unique beyond rounding, so it must be this one.
            assert (list(d_rows), list(d_cols)) == (list(g_rows), list(g_cols)), f"image {b}: assignment differs"


def second_best(cost: torch.Tensor, rows, cols) -> float:
    """The cheapest assignment other than (rows, cols): it must leave out one of its pairs."""
    best = float("inf")
    for i, j in zip(rows, cols):
        forbidden = cost.clone()
        forbidden[i, j] = float(cost.abs().max()) * 1e6 + 1
        r, c = linear_sum_assignment(forbidden.numpy())
        best = min(best, assignment_cost(cost, r, c))
    return best

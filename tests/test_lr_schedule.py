"""The learning-rate schedules, one factor per step: the reference's 10x drops, and the linear cool-down."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detr import linear_decay, step_decay

plans = st.integers(0, 500).flatmap(lambda warmup: st.integers(warmup, 5000).flatmap(
    lambda start: st.tuples(st.just(warmup), st.just(start), st.integers(start + 1, start + 5000))))


@settings(max_examples=200, deadline=None)
@given(plans)
def test_the_rate_rises_holds_and_falls_to_zero_at_the_last_step(plan):
    warmup, start, end = plan
    factors = [linear_decay(done, warmup, start, end) for done in range(end + 1)]
    assert all(0.0 <= f <= 1.0 for f in factors)
    assert factors[-1] == 0.0 and factors[end - 1] > 0.0  # every step of the run trains
    after_warmup = factors[warmup:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    assert all(a <= b for a, b in zip(factors[:warmup], factors[1:warmup + 1]))
    if warmup < start:
        assert factors[warmup:start] == [1.0] * (start - warmup)


def test_the_cool_down_is_linear_and_the_warm_up_scales_it():
    assert [linear_decay(d, 0, 4, 8) for d in range(4, 9)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert linear_decay(0, 10, 4, 8) == 0.1 and linear_decay(5, 10, 4, 8) == 0.6 * 0.75


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(1, 1000), st.integers(0, 5000))
def test_the_step_schedule_drops_10x_every_n_steps_and_a_drop_in_the_warm_up_holds(warmup, every, done):
    warm = min(1.0, (done + 1) / warmup) if warmup else 1.0
    assert step_decay(done, warmup, every) == warm * 0.1 ** (done // every)
    if done >= every:
        assert step_decay(done, warmup, every) < warm  # the warm-up does not undo a drop


def test_without_warm_up_the_step_schedule_is_pytorch_s_step_lr_counted_in_steps():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    for done in range(30):
        assert step_decay(done, 0, 7) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        reference.step()

"""Parity of whole training steps of the reference recipe (detr.engine.train_step): forward, loss,
backward, gradient clipping and AdamW, once op by op, and the parameters after three steps. The
parts are declared in fixtures/parts.py."""
import pytest

from fixtures.parts import part_test

pytestmark = pytest.mark.parity

test_train_step = part_test("train step")
test_three_train_steps = part_test("train 3 steps")

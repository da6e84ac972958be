"""Position encoding parity: the sine encoding of the padded feature map (the reference's choice)
and the learned row/column embeddings, forward and backward. The parts are declared in
fixtures/parts.py."""
import pytest

from fixtures.parts import part_test

pytestmark = pytest.mark.parity

test_sine_position_encoding = part_test("position encoding (sine)")
test_learned_position_encoding = part_test("position encoding (learned)")

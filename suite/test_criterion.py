"""Criterion parity: every loss term (and its aux copies) and the gradients with respect to the
predictions, with the Hungarian matching inside, as in training. The part is declared in
fixtures/parts.py."""
import pytest

from fixtures.parts import part_test

pytestmark = pytest.mark.parity

test_criterion = part_test("criterion")

"""Transformer parity: encoder and decoder with the padding mask, positions on queries and keys,
and all intermediate decoder outputs, forward and backward. The part is declared in
fixtures/parts.py."""
import pytest

from fixtures.parts import part_test

pytestmark = pytest.mark.parity

test_transformer = part_test("transformer")

"""Backbone parity: the frozen-BN ResNet and its padding masks, forward, input gradients and the
gradients of the trained layers (layer2-4). The part is declared in fixtures/parts.py."""
import pytest

from fixtures.parts import part_test

pytestmark = pytest.mark.parity

test_backbone = part_test("backbone")

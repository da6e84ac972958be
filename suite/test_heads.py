"""Parity of the class and box heads (forward and backward), the full model's forward from images
to predictions, and PostProcess. The parts are declared in fixtures/parts.py."""
import pytest

from fixtures.parts import part_test

pytestmark = pytest.mark.parity

test_heads = part_test("heads")
test_model_forward = part_test("model forward")
test_postprocess = part_test("postprocess")

"""The compatibility module: where a private API is missing the suite falls back, warns once, and
records it for the reports."""
import warnings

import pytest
import torch

from detr import compat


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(compat, "_FALLBACKS", {})


def test_named_leaves_by_path_or_by_position(fresh, monkeypatch):
    tree = {"pred_logits": torch.zeros(1), "aux": [torch.ones(1)]}
    assert [n for n, _ in compat.named_leaves(tree)] == ["output['pred_logits']", "output['aux'][0]"]
    assert compat.fallbacks() == {}
    monkeypatch.delattr(compat.pytree, "tree_flatten_with_path")
    with pytest.warns(RuntimeWarning, match="tree_flatten_with_path is missing"):
        assert [n for n, _ in compat.named_leaves(tree)] == ["output[0]", "output[1]"]
    assert "outputs are named by position" in compat.fallbacks()["torch.utils._pytree.tree_flatten_with_path"]


def test_missing_autograd_node_falls_back_once(fresh, monkeypatch):
    monkeypatch.delattr(torch._C, "_current_autograd_node")
    with pytest.warns(RuntimeWarning):
        assert compat.current_autograd_node() is None
    assert compat.current_autograd_node() is None  # warned once, recorded once
    assert list(compat.fallbacks()) == ["torch._C._current_autograd_node"]


def test_present_apis_take_no_fallback(fresh):
    with compat.disable_current_modes():
        pass
    assert compat.current_autograd_node() is None  # not in backward
    assert compat.privateuse1_backend_name() == torch._C._get_privateuse1_backend_name()
    assert compat.fallbacks() == {}


def test_cuda_driver_version_is_a_number_with_or_without_the_api(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        version = compat.cuda_driver_api_version()
    assert isinstance(version, int) and version >= 0
    assert (version > 0) or not torch.cuda.is_available() or compat.fallbacks()

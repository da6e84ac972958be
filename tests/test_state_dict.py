"""``detr.build("r50")`` against the reference DETR-R50 state_dict key file.

The key file (``tests/data/detr_r50_state_dict.txt``: key, shape and dtype of every entry of an official
DETR-R50 checkpoint's ``"model"``) ships with the repository, so a missing file is a failure, not a skip."""
from pathlib import Path

import pytest
import torch

import detr

KEY_FILE = Path(__file__).resolve().parent / "data" / "detr_r50_state_dict.txt"


@pytest.fixture(scope="module")
def reference_keys():
    assert KEY_FILE.is_file(), (
        f"the reference key file {KEY_FILE} is missing: it ships with the repository (tests/data/); restore it")
    keys = {}
    for line in KEY_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        keys[name] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype)
    assert keys, f"the reference key file {KEY_FILE} holds no keys"
    return keys


@pytest.fixture(scope="module")
def r50():
    return detr.build("r50")[0]


def test_keys_and_shapes_match(r50, reference_keys):
    state = r50.state_dict()
    assert sorted(set(state) - set(reference_keys)) == []
    assert sorted(set(reference_keys) - set(state)) == []
    wrong = {k: (tuple(state[k].shape), s) for k, (s, _) in reference_keys.items() if tuple(state[k].shape) != s}
    assert wrong == {}
    assert {str(v.dtype).replace("torch.", "") for v in state.values()} == {d for _, d in reference_keys.values()}


def test_an_official_checkpoint_loads_strictly(r50, reference_keys):
    g = torch.Generator().manual_seed(0)
    official = {"model": {k: torch.randn(s, generator=g) for k, (s, _) in reference_keys.items()}}
    r50.load_state_dict(official["model"], strict=True)
    torch.testing.assert_close(r50.class_embed.bias, official["model"]["class_embed.bias"])


def test_batch_norm_counters_are_dropped_when_loading(r50, reference_keys):
    state = {k: v.clone() for k, v in r50.state_dict().items()}
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    r50.load_state_dict(state, strict=True)

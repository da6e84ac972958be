"""The registry of DETR parts (fixtures/parts.py) is what the suite runs and what the README shows."""
import importlib
from pathlib import Path

import pytest

from fixtures.parts import PARTS, parts_table

ROOT = Path(__file__).resolve().parents[1]


def readme_parts_table() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(parts_table().splitlines()[0])
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_readme_parts_table_is_the_registry():
    assert readme_parts_table() == parts_table(), (
        "README.md's table of parts is stale: paste `python -m fixtures.parts`"
    )


@pytest.mark.parametrize("name", list(PARTS))
def test_every_part_has_its_suite_test(name):
    part = PARTS[name]
    module = importlib.import_module(part.file[:-len(".py")].replace("/", "."))
    test = getattr(module, part.function, None)
    assert test is not None, f"{part.file} has no {part.function} for the part {name!r}"
    assert getattr(test, "part", None) is part, f"{part.test} does not check the part {name!r}"


def test_suite_checks_parts_only_through_the_registry():
    for path in sorted((ROOT / "suite").glob("test_*.py")):
        assert "check_part(" not in path.read_text(), (
            f"{path.name} calls check_part itself: declare the part in fixtures/parts.py"
        )


def test_part_names_and_tests_are_unique():
    assert len({p.test for p in PARTS.values()}) == len(PARTS)


@pytest.mark.parametrize("images", [1, 3])
def test_every_part_builds_and_runs_on_a_batch_of_any_size(images):
    """--batch-size N: one image has no padding (no mask to judge), three repeat the sizes."""
    import torch

    import detr
    from fixtures.models import make_batch

    torch.manual_seed(0)
    model, criterion, postprocess = detr.build("tiny")
    batch = make_batch(images, ((96, 64), (64, 96)))
    for name, part in PARTS.items():
        module, inputs = part.build((model.eval(), criterion, postprocess), batch)
        assert part.run(module, inputs) is not None, name

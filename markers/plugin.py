"""Command-line options of the suite, their validation (bad values are usage errors, exit 4),
and the hooks that apply markers."""
import os
import re
from pathlib import Path

import pytest

from parity.device import DeviceError, import_plugins, resolve_device
from parity.faults import parse_faults

MODEL_CONFIGS = ("r50", "tiny")
PRECISIONS = ("fp32", "tf32", "amp", "fp16", "bf16")
SUITE_DIR = Path(__file__).resolve().parent.parent / "suite"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("detr", "DETR accelerator conformance")
    group.addoption("--xpu", default="auto", help="device under test: auto (default), cpu, cuda, cuda:1, xpu, npu:0, ...")
    group.addoption("--xpu-plugin", action="append", default=[], metavar="MODULE",
                    help="import a vendor extension first (torch_xmlir, torch_npu, torch_mlu, torch_musa, ...); repeatable")
    group.addoption("--precision", default="fp32", help=f"comma-separated precisions under test: {', '.join(PRECISIONS)} (default fp32)")
    group.addoption("--model-config", default="r50", help=f"DETR configuration: {' or '.join(MODEL_CONFIGS)} (default r50)")
    group.addoption("--coco-path", default=None, help="COCO 2017 folder (train2017/, val2017/, annotations/); default: the generated synthetic set")
    group.addoption("--report-dir", default="reports", help="folder for JSON, Markdown and PNG reports (default reports/)")
    group.addoption("--inject-fault", action="append", default=[], metavar="SPEC", dest="inject_fault",
                    help="perturb an aten op on the device under test only: <aten op>[.<overload>]:<kind>[=<value>], "
                         "kinds noise, offset, scale, round=bf16|fp16|tf32, nan, inf, zero, delay; repeatable")
    group.addoption("--parity-bound", type=float, default=None, metavar="RATIO",
                    help="error-ratio bound of the parity rule (default: ini parity_bound, else 2 for fp32, 3 otherwise)")
    parser.addini("parity_bound", "error-ratio bound of the parity rule for every precision (empty: 2 for fp32, 3 otherwise)", default="")


def parse_precisions(value: str):
    names = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if not names or bad:
        raise pytest.UsageError(f"--precision {value!r}: expected a comma-separated list of {', '.join(PRECISIONS)}")
    return names


def registered_markers(config: pytest.Config) -> set:
    return {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}


def check_mark_expression(config: pytest.Config) -> None:
    """A marker name in ``-m`` that nobody registered selects nothing, silently: say so instead."""
    expression = config.getoption("markexpr") or ""
    names = set(re.findall(r"[A-Za-z0-9_]+", expression)) - {"and", "or", "not", "True", "False"}
    unknown = sorted(names - registered_markers(config))
    if unknown:
        raise pytest.UsageError(
            f"-m {expression!r}: unknown marker(s) {', '.join(unknown)}; registered: {', '.join(sorted(registered_markers(config)))}"
        )


def pytest_sessionstart(session: pytest.Session) -> None:
    # After every plugin's pytest_configure, so that the markers they register are known.
    check_mark_expression(session.config)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--model-config") not in MODEL_CONFIGS:
        raise pytest.UsageError(f"--model-config {config.getoption('--model-config')!r}: expected {' or '.join(MODEL_CONFIGS)}")
    config.detr_precisions = parse_precisions(config.getoption("--precision"))
    try:
        config.detr_faults = [f.spec for f in parse_faults(config.getoption("inject_fault"))]
    except ValueError as exc:
        raise pytest.UsageError(f"--inject-fault: {exc}") from None
    bound = config.getoption("--parity-bound")
    if bound is None and config.getini("parity_bound"):
        try:
            bound = float(config.getini("parity_bound"))
        except ValueError:
            raise pytest.UsageError(f"ini parity_bound {config.getini('parity_bound')!r}: expected a number") from None
    if bound is not None and not bound >= 1:
        raise pytest.UsageError(f"parity bound {bound}: expected a ratio >= 1")
    config.detr_parity_bound = bound
    coco_path = config.getoption("--coco-path")
    if coco_path is not None and not os.path.isdir(coco_path):
        raise pytest.UsageError(f"--coco-path {coco_path!r}: no such folder (expected train2017/, val2017/, annotations/)")
    try:
        import_plugins(config.getoption("--xpu-plugin"))
        config.detr_device = resolve_device(config.getoption("--xpu"))
    except DeviceError as exc:
        raise pytest.UsageError(str(exc)) from None


TRAINING_MARKERS = {"training", "1x1", "1x8", "2x8"}


def names_training(expression: str) -> bool:
    return bool(TRAINING_MARKERS & set(re.findall(r"[A-Za-z0-9_]+", expression or "")))


def pytest_collection_modifyitems(config: pytest.Config, items) -> None:
    """Every conformance test under suite/ checks the device under test: it is marked ``xpu``.

    Training tests run for many minutes: they are deselected unless ``-m`` names ``training`` or a
    topology, so that ``pytest -m xpu`` stays the few-minute parity and benchmark run.
    """
    for item in items:
        if SUITE_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.xpu)
    if names_training(config.getoption("markexpr")):
        return
    training = [item for item in items if item.get_closest_marker("training")]
    if training:
        config.hook.pytest_deselected(items=training)
        items[:] = [item for item in items if not item.get_closest_marker("training")]


def pytest_report_header(config: pytest.Config):
    return f"device under test: {config.detr_device} (--xpu {config.getoption('--xpu')}); precision: {','.join(config.detr_precisions)}; model: {config.getoption('--model-config')}"

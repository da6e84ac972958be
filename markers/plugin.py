"""Command-line options of the suite, their validation (bad values are usage errors, exit 4),
and the hooks that apply markers."""
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from parity.device import VARIANTS, DeviceError, import_plugins, resolve
from parity.faults import parse_faults

MODEL_CONFIGS = ("r50", "tiny")
PRECISIONS = ("fp32", "tf32", "amp", "fp16", "bf16")
SUITE_DIR = Path(__file__).resolve().parent.parent / "suite"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("detr", "DETR accelerator conformance")
    group.addoption("--xpu", default="auto", help="device under test: auto (default), cpu, cuda, cuda:1, xpu, npu:0, ..., "
                                                  f"or {', '.join(VARIANTS)} (the CPU with other real kernels)")
    group.addoption("--xpu-plugin", action="append", default=[], metavar="MODULE",
                    help="import a vendor extension first (torch_xmlir, torch_npu, torch_mlu, torch_musa, ...); repeatable")
    group.addoption("--precision", default="fp32", help=f"comma-separated precisions under test: {', '.join(PRECISIONS)} (default fp32)")
    group.addoption("--model-config", default="r50", help=f"DETR configuration: {' or '.join(MODEL_CONFIGS)} (default r50)")
    group.addoption("--coco-path", default=None, help="COCO 2017 folder (train2017/, val2017/, annotations/); default: the generated synthetic set")
    group.addoption("--report-dir", default="reports", help="folder for JSON, Markdown and PNG reports (default reports/)")
    group.addoption("--inject-fault", action="append", default=[], metavar="SPEC", dest="inject_fault",
                    help="perturb an aten op on the device under test only: <aten op>[.<overload>]:<kind>[=<value>], "
                         "kinds noise, offset, scale, round=bf16|fp16|tf32, nan, inf, zero, delay; repeatable")


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
        config.detr_fault_fired = Counter({spec: 0 for spec in config.detr_faults})
    except ValueError as exc:
        raise pytest.UsageError(f"--inject-fault: {exc}") from None
    coco_path = config.getoption("--coco-path")
    config.detr_coco_batch = None
    if coco_path is not None and not os.path.isdir(coco_path):
        raise pytest.UsageError(f"--coco-path {coco_path!r}: no such folder (expected train2017/, val2017/, annotations/)")
    if coco_path is not None:
        # checked before any test runs: the parity batch's images decode, their annotations load
        from detr import get_config
        from detr.data.coco import DatasetError
        from fixtures.data import coco_parity_batch

        try:
            config.detr_coco_batch = coco_parity_batch(coco_path, get_config(config.getoption("--model-config")).num_classes)
        except DatasetError as exc:
            raise pytest.UsageError(f"--coco-path {coco_path}: {exc}") from None
    try:
        import_plugins(config.getoption("--xpu-plugin"))
        config.detr_xpu = resolve(config.getoption("--xpu"))
        config.detr_device = config.detr_xpu.device
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
    return f"device under test: {config.detr_xpu.label} (--xpu {config.getoption('--xpu')}); precision: {','.join(config.detr_precisions)}; model: {config.getoption('--model-config')}"


def faults_never_fired(config: pytest.Config) -> list:
    """The ``--inject-fault`` specs that no selected test fired (tests add to ``detr_fault_fired``)."""
    fired = getattr(config, "detr_fault_fired", Counter())
    return [spec for spec in getattr(config, "detr_faults", []) if not fired[spec]]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    """A fault that fired nowhere proves nothing: a typo, or an op that the selected tests never
    run. That fails the session instead of passing silently."""
    if session.testscollected and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) \
            and faults_never_fired(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    missed = faults_never_fired(config)
    if missed and terminalreporter._session.testscollected:
        terminalreporter.section("injected faults", red=True)
        for spec in missed:
            terminalreporter.write_line(f"ERROR: --inject-fault {spec!r} never fired: no selected test ran an op "
                                        "that matches it", red=True)

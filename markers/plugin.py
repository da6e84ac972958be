"""The suite's pytest hooks, one implementation of each: options and their validation (bad values
are usage errors, exit 4), the session's state, markers, expectations, and the reports and
terminal summary at the end."""
import gc
import os
import re
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest

from markers import options, pytest_compat
from markers.expectations import EXPECTED, Expectations, ExpectationsError
from markers.hookspec import HookFailed, call_each
from markers.options import MODEL_CONFIGS
from markers.state import STATE, SuiteState, state, state_or_none
from parity.compiled import is_graph_fault, split_faults
from parity.faults import parse_faults
from parity.report import summary_lines, write_report
from runtime import compat
from runtime.device import REPLACED, DeviceError, import_plugins, register_backend, resolve
from runtime.precision import PRECISIONS, parse_precision_names
from training import report as training_report

SUITE_DIR = Path(__file__).resolve().parent.parent / "suite"
# Declared by the plugin, not pytest.ini, so that an installed suite has them wherever it runs.
MARKERS = {
    "xpu": "checks the device under test (--xpu) against the CPU",
    "parity": "op-by-op numerical parity of a DETR part against the CPU",
    "benchmark": "timed with pytest-benchmark",
    "training": "trains DETR to a target mAP (long; deselected unless -m names it)",
    "1x1": "training on one node with one device",
    "1x8": "training on one node with eight devices",
    "2x8": "training on two nodes with eight devices each",
}


def pytest_addhooks(pluginmanager) -> None:
    from markers import hookspec

    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args) -> None:
    # Only reached before the conftests load when the suite is installed (its pytest11 entry point).
    pytest_compat.reroot(early_config, args)


def parse_precisions(value: str):
    try:
        return parse_precision_names(value)
    except ValueError:
        raise pytest.UsageError(
            f"--precision {value!r}: expected a comma-separated list of {', '.join(PRECISIONS)}"
        ) from None


def registered_markers(config: pytest.Config) -> set:
    return {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}


def check_mark_expression(config: pytest.Config) -> None:
    """A marker name in ``-m`` that nobody registered selects nothing, silently: say so instead."""
    expression = config.getoption("markexpr") or ""
    names = set(re.findall(r"[A-Za-z0-9_]+", expression)) - {"and", "or", "not", "True", "False"}
    unknown = sorted(names - registered_markers(config))
    if unknown:
        raise pytest.UsageError(
            f"-m {expression!r}: unknown marker(s) {', '.join(unknown)}; "
            f"registered: {', '.join(sorted(registered_markers(config)))}"
        )


def pytest_sessionstart(session: pytest.Session) -> None:
    # After every plugin's pytest_configure, so that the markers they register are known, and
    # pytest-benchmark has loaded the saved run to compare against.
    check_mark_expression(session.config)
    bench = pytest_compat.benchmark_session(session.config)
    strict = session.config.getoption("--benchmark-compare-unmatched") == "error"
    if bench is not None and (bench.compare or bench.compare_fail) and not bench.compared_mapping \
            and (bench.compare_fail or strict):
        option = "--benchmark-compare-fail" if bench.compare_fail else "--benchmark-compare"
        raise pytest.UsageError(f"{option}: no saved run to compare against could be loaded from {bench.storage} "
                                f"(--benchmark-compare {bench.compare if bench.compare is not True else ''}: none "
                                "saved, or not valid JSON, as a warning above then says): the comparison would "
                                "check nothing")


def unmatched_comparison(config: pytest.Config) -> Optional[str]:
    """What a ``--benchmark-compare`` that matched none of this run's benchmarks says, or None."""
    bench = pytest_compat.benchmark_session(config)
    if bench is None or not bench.compared_mapping or not bench.benchmarks:
        return None
    saved = {name for mapping in bench.compared_mapping.values() for name in mapping}
    now = {b.fullname for b in bench.benchmarks if b}
    if not now or saved & now:
        return None
    return (f"--benchmark-compare matched none of this run's benchmarks, so nothing was compared; the saved run "
            f"holds {', '.join(sorted(saved))}; this run has {', '.join(sorted(now))}")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    if config.getoption("--model-config") not in MODEL_CONFIGS:
        raise pytest.UsageError(f"--model-config {config.getoption('--model-config')!r}: "
                                f"expected {' or '.join(MODEL_CONFIGS)}")
    precisions = parse_precisions(config.getoption("--precision"))
    faults = checked_faults(config)
    options.check_report_dir(config.getoption("--report-dir"))
    images, size = options.parity_batch_options(config)
    coco_batch = check_coco_path(config, images, size)
    xpu = device_under_test(config)
    options.check_training_options(config)
    spec = options.compile_spec(config, vendor_compiler(config))
    if spec is None and any(is_graph_fault(f) for f in faults):
        raise pytest.UsageError("--inject-fault compiled.*: a graph fault needs --compile BACKEND")
    config.stash[STATE] = SuiteState(xpu=xpu, precisions=precisions, model_config=config.getoption("--model-config"),
                                     faults=faults, fault_fired=Counter({spec: 0 for spec in faults}),
                                     coco_batch=coco_batch, parity_images=images, parity_size=size,
                                     expectations=load_expectations(config),
                                     bench=options.bench_options(config, xpu.accelerator), compile=spec)
    options.root_benchmark_storage(config)
    stop_on_sigterm_as_on_sigint()


def checked_faults(config: pytest.Config) -> list:
    """The ``--inject-fault`` specs, each parsed: aten faults and ``compiled.*`` graph faults."""
    try:
        aten, graph = split_faults(config.getoption("inject_fault"))
        return [f.spec for f in parse_faults(aten)] + [f.spec for f in graph]
    except ValueError as exc:
        raise pytest.UsageError(f"--inject-fault: {exc}") from None


def vendor_compiler(config: pytest.Config):
    """A compile call for ``--compile`` from the plugins' ``pytest_detr_compile``, or None. The hook
    is asked per part: a plugin that implements it may still return None for a backend it leaves to
    torch.compile."""
    hook = config.hook.pytest_detr_compile
    if not hook.get_hookimpls():
        return None

    def compiler(fn, spec):
        try:
            return hook(fn=fn, spec=spec)
        except Exception as exc:
            raise RuntimeError(f"pytest_detr_compile raised {type(exc).__name__}: {exc}") from exc

    return compiler


def stop_on_sigterm_as_on_sigint() -> None:
    """SIGTERM (a CI job's timeout, ``kill``) ends the session as Ctrl-C does: pytest then finishes
    the session, so the parts that finished are written to the report, and the training jobs are
    stopped by their own clean-up. Only where nobody else handles SIGTERM."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def check_coco_path(config: pytest.Config, images: int, size):
    """With ``--coco-path``, the parity batch of ``images`` images resized to ``size`` (short, max;
    None for the default), checked before any test runs: its images decode and their annotations
    load. None without."""
    coco_path = config.getoption("--coco-path")
    if coco_path is None:
        return None
    if not os.path.isdir(coco_path):
        raise pytest.UsageError(
            f"--coco-path {coco_path!r}: no such folder (expected train2017/, val2017/, annotations/)"
        )
    from detr import get_config
    from detr.data.batch import PARITY_SIZE, coco_parity_batch
    from detr.data.coco import DatasetError

    try:
        return coco_parity_batch(coco_path, get_config(config.getoption("--model-config")).num_classes, images,
                                 size or PARITY_SIZE)
    except DatasetError as exc:
        raise pytest.UsageError(f"--coco-path {coco_path}: {exc}") from None


def device_under_test(config: pytest.Config):
    """``--xpu`` resolved, after the ``--xpu-plugin`` modules and the vendor hooks' devices."""
    try:
        import_plugins(config.getoption("--xpu-plugin"))
        register_devices(config)
        return resolve(config.getoption("--xpu"))
    except DeviceError as exc:
        raise pytest.UsageError(str(exc)) from None


def register_devices(config: pytest.Config) -> None:
    """Calls each plugin's ``pytest_detr_register_devices``; one that raises is a usage error that
    names the plugin and the hook."""
    try:
        call_each(config.hook.pytest_detr_register_devices, register=register_backend)
    except HookFailed as failed:
        raise pytest.UsageError(str(failed)) from None


def load_expectations(config: pytest.Config) -> Optional[Expectations]:
    path = config.getoption("--expectations")
    if path is None and config.getini("expectations"):
        path = (config.inipath.parent if config.inipath else config.rootpath) / config.getini("expectations")
    if path is None:
        return None
    try:
        return Expectations.load(path)
    except ExpectationsError as exc:
        raise pytest.UsageError(f"--expectations: {exc}") from None


TRAINING_MARKERS = {"training", "1x1", "1x8", "2x8"}


def names_training(expression: str) -> bool:
    return bool(TRAINING_MARKERS & set(re.findall(r"[A-Za-z0-9_]+", expression or "")))


def pytest_collection_modifyitems(config: pytest.Config, items) -> None:
    """Every conformance test under suite/ checks the device under test: it is marked ``xpu``.

    Training tests run for many minutes: they are deselected unless ``-m`` names ``training`` or a
    topology, so that ``pytest -m xpu`` stays the few-minute parity and benchmark run.
    """
    expectations = state(config).expectations
    for item in items:
        if SUITE_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.xpu)
        entry = expectations.find(item.nodeid) if expectations else None
        if entry is not None:
            expectations.applied[item.nodeid] = entry
            item.add_marker(pytest.mark.xfail(reason=f"{entry.reason} ({entry.where})", strict=True, raises=EXPECTED))
    if names_training(config.getoption("markexpr")):
        return
    training = [item for item in items if item.get_closest_marker("training")]
    if training:
        config.hook.pytest_deselected(items=training)
        items[:] = [item for item in items if not item.get_closest_marker("training")]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Checks that the parity trace has room under TMPDIR before the first part runs, then freezes
    what exists once the tests are collected (torch, the plugins, the test modules: about 400,000
    objects) out of the cyclic garbage collector's reach. Every later full collection, pytest's five
    at the end of the session included, then scans only what the tests made: 0.14 s a collection
    instead of 0.56 s, measured on the tiny suite."""
    config = session.config
    if not config.option.collectonly and any(item.get_closest_marker("parity") for item in session.items):
        problem = options.trace_space_problem(config.getoption("--model-config"))
        if problem:
            pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that its expectations entry says fails, but passed, fails the run: name the entry."""
    outcome = yield
    report = outcome.get_result()
    expectations = state(item.config).expectations
    entry = expectations.applied.get(item.nodeid) if expectations else None
    if entry is None or report.when != "call":
        return
    if report.failed and str(report.longrepr).startswith("[XPASS(strict)]"):
        report.longrepr = (f"[XPASS(strict)] passed, but {entry.where} expects it to fail ({entry.reason}): "
                           "remove this entry")
        expectations.outcomes[item.nodeid] = "passed"
    elif report.failed and call.excinfo is not None and not call.excinfo.errisinstance(EXPECTED):
        error = f"{call.excinfo.typename}: {call.excinfo.value}"
        report.longrepr = (f"{error}\nnot a parity failure, so the expectations entry {entry.where} "
                           f"({entry.reason}) does not cover it\n\n{report.longrepr}")
        expectations.outcomes[item.nodeid] = f"error ({error})"
    elif hasattr(report, "wasxfail"):
        expectations.outcomes[item.nodeid] = "failed as expected"


def pytest_report_header(config: pytest.Config):
    st = state(config)
    bench = st.bench
    kind = "CPU defaults" if not st.xpu.accelerator else "FlagPerf fix_hp defaults"
    replaced = "".join(f"; a plugin replaced the suite's {name!r} ({old})" for name, old in REPLACED.items())
    return [f"device under test: {st.xpu.label} (--xpu {config.getoption('--xpu')}); "
            f"precision: {','.join(st.precisions)}; model: {st.model_config}{replaced}",
            f"benchmarks: batch {','.join(map(str, bench.batch_sizes))}, {bench.image_size} px short side, "
            f"{bench.warmup} warm-up steps ({kind} unless set); storage {config.getoption('benchmark_storage', None)}",
            f"reduced-precision switches: {st.xpu.precision_switches()} (fp32 clears them, tf32 sets them)"]


def faults_never_fired(config: pytest.Config) -> list:
    """The ``--inject-fault`` specs that no selected test fired (tests add to ``fault_fired``)."""
    st = state_or_none(config)
    return [spec for spec in st.faults if not st.fault_fired[spec]] if st else []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    """Writes the parity report. A fault that fired nowhere proves nothing: a typo, or an op that the
    selected tests never run. That fails the session instead of passing silently."""
    st = state_or_none(session.config)
    if st and st.parity_results:
        try:
            st.parity_report = write_report(session.config.getoption("--report-dir"), st.parity_results)
        except OSError as exc:
            # Each file is written whole or not at all: the earlier report stays as it was.
            st.report_error = f"the parity report could not be written to {session.config.getoption('--report-dir')} " \
                              f"({exc}); the earlier report there is unchanged"
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if session.testscollected and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) \
            and faults_never_fired(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if st:
        st.unmatched_comparison = unmatched_comparison(session.config)
        if st.unmatched_comparison and session.config.getoption("--benchmark-compare-unmatched") == "error":
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    st = state_or_none(config)
    if st and st.parity_results:
        write_parity_summary(terminalreporter, st)
    if st and st.training_rows:
        terminalreporter.section("DETR training (FlagPerf metrics)")
        for line in training_report.summary_lines(st.training_rows, config.getoption("--report-dir")):
            terminalreporter.write_line(line)
    if st and st.expectations:
        write_expectations_summary(terminalreporter, st.expectations)
    for api, instead in compat.fallbacks().items():
        terminalreporter.write_line(f"warning: {api} is missing in this torch; {instead}", yellow=True)
    if st and st.unmatched_comparison:
        error = config.getoption("--benchmark-compare-unmatched") == "error"
        terminalreporter.write_line(f"{'ERROR' if error else 'warning'}: {st.unmatched_comparison}", red=error,
                                    yellow=not error)
    missed = faults_never_fired(config)
    if missed and pytest_compat.session_of(terminalreporter).testscollected:
        terminalreporter.section("injected faults", red=True)
        for spec in missed:
            terminalreporter.write_line(f"ERROR: --inject-fault {spec!r} never fired: no selected test ran an op "
                                        "that matches it", red=True)


def write_parity_summary(terminalreporter, st: SuiteState) -> None:
    terminalreporter.section("DETR parity")
    for line in summary_lines(st.parity_results):
        terminalreporter.write_line(line)
    if st.xpu.label == "cpu":
        checked = sum(r.get("ops_checked") or 0 for r in st.parity_results)
        same = sum(r.get("ops_identical") or 0 for r in st.parity_results)
        terminalreporter.write_line(
            f"note: the device under test is this CPU, running the baseline's own kernels ({same} of {checked} ops "
            "bit-identical): this checks the suite, not a device; try --xpu cpu-alt", yellow=True, bold=True)
    paths = st.parity_report
    if st.report_error:
        terminalreporter.write_line(f"ERROR: {st.report_error}", red=True, bold=True)
    if paths and paths.get("warning"):
        terminalreporter.write_line(f"warning: {paths['warning']}", yellow=True, bold=True)
    if paths:
        terminalreporter.write_line(f"report: {paths['json']} and {paths['markdown']}; "
                                    f"{len(paths['plots'])} margin plot(s) in {paths['json'].parent}")


def write_expectations_summary(terminalreporter, expectations: Expectations) -> None:
    """Expected failures apart from real ones, unexpected passes, and entries that matched nothing."""
    terminalreporter.section(f"DETR expectations ({expectations.path})")
    for nodeid, entry in expectations.applied.items():
        outcome = expectations.outcomes.get(nodeid, "not run")
        line = f"{outcome}: {nodeid}: {entry.reason} ({entry.where})"
        if outcome == "passed":
            terminalreporter.write_line(f"UNEXPECTED PASS {line}; remove this entry", red=True)
        elif outcome.startswith("error"):
            terminalreporter.write_line(f"NOT A PARITY FAILURE, {line}: the entry does not cover it", red=True)
        else:
            terminalreporter.write_line(f"expected failure, {line}", yellow=outcome != "failed as expected")
    for entry in expectations.unused():
        terminalreporter.write_line(f"entry {entry.where} ({entry.pattern}) matched no selected test")

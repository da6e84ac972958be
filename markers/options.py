"""Every command-line option of the suite, declared once, and the checks that make a bad value a
usage error (exit 4) naming what is accepted. Help texts are built from the registries they
describe: the device backends, the precisions, the model configurations, the fault kinds.
"""
import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from detr.config import CONFIGS
from detr.data.batch import PARITY_IMAGES
from parity.faults import KINDS
from parity.spill import spill_enabled
from runtime.device import BACKENDS, PRIVATEUSE1, VARIANTS
from runtime.faultspec import kinds_help
from runtime.precision import PRECISIONS
from training import convergence
from training import report as training_report

MODEL_CONFIGS = tuple(CONFIGS)

DEFAULT_STORAGE = "file://./.benchmarks"
# (images per step, short side in px, warm-up steps after the FLOP-counting step): FlagPerf's fix_hp on an accelerator
# (batch 8, COCO images resized to an 800 px short side); on the CPU something that ends in minutes.
ACCELERATOR_DEFAULTS = (8, 800, 5)
CPU_DEFAULTS = (2, 320, 1)

REFERENCE_SIZE = (800, 1333)  # DETR's short side and its cap on the long side

SYNTHETIC_TARGET = 0.25
COCO_TARGET = 0.42  # FlagPerf's target for DETR on COCO
CPU_BOUNDED_STEPS = 20  # multi-rank CPU runs share two cores: bounded, not trained to a target
TOLERANCE = 0.05


@dataclass(frozen=True)
class BenchOptions:
    batch_sizes: List[int]
    image_size: int
    warmup: int


def device_types() -> List[str]:
    return [name for name, b in BACKENDS.items() if name == b.type and name != PRIVATEUSE1]


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("detr", "DETR accelerator conformance")
    _add_parity_options(group, parser)
    _add_bench_options(group)
    _add_training_options(group)


def _add_parity_options(group, parser: pytest.Parser) -> None:
    group.addoption(
        "--xpu",
        default="auto",
        help=f"device under test: auto (default), a device type ({', '.join(device_types())}, or a plugin's), "
        f"with an optional :index as in cuda:1, or {', '.join(VARIANTS)} (the CPU run another way)",
    )
    group.addoption(
        "--xpu-plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a vendor extension first (torch_xmlir, torch_npu, torch_mlu, torch_musa, ...); repeatable",
    )
    group.addoption("--precision", default="fp32",
                    help=f"comma-separated precisions under test: {', '.join(PRECISIONS)} (default fp32)")
    group.addoption("--model-config", default="r50",
                    help=f"DETR configuration: {' or '.join(MODEL_CONFIGS)} (default r50)")
    group.addoption("--coco-path", default=None,
                    help="COCO 2017 folder (train2017/, val2017/, annotations/); default: the generated synthetic set")
    group.addoption("--report-dir", default="reports",
                    help="folder for JSON, Markdown and PNG reports (default reports/)")
    group.addoption("--inject-fault", action="append", default=[], metavar="SPEC", dest="inject_fault",
                    help="perturb an aten op on the device under test only: <aten op>[.<overload>]:<kind>[=<value>], "
                         f"kinds {kinds_help(KINDS)}; repeatable")
    group.addoption("--expectations", default=None, metavar="FILE",
                    help="known failures of this device: one '<node id or pattern> <reason>' a line; they become "
                         "strict xfails")
    group.addoption("--image-size", default=None, metavar="SHORT,MAX",
                    help="parity images SHORT x MAX pixels, portrait and landscape in turn, or 'reference' for "
                         f"{REFERENCE_SIZE[0]},{REFERENCE_SIZE[1]} (DETR's training size; default: the generated "
                         "pair of 256x288 and 288x256, or COCO images resized to 256 at most 320)")
    group.addoption("--batch-size", default=None, metavar="N",
                    help=f"images in the parity batch (default {PARITY_IMAGES})")
    parser.addini("expectations", "default for --expectations, relative to the ini file", default=None)
    _add_compile_options(group, parser)


def _add_compile_options(group, parser: pytest.Parser) -> None:
    group.addoption("--compile", default=None, metavar="BACKEND",
                    help="also run the device side of every part through torch.compile with this backend (inductor, "
                         "aot_eager, a vendor's registered one) and judge the compiled outputs and gradients; the CPU "
                         "references stay eager")
    group.addoption("--compile-mode", default=None, metavar="MODE",
                    help="torch.compile's mode with --compile (inductor: default, reduce-overhead, max-autotune, ...)")
    group.addoption("--compile-options", action="append", default=[], metavar="KEY=VALUE",
                    help="a backend option with --compile (inductor: a torch._inductor.config key); repeatable")
    group.addoption("--compile-optimizer", action="store_true", default=False,
                    help="with --compile, compile the optimizer's step too (default: it runs eagerly, since "
                         "dynamo's AdamW computes its bias correction in float32; see docs/compile.md)")
    group.addoption("--compile-fullgraph", action="store_true", default=False,
                    help="with --compile, a graph break fails the part, naming the break and its source line")
    group.addoption("--compile-no-bisect", action="store_true", default=False,
                    help="with --compile, do not bisect a failing compiled run to the first graph node whose "
                         "compilation fails it (1 + log2(nodes) more compiled runs of that part)")
    group.addoption("--compile-bisect-passes", action="store_true", default=False,
                    help="with --compile inductor, also drive Inductor's CompilerBisector with the suite's verdict "
                         "to name the subsystem, pass or lowering of a failing compiled run (minutes a part)")
    parser.addini("compile", "default for --compile: a torch.compile backend", default=None)


def _add_bench_options(group) -> None:
    group.addoption("--bench-batch-size", default=None, metavar="LIST",
                    help="comma-separated images per step of the benchmarks (default: 8, FlagPerf's fix_hp, "
                         "on an accelerator; 2 on the CPU)")
    group.addoption("--bench-image-size", default=None, metavar="PX",
                    help="short side of the benchmark images in pixels, 4:3 landscape (default: 800 on an "
                         "accelerator, 320 on the CPU)")
    group.addoption("--bench-warmup", default=None, metavar="N",
                    help="untimed steps after the FLOP-counting step, before timing (default: 5 on an accelerator, "
                         "1 on the CPU)")
    group.addoption("--benchmark-compare-unmatched", choices=("error", "warn"), default="error",
                    help="when --benchmark-compare finds no saved benchmark with a node id of this run, which "
                         "compares nothing: error (default) or warn")


def _add_training_options(group) -> None:
    collectives = ", ".join(f"{name} {b.dist_backend}" for name, b in BACKENDS.items() if name not in VARIANTS)
    group.addoption("--nnodes", type=int, default=None,
                    help="training: number of nodes (default: from the 1x1/1x8/2x8 marker)")
    group.addoption("--node-rank", type=int, default=None,
                    help="training: this machine's node rank on a cluster (default: run every node here, meeting on "
                         "127.0.0.1)")
    group.addoption("--master-addr", default="127.0.0.1", help="training: address of node 0 (default 127.0.0.1)")
    group.addoption("--master-port", type=int, default=None,
                    help="training: rendezvous port on node 0 (default: a free port; set it on a cluster)")
    group.addoption("--dist-backend", default=None,
                    help=f"training: process group backend (default by device: {collectives})")
    group.addoption("--target-map", type=float, default=None,
                    help=f"training: stop once COCO AP reaches this (default {SYNTHETIC_TARGET} on the synthetic set, "
                         f"{COCO_TARGET} on COCO)")
    group.addoption("--train-max-steps", type=int, default=None,
                    help=f"training: bound the run to N steps (default: {CPU_BOUNDED_STEPS} for multi-rank runs on the "
                         "CPU, none otherwise)")
    group.addoption("--train-epochs", type=int, default=None, help="training: epochs at most (default: the recipe's)")
    group.addoption("--train-timeout", type=float, default=None,
                    help="training: seconds one job may take before it is stopped (default 1800)")
    group.addoption("--train-arg", action="append", default=[], metavar="ARG",
                    help="training: extra argument for python -m training.train, e.g. --train-arg=--batch-size=4; "
                         "repeatable")
    group.addoption("--reference-curve", default=None, metavar="FILE",
                    help="training: saved curve(s) to judge against (a curve_*.json of another run, or "
                         "make_references' file); default: for 1x1 on the synthetic set the CPU seeds shipped with "
                         "the suite, else the target (on COCO the published 0.42)")
    group.addoption("--seeds", type=int, default=1,
                    help="training: device runs with seeds 42, 43, ...; against reference seeds their mean is judged "
                         "(more runs narrow the interval), against one curve or a target every run")
    group.addoption("--sign-off", action="store_true", default=False,
                    help=f"training: the sign-off verdict against reference seeds, the default one and a one-sided "
                         f"test that the curve mean is not lower; needs --seeds {SIGN_OFF_RUNS} or more, the runs its "
                         "power was measured for (README)")
    group.addoption("--convergence-tolerance", type=float, default=None,
                    help="training: absolute AP allowed on top of the verdict (default: 0 against reference seeds, "
                         f"whose prediction interval covers run-to-run spread; {TOLERANCE} against one curve or a "
                         "target)")


def compile_spec(config: pytest.Config, compiler=None):
    """``--compile`` and its options as a :class:`runtime.compiler.CompileSpec`, or None without
    ``--compile`` (or the ini's ``compile``); a bad value is a usage error that says what is accepted."""
    from runtime.compiler import CompileError, make_spec

    backend = config.getoption("--compile") or config.getini("compile") or None
    if backend is None:
        for name in ("--compile-mode", "--compile-options", "--compile-fullgraph", "--compile-optimizer",
                     "--compile-no-bisect", "--compile-bisect-passes"):
            if config.getoption(name):
                raise pytest.UsageError(f"{name} needs --compile BACKEND")
        return None
    try:
        return make_spec(backend, config.getoption("--compile-mode"), config.getoption("--compile-options"),
                         config.getoption("--compile-fullgraph"), compiler, config.getoption("--compile-optimizer"),
                         not config.getoption("--compile-no-bisect"), config.getoption("--compile-bisect-passes"))
    except CompileError as exc:
        raise pytest.UsageError(str(exc)) from None


def check_report_dir(path: str) -> None:
    """``--report-dir`` must be a folder that can be written, with no folder where ``parity.json`` or
    the training report go: found at start, not after every test ran."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("parity.json", "parity.md", training_report.JSON_NAME, training_report.MD_NAME):
            if (folder / name).is_dir():
                raise OSError(f"{folder / name} is a folder, where the report file goes")
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise pytest.UsageError(f"--report-dir {path}: cannot write the reports there ({exc})") from None


# The temporary disk a part's spilled trace takes at most, by model configuration (docs/memory.md:
# about 5 GiB for r50, under 1 GiB for tiny), with a fifth more for what a run writes besides.
TRACE_BYTES = {"r50": int(6 * 2**30), "tiny": int(1.2 * 2**30)}


def trace_space_problem(model_config: str) -> Optional[str]:
    """Why the parity trace would not fit under TMPDIR, or None (also when it is kept in memory)."""
    folder = tempfile.gettempdir()
    need = TRACE_BYTES.get(model_config, max(TRACE_BYTES.values()))
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return f"TMPDIR {folder}: cannot be read ({exc}); set TMPDIR to a folder on a disk with room"
    if not spill_enabled() or free >= need:
        return None
    return (f"TMPDIR {folder} has {free / 2**30:.1f} GiB free; the parity trace of {model_config} needs about "
            f"{need / 2**30:.1f} GiB (docs/memory.md): set TMPDIR to a larger disk, or keep the trace in memory "
            "with DETR_PARITY_SPILL=0")


def check_train_args(args: List[str]) -> None:
    """``--train-arg`` values, parsed at once by the trainer's own parser: a typo fails here, in the first
    second, instead of in every rank's log after the job started."""
    if not args:
        return
    from training.train import get_args_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            get_args_parser().parse_args(args)
    except SystemExit as exc:
        if exc.code:
            message = errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else "refused"
            raise pytest.UsageError(f"--train-arg {' '.join(args)}: python -m training.train says: {message}") from None


def ints(option: str, value: str, least: int, example: str) -> List[int]:
    """A single integer, or a comma-separated list where ``example`` is one, each >= ``least``."""
    many = "," in example
    try:
        numbers = [int(v) for v in value.split(",")] if many else [int(value)]
    except ValueError:
        numbers = []
    if not numbers or any(n < least for n in numbers):
        what = "a comma-separated list of integers" if many else "an integer"
        raise pytest.UsageError(f"{option} {value!r}: expected {what} >= {least}, e.g. {example}")
    return numbers


def parity_batch_options(config: pytest.Config) -> Tuple[int, Optional[Tuple[int, int]]]:
    """``--batch-size`` and ``--image-size``: images in the parity batch, and (short, max) or None for
    the default batch."""
    batch, size = config.getoption("--batch-size"), config.getoption("--image-size")
    images = ints("--batch-size", batch, 1, "2")[0] if batch is not None else PARITY_IMAGES
    if size is None:
        return images, None
    if size == "reference":
        return images, REFERENCE_SIZE
    try:
        short, longest = (int(v) for v in size.split(","))
    except ValueError:
        short = longest = 0
    if short < 32 or longest < short:
        raise pytest.UsageError(f"--image-size {size!r}: expected SHORT,MAX in pixels with 32 <= SHORT <= MAX, "
                                f"e.g. 800,1333, or 'reference'")
    if short == longest and images > 1:
        raise pytest.UsageError(f"--image-size {size!r}: with {images} images SHORT must be below MAX, so that "
                                "the batch has padding and the attention masks are judged")
    return images, (short, longest)


def bench_options(config: pytest.Config, accelerator: bool) -> BenchOptions:
    batch, size, warmup = ACCELERATOR_DEFAULTS if accelerator else CPU_DEFAULTS
    batches, image, warm = (config.getoption(o) for o in ("--bench-batch-size", "--bench-image-size", "--bench-warmup"))
    return BenchOptions(
        batch_sizes=list(dict.fromkeys(ints("--bench-batch-size", batches, 1, "2,8"))) if batches else [batch],
        image_size=ints("--bench-image-size", image, 32, "800")[0] if image else size,
        warmup=ints("--bench-warmup", warm, 0, "5")[0] if warm else warmup,
    )


def root_benchmark_storage(config: pytest.Config) -> None:
    """pytest-benchmark matches saved runs by node id, and stores them under ``./.benchmarks`` of the
    current directory by default: started from a sub-folder, ``--benchmark-compare`` would find no
    baseline and pass. The default storage is moved to the rootdir, which pytest.ini fixes. Runs
    before pytest-benchmark's own (trylast) pytest_configure, which opens the storage."""
    if config.pluginmanager.hasplugin("benchmark") and config.getoption("benchmark_storage") == DEFAULT_STORAGE:
        config.option.benchmark_storage = rooted_storage(config.rootpath)


def rooted_storage(rootdir) -> str:
    """The default ``--benchmark-storage``, made absolute: ``<rootdir>/.benchmarks``."""
    return f"file://{(rootdir / '.benchmarks').resolve()}"


TRAINING_RANGES = (
    ("--seeds", lambda v: v >= 1), ("--convergence-tolerance", lambda v: v is None or v >= 0),
    ("--train-max-steps", lambda v: v is None or v >= 1), ("--train-epochs", lambda v: v is None or v >= 1),
    ("--train-timeout", lambda v: v is None or v > 0), ("--target-map", lambda v: v is None or 0 < v <= 1),
    ("--node-rank", lambda v: v is None or v >= 0), ("--nnodes", lambda v: v is None or v >= 1),
)


# The device runs the sign-off's power was measured for (training.power --sign-off, README).
SIGN_OFF_RUNS = 5
# The most nodes a topology marker asks for (2x8).
MAX_MARKED_NODES = 2


def check_training_options(config: pytest.Config) -> None:
    for name, check in TRAINING_RANGES:
        if not check(config.getoption(name)):
            raise pytest.UsageError(f"{name} {config.getoption(name)!r}: out of range")
    node_rank, nnodes = config.getoption("--node-rank"), config.getoption("--nnodes")
    if node_rank is not None and node_rank >= (nnodes or MAX_MARKED_NODES):
        where = f"--nnodes {nnodes}" if nnodes else f"the topology markers (at most {MAX_MARKED_NODES} nodes, 2x8)"
        raise pytest.UsageError(f"--node-rank {node_rank}: {where} has node ranks "
                                f"0..{(nnodes or MAX_MARKED_NODES) - 1}; a rank outside them would wait for the "
                                "others until the timeout")
    check_train_args(config.getoption("--train-arg"))
    if config.getoption("--sign-off") and config.getoption("--seeds") < SIGN_OFF_RUNS:
        raise pytest.UsageError(f"--sign-off needs --seeds {SIGN_OFF_RUNS} or more: its power to catch a device "
                                f"needing 1.25x the samples or reaching 0.85x the mAP was measured for "
                                f"{SIGN_OFF_RUNS} runs (README), got --seeds {config.getoption('--seeds')}")
    curve = config.getoption("--reference-curve")
    if curve is not None:
        try:
            convergence.load_curves(Path(curve))
        except ValueError as exc:
            raise pytest.UsageError(f"--reference-curve: {exc}") from None

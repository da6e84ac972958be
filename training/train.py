"""``python -m training.train``: train and evaluate DETR with the reference recipe, alone or under torchrun.

With no ``--coco-path`` it trains the ``tiny`` model on the generated synthetic COCO-format set with
a recipe tuned to converge in minutes on a CPU. Under ``torchrun`` every rank trains on its share of
the data (DistributedSampler) and the model is wrapped in DistributedDataParallel; rank 0 prints
progress lines (step, loss, images/s, ETA), the COCO AP after each evaluation, writes checkpoints
that ``--resume`` continues from, and at the end ``result.json`` with the raw counters from which
FlagPerf's metrics are computed.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset
from torch.utils.data.distributed import DistributedSampler

import detr
from detr.data.coco import DatasetError, build_dataset, coco_api, num_classes, validate_split
from detr.engine import PHASES, EpochStats, StepOptions, evaluate, train_one_epoch
from detr.misc import collate_fn
from runtime import compat
from runtime import distributed as D
from runtime.compiler import CompileError, CompileSpec, compile_callable, make_spec
from runtime.device import BACKENDS, VARIANTS, Device, DeviceError, collective_device, import_plugins
from runtime.device import resolve as resolve_device
from runtime.files import atomic_save, atomic_write, remove_temporaries
from runtime.precision import PRECISIONS

from .ddp_check import DDPEquivalence
from .faults import GRAD_KINDS, KINDS, FaultyAllReduce, FaultyCriterion, TrainFault

# Where a rank can be, in order within a step: the training phases, then the evaluation after it.
ORDER = PHASES + ("evaluation",)
# The autocast dtype of each precision ("amp": the device's own); tf32 is a switch, not a dtype.
AUTOCAST = {"fp32": None, "tf32": None, "amp": "amp", "fp16": torch.float16, "bf16": torch.bfloat16}

# The synthetic set and recipe that reach 0.40 AP within 10 minutes of training on two CPU cores
# (see docs/training-recipe.md): 96x96 images and a linear cool-down from epoch 3 to the end of epoch 10.
SYNTHETIC_DATA = dict(num_train=2048, num_val=128, min_size=128, max_size=128, min_objects=1, max_objects=3,
                      object_size=(0.3, 0.7), class_colours=True, crowd_every=0)
# The defaults of the options on each data set, COCO's the reference's: the model and its overrides,
# the optimizer's rates, the schedule, the evaluation's cadence, the image sizes and the loaders.
TRAINING_SETUPS: Dict[str, Dict[str, Any]] = {
    "coco": dict(model="r50", batch_size=8, lr=detr.REFERENCE.lr, lr_backbone=detr.REFERENCE.lr_backbone,
                 epochs=300, lr_drop=200, lr_schedule="step", eval_every=1, warmup_steps=0,
                 scales=list(range(480, 801, 32)), max_size=1333, val_size=800, crop="on", num_workers=4,
                 channels_last="off", overrides={}),
    "synthetic": dict(model="tiny", batch_size=8, lr=3e-4, lr_backbone=3e-4, epochs=10, lr_drop=3,
                      lr_schedule="linear", eval_every=1, warmup_steps=100,
                      eval_every_steps=128, scales=[96], max_size=96, val_size=96, crop="off", num_workers=0,
                      channels_last="on",
                      overrides=dict(backbone_norm="batch", backbone_stride=16, dropout=0.0, num_queries=10)),
}


def synthetic_recipe() -> Dict[str, Any]:
    """The embedded default as the shipped reference curves record it: the data, the recipe and the
    model's overrides, in JSON's types."""
    return json.loads(json.dumps({"data": SYNTHETIC_DATA, "recipe": TRAINING_SETUPS["synthetic"]}))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_data_and_device_options, _recipe_options, _loader_options, _job_options):
        add(p)
    return p


def _data_and_device_options(p: argparse.ArgumentParser) -> None:
    """The data set, the model, the device and the precision."""
    p.add_argument("--coco-path", help="COCO 2017 folder; default: the generated synthetic set")
    p.add_argument("--model", default=None, choices=sorted(detr.CONFIGS),
                   help="default: tiny on the synthetic set, r50 on COCO")
    p.add_argument("--device", default="auto",
                   help=f"torch device type or string, auto (the accelerator if any, else cpu), or "
                        f"{', '.join(VARIANTS)}; under torchrun each rank takes index LOCAL_RANK")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="vendor extension to import first (e.g. torch_xmlir); repeatable")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="amp autocasts to the device's autocast dtype (float16 on CUDA, bfloat16 on the CPU); "
                        "tf32 allows TF32 matmuls and convolutions")


def _recipe_options(p: argparse.ArgumentParser) -> None:
    """The recipe, the schedule and when to evaluate and stop."""
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many training steps in all")
    p.add_argument("--batch-size", type=int, default=None, help="images per device and step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-backbone", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=detr.REFERENCE.weight_decay)
    p.add_argument("--lr-drop", type=int, default=None,
                   help="epoch after which the learning rate drops 10x (step) or starts its linear decay (linear)")
    p.add_argument("--lr-schedule", choices=("step", "linear"), default=None,
                   help="step: the reference's 10x drop after --lr-drop (default on COCO); linear: constant, "
                        "then linear to 0 from --lr-drop to the last epoch's end (default on the synthetic set)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear learning-rate warm-up over the first N steps (0: none)")
    p.add_argument("--clip-max-norm", type=float, default=detr.REFERENCE.clip_max_norm)
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--eval-every-steps", type=int, default=None, metavar="N",
                   help="evaluate every N training steps, within epochs too, so that the time to the target is "
                        "measured at the step; epochs are then evaluated only at the end unless --eval-every is given")
    p.add_argument("--target-map", type=float, default=None, help="stop once COCO AP@[.5:.95] reaches this")


def _loader_options(p: argparse.ArgumentParser) -> None:
    """The images, their sizes and augmentation, the loaders and the CPU's threads and kernels."""
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-limit", type=int, default=None, help="evaluate only the first N validation images")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="training short sides")
    p.add_argument("--max-size", type=int, default=None, help="longest side")
    p.add_argument("--val-size", type=int, default=None, help="validation short side")
    p.add_argument("--crop", choices=("on", "off"), default=None,
                   help="the reference's random crop augmentation (default: on for COCO, off on the synthetic set)")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--channels-last", choices=("on", "off"), default=None,
                   help="keep the model's weights, and so its convolutions' activations, channels-last (NHWC); "
                        "default: on for the synthetic set, off on COCO")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per rank; default: the cores shared among the node's ranks")
    p.add_argument("--cpu-onednn", choices=("on", "off"), default="on",
                   help="oneDNN convolutions on the CPU (fast, but warm up per input shape)")


def _job_options(p: argparse.ArgumentParser) -> None:
    """The process group, the seeds, the output folder, resuming, the model's overrides and the checks."""
    p.add_argument("--dist-backend", default=None,
                   help="process group backend; default by device: "
                        + ", ".join(f"{k} {b.dist_backend}" for k, b in BACKENDS.items() if k not in VARIANTS))
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a collective may wait for a rank before the job fails")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--init-seed", type=int, default=None,
                   help="seed of the initial weights alone; default: --seed, which also orders the data")
    p.add_argument("--output-dir", default="outputs", help="checkpoints, log.jsonl and result.json go here")
    p.add_argument("--resume", default=None, help="a checkpoint to continue from")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="let --resume continue with another recipe (batch size, rates, seed, ...); result.json "
                        "records both")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. hidden_dim=128; repeatable")
    p.add_argument("--fail-at", default=None, metavar="RANK:STEP:KIND",
                   help="inject a fault to test the harness; KIND: " + "; ".join(KINDS.values()))
    p.add_argument("--ddp-check-steps", type=int, default=2, metavar="N",
                   help="multi-rank jobs: check the first N steps' gradients and parameters against one process "
                        "on the global batch (0: off)")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="run the model through torch.compile with this backend (inductor, aot_eager, a vendor's)")
    p.add_argument("--compile-mode", default=None, metavar="MODE", help="torch.compile's mode, with --compile")
    p.add_argument("--compile-options", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option with --compile; repeatable")


def parse_overrides(items: List[str]) -> dict:
    fields = list(detr.ModelConfig.__dataclass_fields__)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--override {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        default = getattr(detr.ModelConfig(), key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[key] = type(default)(value)
        else:
            out[key] = None if value == "None" else value
    return out


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_save(path, lambda f: torch.save(state, f))


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def param_digest(model: torch.nn.Module) -> str:
    """A short fingerprint of the exact parameter values, to check that all ranks hold the same model."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def total_memory_gib(xpu: Device) -> Optional[float]:
    try:
        return xpu.total_memory() / 2**30
    except Exception:  # a vendor's backend without the call
        return None


def usage_error(message: str) -> None:
    """Exits 2 with one line, as argparse does for a bad option."""
    print(f"python -m training.train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# (option, what it must be, the check), after the data set's defaults are filled in.
RANGES = (
    ("epochs", ">= 1", lambda v: v >= 1), ("batch_size", ">= 1", lambda v: v >= 1),
    ("max_steps", ">= 1", lambda v: v is None or v >= 1), ("lr", "> 0", lambda v: v > 0),
    ("lr_backbone", ">= 0", lambda v: v >= 0), ("weight_decay", ">= 0", lambda v: v >= 0),
    ("lr_drop", ">= 1", lambda v: v >= 1), ("warmup_steps", ">= 0", lambda v: v >= 0),
    ("clip_max_norm", ">= 0", lambda v: v >= 0), ("eval_every", ">= 0", lambda v: v >= 0),
    ("target_map", "in [0, 1]", lambda v: v is None or 0 <= v <= 1),
    ("train_limit", ">= 1", lambda v: v is None or v >= 1), ("val_limit", ">= 1", lambda v: v is None or v >= 1),
    ("scales", "each >= 32", lambda v: all(s >= 32 for s in v)), ("max_size", ">= 32", lambda v: v >= 32),
    ("val_size", ">= 32", lambda v: v >= 32), ("num_workers", ">= 0", lambda v: v >= 0),
    ("threads", ">= 1", lambda v: v is None or v >= 1), ("dist_timeout", "> 0", lambda v: v > 0),
    ("ddp_check_steps", ">= 0", lambda v: v >= 0),
)
# What a resumed run must share with the run it continues; --epochs and --max-steps may move its end.
RECIPE_KEYS = ("model", "precision", "batch_size", "lr", "lr_backbone", "weight_decay", "lr_drop", "lr_schedule",
               "warmup_steps", "clip_max_norm", "seed", "init_seed", "scales", "max_size", "val_size", "crop",
               "override", "coco_path", "train_limit", "val_limit", "channels_last")


def check_args(args: argparse.Namespace) -> None:
    """The ranges of the options, the output folder and the resume file, as usage errors (exit 2)."""
    for name, what, ok in RANGES:
        value = getattr(args, name)
        if not (isinstance(value, (int, float, list)) or value is None) or not ok(value) \
                or (isinstance(value, float) and not math.isfinite(value)):
            usage_error(f"--{name.replace('_', '-')} {value}: expected {what}")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        usage_error(f"--output-dir {out}: cannot be made a folder ({exc.strerror or exc})")
    if args.resume is not None and not Path(args.resume).is_file():
        usage_error(f"--resume {args.resume}: no such checkpoint file")


def compile_spec(args: argparse.Namespace) -> Optional[CompileSpec]:
    """``--compile`` and its options, checked once the plugins (which register a vendor's backend)
    are imported; a bad one is a usage error."""
    if args.compile is None:
        if args.compile_mode or args.compile_options:
            usage_error("--compile-mode and --compile-options need --compile BACKEND")
        return None
    try:
        return make_spec(args.compile, args.compile_mode, args.compile_options)
    except CompileError as exc:
        usage_error(str(exc))


def recipe_changes(saved: Dict[str, Any], args: argparse.Namespace) -> Dict[str, List[Any]]:
    """{option: [the checkpoint's value, this run's]} for each recipe option that differs."""
    now = vars(args)
    return {k: [saved.get(k), now.get(k)] for k in RECIPE_KEYS if k in saved and saved.get(k) != now.get(k)}


def resolve(args: argparse.Namespace, setup: Dict[str, Any]) -> None:
    for key, value in setup.items():
        if key != "overrides" and getattr(args, key, None) is None:
            setattr(args, key, value)


def check_fault_ranks(fault: Optional[TrainFault], spec: str, info: D.DistInfo) -> None:
    """A ``--fail-at`` on a rank the job does not have is refused at once, before any data is read."""
    if fault is None:
        return
    if fault.rank >= info.world_size:
        raise SystemExit(f"--fail-at {spec}: this run has rank(s) 0..{info.world_size - 1}, "
                         "so the fault would never fire")
    if fault.kind in GRAD_KINDS and not info.enabled:
        raise SystemExit(f"--fail-at {spec}: a gradient all-reduce fault needs a multi-rank job")


@dataclass
class Job:
    """What :func:`main` hands the run: the options with their defaults filled in, this rank's place in
    the job, its device and process group, the model's overrides and the fault to inject, if any."""

    args: argparse.Namespace
    info: D.DistInfo
    xpu: Device
    backend: Optional[str]
    overrides: dict
    fault: Optional[TrainFault]
    synthetic: bool
    threads: int  # the CPU threads the device's kernels run on
    process_start: float
    progress: D.Progress
    compile: Optional[CompileSpec] = None

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def log(self, line: str) -> None:
        """Rank 0 prints the run's lines; the other ranks keep quiet."""
        if self.info.is_main:
            print(line, flush=True)


@dataclass
class Data:
    """The data sets and their loaders. ``generator`` orders a single process's training images (its
    state is checkpointed); ``loader_val`` holds this rank's share of the validation images."""

    coco_path: Path
    num_classes: int
    dataset_train: Dataset
    dataset_val: Dataset
    coco_gt: Any
    generator: torch.Generator
    sampler_train: Sampler
    loader_train: DataLoader
    loader_val: DataLoader


@dataclass
class Parts:
    """The model (``model`` is wrapped in DistributedDataParallel under torchrun), its criterion and
    postprocessor, the optimizer and its per-step schedule (``factor(step)`` times the base rates), the
    autocast dtype and float16's loss ``scaler``, and a multi-rank job's DDP check and gradient fault."""

    model: nn.Module
    model_without_ddp: nn.Module
    criterion: nn.Module
    postprocess: nn.Module
    optimizer: torch.optim.Optimizer
    factor: Callable[[int], float]
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast_dtype: Optional[torch.dtype]
    scaler: Optional[Any]
    checker: Optional[DDPEquivalence]
    grad_fault: Optional[FaultyAllReduce]
    compiled: Optional[Dict[str, Any]] = None  # with --compile: the backend, its graphs and compile seconds


@dataclass
class Run:
    """The run's mutable state, which a checkpoint saves and ``--resume`` restores: where it is, the rows
    of log.jsonl (``history``), each step's loss summed over the ranks, result.json's counters, the
    evaluations' results and the time of the runs before a resume."""

    process_start: float
    start_epoch: int = 0
    steps_done: int = 0
    history: List[dict] = field(default_factory=list)
    step_losses: List[float] = field(default_factory=list)
    counters: Dict[str, float] = field(
        default_factory=lambda: {"samples": 0.0, "train_time": 0.0, "eval_time": 0.0, "core_time": 0.0})
    best: Optional[float] = None
    target_hit: Optional[dict] = None
    pending_eval: bool = False  # resumed from a checkpoint written before its epoch's evaluation
    earlier: float = 0.0  # seconds of the runs before a resume, up to their checkpoint
    resumes: List[dict] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=lambda: {"AP": None})  # the last evaluation's
    evaluated_at: Optional[int] = None  # the steps done at the last evaluation
    stop: bool = False  # an evaluation within the epoch reached the target

    def elapsed(self) -> float:
        """Seconds since the first run started, adding the runs before each resume up to their checkpoint."""
        return self.earlier + time.time() - self.process_start


@record
def main(argv: Optional[List[str]] = None) -> dict:
    process_start = D.process_start_time()
    args = get_args_parser().parse_args(argv)
    fault = None
    if args.fail_at:
        try:
            fault = TrainFault.parse(args.fail_at)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    info = D.dist_info_from_env()
    check_fault_ranks(fault, args.fail_at, info)
    try:
        import_plugins(args.plugin, option="--plugin")
        xpu = resolve_device(args.device, index=info.local_rank, option="--device", plugin_option="--plugin")
    except DeviceError as exc:
        raise SystemExit(str(exc)) from None
    xpu.set_current()
    synthetic = args.coco_path is None
    setup = TRAINING_SETUPS["synthetic" if synthetic else "coco"]
    if args.eval_every_steps is not None:
        if args.eval_every_steps < 1:
            raise SystemExit(f"--eval-every-steps {args.eval_every_steps}: expected a number of steps >= 1")
        if args.eval_every is None:
            args.eval_every = 0
    resolve(args, setup)
    check_args(args)
    spec = compile_spec(args)
    overrides = parse_overrides(args.override)
    if args.model == setup["model"]:
        overrides = {**setup["overrides"], **overrides}
    threads = args.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    xpu.set_onednn(args.cpu_onednn == "on")
    # fp32 means full float32 matmuls even where the backend defaults to TF32; tf32 allows it.
    xpu.set_tf32(args.precision == "tf32")
    D.die_with_parent()
    backend = D.init_distributed(info, xpu.device, args.dist_backend, args.dist_timeout)
    progress = D.Progress(Path(args.output_dir), info.rank, info.world_size)
    try:
        with xpu.kernels():
            # The device's kernels may run on fewer threads (cpu-alt: one); the report says what ran.
            return train(Job(args, info, xpu, backend, overrides, fault, synthetic, torch.get_num_threads(),
                             process_start, progress, spec))
    except DatasetError as exc:
        raise SystemExit(f"dataset: {exc}") from exc
    except Exception as exc:
        if not (info.enabled and D.is_collective_timeout(exc)):
            raise
        report = progress.report_timeout(exc, ORDER)
        late = ", ".join(f"rank {m['rank']} (last in step {m['step']}, {m['phase']})" for m in report["not_arrived"])
        raise RuntimeError(f"rank {info.rank} timed out after {args.dist_timeout:.0f}s in step {report.get('step')}, "
                           f"{report.get('phase')}, waiting for {late or 'ranks that reported no progress'}") from exc
    finally:
        D.shutdown()


def train(job: Job) -> dict:
    """Trains and evaluates as ``job`` says; returns the summary that rank 0 writes to result.json."""
    args, info = job.args, job.info
    data = build_data(job)
    parts = build_model(job, data)
    check_fault_steps(job, len(data.loader_train))
    check_data(job, data)
    output_dir = job.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:  # left by a run killed while writing; only one job writes to an output folder
        remove_temporaries(output_dir, "*")
    run = Run(job.process_start)
    if args.resume:
        resume(job, data, parts, run)
    arm_fault(job, parts, run)
    n_params = sum(p.numel() for p in parts.model_without_ddp.parameters() if p.requires_grad)
    job.log(f"training {args.model} ({n_params:,} trainable parameters) on {job.xpu.label} x {info.world_size} "
            f"({job.backend or 'single process'}), {job.threads} thread(s) per rank, {len(data.dataset_train)} "
            f"images from {data.coco_path}, batch {args.batch_size} per device, {args.precision}")
    train_loop(job, data, parts, run)
    summary = summarize(job, data, parts, run)
    if info.is_main:
        write_json(output_dir / "result.json", summary)
    final = run.result["AP"] if run.result["AP"] is not None else float("nan")
    job.log(f"done in {summary['e2e_time']:.1f}s: mAP {final:.4f}, {run.counters['samples']:.0f} samples")
    return summary


def data_path(job: Job) -> Path:
    """``--coco-path``, or the synthetic set's folder."""
    if not job.synthetic:
        return Path(job.args.coco_path)
    from detr.data.synthetic import ensure_synthetic

    # One rank per node generates the set on first use; the others then find it in the cache.
    if job.info.local_rank == 0:
        ensure_synthetic(**SYNTHETIC_DATA)
    D.barrier()
    return ensure_synthetic(**SYNTHETIC_DATA)


def build_data(job: Job) -> Data:
    """The data sets, the training sampler and the loaders; fails when not one batch per rank is left."""
    args, info = job.args, job.info
    coco_path = data_path(job)
    crop = {} if args.crop == "on" else {"crop": False}
    dataset_train = build_dataset("train", coco_path, scales=args.scales, max_size=args.max_size, **crop)
    dataset_val = build_dataset("val", coco_path, max_size=args.max_size, val_size=args.val_size)
    n_classes = num_classes(dataset_train)
    if args.train_limit:
        dataset_train = Subset(dataset_train, range(min(args.train_limit, len(dataset_train))))
    if args.val_limit:
        dataset_val = Subset(dataset_val, range(min(args.val_limit, len(dataset_val))))
    coco_gt = coco_api(dataset_val)
    # Each rank evaluates every world_size-th image; no padding, so no image is counted twice.
    val_share = Subset(dataset_val, range(info.rank, len(dataset_val), info.world_size))
    g = torch.Generator().manual_seed(args.seed)
    if info.enabled:
        sampler_train = DistributedSampler(dataset_train, info.world_size, info.rank, shuffle=True, seed=args.seed,
                                           drop_last=True)
    else:
        sampler_train = RandomSampler(dataset_train, generator=g)
    loader_train = DataLoader(dataset_train, batch_size=args.batch_size, sampler=sampler_train, drop_last=True,
                              collate_fn=collate_fn, num_workers=args.num_workers)
    loader_val = DataLoader(val_share, batch_size=args.batch_size, sampler=SequentialSampler(val_share),
                            collate_fn=collate_fn, num_workers=args.num_workers)
    if len(loader_train) == 0:
        raise SystemExit(f"the training set has {len(dataset_train)} images, fewer than one batch of {args.batch_size} "
                         f"on each of {info.world_size} rank(s)")
    return Data(coco_path, n_classes, dataset_train, dataset_val, coco_gt, g, sampler_train, loader_train, loader_val)


def build_model(job: Job, data: Data) -> Parts:
    """The model on the device (in DDP under torchrun), the optimizer, the precision, the DDP check and
    the learning-rate schedule, all from the same initial weights on every rank; then seeds the rank."""
    args, info, xpu, device = job.args, job.info, job.xpu, job.xpu.device
    torch.manual_seed(args.seed if args.init_seed is None else args.init_seed)  # the same initial weights on every rank
    model, criterion, postprocess = detr.build(args.model, num_classes=data.num_classes, lr_backbone=args.lr_backbone,
                                               **job.overrides)
    # Channels-last weights make every convolution run NHWC, the layout oneDNN computes in.
    model.to(device, memory_format=torch.channels_last if args.channels_last == "on" else torch.preserve_format)
    criterion.to(device)
    model_without_ddp = model
    grad_fault = None
    if job.fault is not None and job.fault.kind in GRAD_KINDS:
        grad_fault = FaultyAllReduce(job.fault, info.rank, info.world_size)
    if info.enabled:
        device_ids = [device.index] if xpu.accelerator else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if grad_fault is not None:
            model.register_comm_hook(None, grad_fault.hook)
    compiled = None
    if job.compile is not None:
        compiled = {"backend": job.compile.backend, "mode": job.compile.mode, "graphs": 0, "graph_nodes": 0,
                    "backend_compile_s": 0.0}

        def on_graph(nodes: int, seconds: float) -> None:
            compiled.update(graphs=compiled["graphs"] + 1, graph_nodes=compiled["graph_nodes"] + nodes,
                            backend_compile_s=round(compiled["backend_compile_s"] + seconds, 3))

        # the model, in DDP where there is one (dynamo then splits graphs at its buckets); the
        # criterion's matching and the optimizer step run eagerly
        model = compile_callable(job.compile, model, on_graph)
    recipe = detr.Recipe(args.lr, args.lr_backbone, args.weight_decay, args.clip_max_norm)
    optimizer = recipe.optimizer(model_without_ddp)
    autocast_dtype = AUTOCAST[args.precision]
    if autocast_dtype == "amp":
        autocast_dtype = xpu.autocast_dtype()
    scaler = compat.grad_scaler(device.type) if autocast_dtype == torch.float16 else None
    checker = None
    if info.enabled and args.ddp_check_steps > 0 and scaler is None:
        checker = DDPEquivalence(
            model_without_ddp, criterion, optimizer, make_optimizer=recipe.optimizer,
            steps=args.ddp_check_steps, max_norm=args.clip_max_norm,
            autocast=lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
            rank=info.rank, world_size=info.world_size, collective_device=collective_device(job.backend),
            rng_state=xpu.rng_state, set_rng_state=xpu.set_rng_state)
    seed_everything(args.seed + info.rank)
    factor = lr_factor(args, len(data.loader_train))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return Parts(model, model_without_ddp, criterion, postprocess, optimizer, factor, lr_scheduler, autocast_dtype,
                 scaler, checker, grad_fault, compiled)


def lr_factor(args: argparse.Namespace, steps_per_epoch: int) -> Callable[[int], float]:
    """One factor per step, the warm-up included; the plan ends with the epochs, not --max-steps, so
    that a shorter run is a prefix of the whole one."""
    if args.lr_schedule == "linear":
        return functools.partial(detr.linear_decay, warmup=args.warmup_steps, start=args.lr_drop * steps_per_epoch,
                                 end=args.epochs * steps_per_epoch)
    return functools.partial(detr.step_decay, warmup=args.warmup_steps, every=args.lr_drop * steps_per_epoch)


def check_fault_steps(job: Job, steps_per_epoch: int) -> None:
    """A ``--fail-at`` past the run's last step is refused before the data is checked."""
    args, fault = job.args, job.fault
    if fault is None:
        return
    planned = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        planned = min(args.max_steps, planned)
    if fault.step >= planned:
        raise SystemExit(f"--fail-at {args.fail_at}: this run has steps 0..{planned - 1}, "
                         "so the fault would never fire")


def check_data(job: Job, data: Data) -> None:
    """Bad data fails here, before the first step, not at the first evaluation an epoch later. Each
    rank reads the headers of its share of the training images and decodes its validation images."""
    info = job.info
    t0 = time.perf_counter()
    validate_split(data.dataset_train, range(info.rank, len(data.dataset_train), info.world_size), decode=False)
    validate_split(data.dataset_val, range(info.rank, len(data.dataset_val), info.world_size), decode=True)
    D.barrier()
    job.log(f"dataset checked in {time.perf_counter() - t0:.1f}s: {len(data.dataset_train)} training image headers, "
            f"{len(data.dataset_val)} validation images decoded")


def resume(job: Job, data: Data, parts: Parts, run: Run) -> None:
    """Restores the weights, the optimizer, the rate, the data order, the RNG and ``run`` from ``--resume``."""
    args, info = job.args, job.info
    try:
        ckpt = compat.load(args.resume, weights_only=False, map_location="cpu")
        missing = {"model", "optimizer", "steps", "epoch", "args"} - set(ckpt)
    except Exception as exc:
        usage_error(f"--resume {args.resume}: not a checkpoint that can be read ({type(exc).__name__}: {exc})")
    if missing:
        usage_error(f"--resume {args.resume}: not a checkpoint of this trainer (no {', '.join(sorted(missing))})")
    changes = recipe_changes(ckpt["args"], args)
    if changes and not args.allow_recipe_change:
        shown = "; ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changes.items())
        usage_error(f"--resume {args.resume}: the checkpoint was trained with another recipe ({shown}); "
                    "resume with the same options, or pass --allow-recipe-change")
    try:
        parts.model_without_ddp.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        usage_error(f"--resume {args.resume}: its weights do not fit this model ({str(exc).splitlines()[0]})")
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    # The rate follows from the steps done and this run's plan (--epochs may move its end), so a
    # checkpoint of the per-epoch StepLR that came before resumes too.
    parts.lr_scheduler.last_epoch = ckpt["steps"]
    for group, base in zip(parts.optimizer.param_groups, parts.lr_scheduler.base_lrs):
        group["lr"] = base * parts.factor(ckpt["steps"])
    run.pending_eval = ckpt.get("pending_eval", False)
    run.earlier = ckpt.get("elapsed", 0.0)
    run.resumes = ckpt.get("resumes", []) + [{"checkpoint": str(args.resume), "epoch": ckpt["epoch"],
                                              "steps": ckpt["steps"], "recipe_changes": changes}]
    run.start_epoch = ckpt["epoch"] + (0 if run.pending_eval else 1)
    run.steps_done, run.history, run.step_losses = ckpt["steps"], ckpt["history"], ckpt["step_losses"]
    run.counters, run.best, run.target_hit = ckpt["counters"], ckpt["best"], ckpt["target_hit"]
    if len(ckpt["rng"]) != info.world_size:
        raise SystemExit(f"--resume {args.resume}: saved by {len(ckpt['rng'])} rank(s), resumed by {info.world_size}")
    data.generator.set_state(ckpt["sampler_rng"])
    torch.set_rng_state(ckpt["rng"][info.rank])
    job.log(f"resumed from {args.resume} at epoch {run.start_epoch}, step {run.steps_done}"
            + (" (its evaluation first)" if run.pending_eval else ""))


def arm_fault(job: Job, parts: Parts, run: Run) -> None:
    """Wraps the criterion to inject ``--fail-at``, refused when the resumed run is past its step."""
    fault = job.fault
    if fault is None:
        return
    if fault.kind != "eval-crash" and fault.step < run.steps_done:
        raise SystemExit(f"--fail-at {job.args.fail_at}: this run resumes at step {run.steps_done} "
                         f"({job.args.resume}), so the fault would never fire")
    parts.criterion = FaultyCriterion(parts.criterion, fault, job.info.rank, first_step=run.steps_done)


def checkpoint(job: Job, data: Data, parts: Parts, run: Run, epoch: int, rows: List[dict], pending: bool) -> None:
    """Every rank's RNG state, and on rank 0 the checkpoint; ``pending``: written after the
    epoch's training and before its evaluation, which a resume then runs first."""
    rng_states = D.all_gather_object(torch.get_rng_state())
    if job.info.is_main:
        save_checkpoint(job.output_dir / "checkpoint.pth", {
            "model": parts.model_without_ddp.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "lr_scheduler": parts.lr_scheduler.state_dict(), "epoch": epoch, "steps": run.steps_done,
            "history": rows, "step_losses": run.step_losses, "counters": run.counters, "best": run.best,
            "target_hit": run.target_hit, "args": vars(job.args), "sampler_rng": data.generator.get_state(),
            "rng": rng_states, "pending_eval": pending, "elapsed": run.elapsed(), "resumes": run.resumes,
        })


def log_row(job: Job, run: Run, row: dict) -> None:
    """Adds ``row`` to the history and, on rank 0, to log.jsonl."""
    run.history.append(row)
    if job.info.is_main:
        with open(job.output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def evaluate_into(job: Job, data: Data, parts: Parts, run: Run, row: dict, epoch: int, steps: int) -> bool:
    """Evaluates after ``steps`` steps into ``row``; True once the target mAP is first reached."""
    args, info, fault = job.args, job.info, job.fault
    if fault is not None and fault.kind == "eval-crash" and info.rank == fault.rank and steps > fault.step:
        raise RuntimeError(f"injected crash in the evaluation after step {steps - 1} on rank {info.rank} (--fail-at)")
    t0 = time.perf_counter()
    job.progress.mark(steps - 1, ORDER[-1])
    dtype = parts.autocast_dtype if parts.autocast_dtype != torch.float16 else None
    run.result = result = evaluate(parts.model_without_ddp, parts.postprocess, data.loader_val, data.coco_gt,
                                   job.xpu.device, dtype)
    run.counters["eval_time"] += time.perf_counter() - t0
    run.evaluated_at = steps
    if result["AP"] < 0:  # pycocotools' "no ground truth": never a result
        raise DatasetError(f"the validation split has no ground truth for the {len(data.dataset_val)} images "
                           "evaluated (COCO AP -1)")
    row["mAP"] = result["AP"]
    row["AP50"] = result["AP50"]
    run.best = result["AP"] if run.best is None else max(run.best, result["AP"])
    job.log(f"epoch {epoch} step {steps} mAP {result['AP']:.4f} AP50 {result['AP50']:.4f} "
            f"({row['images_per_s']:.1f} img/s, {row['elapsed']:.0f}s)")
    if args.target_map is not None and run.target_hit is None and result["AP"] >= args.target_map:
        run.target_hit = {"epoch": epoch, "steps": steps, "samples": row["samples"],
                          "train_time": row["train_time"], "elapsed": row["elapsed"]}
        job.log(f"target mAP {args.target_map} reached at step {steps} after {row['elapsed']:.0f}s: stopping")
        return True
    return False


def evaluate_within_epoch(job: Job, data: Data, parts: Parts, run: Run, epoch: int, step: int,
                          stats: EpochStats) -> bool:
    """--eval-every-steps: evaluates inside the epoch every N steps; True stops the epoch at the target.
    No checkpoint is written here: a resume starts from the last epoch's end."""
    args, info = job.args, job.info
    steps = run.steps_done + step + 1
    if not args.eval_every_steps or steps % args.eval_every_steps:
        return False
    wall = D.all_reduce([stats.wall_time], "max")[0]
    row = {"epoch": epoch, "steps": steps, "samples": run.counters["samples"] + D.all_reduce([stats.samples])[0],
           "train_loss": sum(stats.step_losses) / len(stats.step_losses),
           "train_time": run.counters["train_time"] + wall, "elapsed": run.elapsed(),
           "images_per_s": stats.samples * info.world_size / max(stats.wall_time, 1e-9)}
    run.stop = evaluate_into(job, data, parts, run, row, epoch, steps)
    parts.model.train()  # evaluate() left the model in eval mode, halfway through an epoch
    log_row(job, run, row)
    return run.stop


def mark_step(job: Job, parts: Parts, run: Run, step: int, phase: str) -> None:
    """Where the epoch's ``step`` is, for the timeout report and the gradient fault."""
    job.progress.mark(run.steps_done + step, phase)
    if parts.grad_fault is not None:
        parts.grad_fault.step = run.steps_done + step


def log_ddp_checks(job: Job, checker: Optional[DDPEquivalence]) -> None:
    for check in checker.checks[len(checker.logged):] if checker is not None else []:
        checker.logged.append(check)
        job.log(f"DDP equivalence, step {check.step}: {'pass' if check.passed else 'FAIL'}, gradient margin "
                f"{check.grad_margin:.3g}, parameter margin {check.param_margin:.3g} (worst: {check.worst})")


def train_epoch(job: Job, data: Data, parts: Parts, run: Run, epoch: int, remaining: Optional[int]) -> dict:
    """Trains ``epoch``, at most ``remaining`` steps, adding its figures to ``run``; returns its row."""
    info = job.info
    if info.enabled:
        data.sampler_train.set_epoch(epoch)
    if parts.checker is not None:
        parts.checker.offset = run.steps_done
    options = StepOptions(
        parts.autocast_dtype, parts.scaler, synchronize=job.xpu.synchronize, max_steps=remaining,
        after_step=parts.lr_scheduler.step, progress=functools.partial(mark_step, job, parts, run),
        checks=parts.checker, pause=functools.partial(evaluate_within_epoch, job, data, parts, run, epoch))
    stats = train_one_epoch(parts.model, parts.criterion, data.loader_train, parts.optimizer, job.xpu.device, epoch,
                            job.args.clip_max_norm, log=job.log, options=options)
    log_ddp_checks(job, parts.checker)
    run.steps_done += stats.steps
    run.counters["samples"] += D.all_reduce([stats.samples])[0]
    # Both of the slowest rank: each rank's core time is within its own wall time, so the maxima
    # keep core_time <= train_time, which rank 0's wall time against another rank's core did not.
    wall, core = D.all_reduce([stats.wall_time, stats.core_time], "max")
    run.counters["train_time"] += wall
    run.counters["core_time"] += core
    run.step_losses.extend(D.all_reduce(stats.step_losses, "sum"))
    return {"epoch": epoch, "steps": run.steps_done, "samples": run.counters["samples"],
            "train_loss": stats.losses.get("loss"), "train_time": run.counters["train_time"],
            "elapsed": run.elapsed(), "images_per_s": stats.samples * info.world_size / stats.wall_time}


def end_epoch(job: Job, data: Data, parts: Parts, run: Run, epoch: int, row: dict) -> bool:
    """The epoch's evaluation when due (after a checkpoint that a resume would evaluate first), its row
    and its checkpoint; True when the run ends here."""
    args = job.args
    last = epoch + 1 == args.epochs or (args.max_steps is not None and run.steps_done >= args.max_steps) or run.stop
    due = (args.eval_every and (epoch + 1) % args.eval_every == 0) or last
    if due and run.evaluated_at != run.steps_done:
        checkpoint(job, data, parts, run, epoch, run.history + [row], pending=True)
        last = evaluate_into(job, data, parts, run, row, epoch, run.steps_done) or last
    elif run.evaluated_at == run.steps_done:  # the step's evaluation ran inside the epoch
        row.update({k: run.history[-1][k] for k in ("mAP", "AP50")})
        run.history.pop()
    log_row(job, run, row)
    checkpoint(job, data, parts, run, epoch, run.history, pending=False)
    return last


def train_loop(job: Job, data: Data, parts: Parts, run: Run) -> None:
    """The epochs from ``run.start_epoch``, until the last, ``--max-steps`` or the target mAP."""
    args = job.args
    for epoch in range(run.start_epoch, args.epochs):
        if run.pending_eval:  # trained before the interruption; only its evaluation is left
            row, run.pending_eval = run.history.pop(), False
        else:
            remaining = None if args.max_steps is None else args.max_steps - run.steps_done
            if remaining is not None and remaining <= 0:
                break
            row = train_epoch(job, data, parts, run, epoch, remaining)
        if end_epoch(job, data, parts, run, epoch, row):
            break


def summarize(job: Job, data: Data, parts: Parts, run: Run) -> dict:
    """result.json: the run's setup, its counters and curve, and every rank's parameter digest."""
    args, info, xpu = job.args, job.info, job.xpu
    digests = D.all_gather_object(param_digest(parts.model_without_ddp))
    mem_actual = D.all_reduce([xpu.max_memory_allocated() / 2**30], "max")[0]
    world = info.world_size
    return {
        "model": args.model, "dataset": "synthetic" if job.synthetic else str(data.coco_path),
        "device": str(xpu.device.type), "precision": args.precision, "world_size": world,
        "nnodes": world // info.local_world_size, "nproc_per_node": info.local_world_size, "backend": job.backend,
        "threads_per_rank": job.threads,
        "fix_hp": {"batch_size_per_device": args.batch_size, "global_batch_size": args.batch_size * world,
                   "lr": args.lr, "lr_backbone": args.lr_backbone, "weight_decay": args.weight_decay,
                   "lr_drop": args.lr_drop, "lr_schedule": args.lr_schedule, "clip_max_norm": args.clip_max_norm,
                   "epochs": args.epochs, "max_steps": args.max_steps, "seed": args.seed, "init_seed": args.init_seed,
                   "model_overrides": job.overrides},
        "e2e_time": run.elapsed(), "resumed": run.resumes, "steps": run.steps_done, **run.counters,
        "mAP": run.result["AP"], "best_mAP": run.best, "target_mAP": args.target_map, "target_reached": run.target_hit,
        "mem_actual_gib": mem_actual or None, "mem_total_gib": total_memory_gib(xpu),
        "curve": [{k: r[k] for k in ("epoch", "steps", "samples", "elapsed", "train_time", "mAP")}
                  for r in run.history if "mAP" in r],
        "step_losses": [v / world for v in run.step_losses], "param_digests": digests, "compiled": parts.compiled,
        "ddp_equivalence": parts.checker.summary() if parts.checker is not None else {
            "checked_steps": [], "passed": None,
            "note": "one rank: nothing to check" if not info.enabled else
                    "not checked: off (--ddp-check-steps 0) or fp16 with loss scaling"},
    }


def cli() -> int:
    """The command line's exit status: 0, or 130 on Ctrl-C (usage and run errors exit from ``main``)."""
    try:
        main()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())

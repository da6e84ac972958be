"""``python -m detr.train``: train and evaluate DETR with the reference recipe.

With no ``--coco-path`` it trains the ``tiny`` model on the generated synthetic COCO-format set.
Prints progress lines (step, loss, images/s, ETA), the COCO AP after each evaluation, and writes
checkpoints that ``--resume`` continues from.
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

import detr

from .data.coco import build_dataset, coco_api, num_classes
from .engine import evaluate, train_one_epoch
from .misc import collate_fn

PRECISIONS = {"fp32": None, "amp": "amp", "fp16": torch.float16, "bf16": torch.bfloat16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m detr.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco-path", help="COCO 2017 folder; default: the generated synthetic set")
    p.add_argument("--model", default=None, choices=sorted(detr.CONFIGS), help="default: tiny on the synthetic set, r50 on COCO")
    p.add_argument("--device", default="auto", help="torch device string, or auto (the accelerator if any, else cpu)")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="amp autocasts to float16 on accelerators, bfloat16 on the CPU")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many training steps in all")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-backbone", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-drop", type=int, default=200)
    p.add_argument("--clip-max-norm", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-limit", type=int, default=None, help="evaluate only the first N validation images")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="training short sides; default: the reference's 480..800 on COCO, 160..256 on the synthetic set")
    p.add_argument("--max-size", type=int, default=None, help="longest side; default 1333 on COCO, 320 on the synthetic set")
    p.add_argument("--val-size", type=int, default=None, help="validation short side; default 800 on COCO, 224 on the synthetic set")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpu-onednn", action="store_true", help="keep oneDNN convolutions on the CPU (fast for fixed shapes, slow to warm up per shape)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default="outputs", help="checkpoints and log.jsonl go here")
    p.add_argument("--resume", default=None, help="a checkpoint to continue from")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="model config override, e.g. hidden_dim=128; repeatable")
    return p


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None and accelerator.is_available():
            return accelerator.current_accelerator()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


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
    np.random.seed(seed)
    random.seed(seed)


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file first, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    synthetic = args.coco_path is None
    if synthetic:
        from .data.synthetic import ensure_synthetic

        coco_path = ensure_synthetic()
    else:
        coco_path = Path(args.coco_path)
    model_name = args.model or ("tiny" if synthetic else "r50")
    scales = args.scales or (list(range(160, 257, 32)) if synthetic else list(range(480, 801, 32)))
    max_size = args.max_size or (320 if synthetic else 1333)
    val_size = args.val_size or (224 if synthetic else 800)
    crop = dict(crop_sizes=(96, 192), resize_before_crop=(160, 192, 224)) if synthetic else {}
    device = resolve_device(args.device)
    if device.type == "cpu" and not args.cpu_onednn:
        # oneDNN builds a convolution kernel per input shape, seconds each on a small CPU, and
        # multi-scale training shows it a new shape almost every step.
        torch.backends.mkldnn.enabled = False
    seed_everything(args.seed)

    dataset_train = build_dataset("train", coco_path, scales=scales, max_size=max_size, **crop)
    dataset_val = build_dataset("val", coco_path, max_size=max_size, val_size=val_size)
    n_classes = num_classes(dataset_train)
    if args.train_limit:
        dataset_train = Subset(dataset_train, range(min(args.train_limit, len(dataset_train))))
    if args.val_limit:
        dataset_val = Subset(dataset_val, range(min(args.val_limit, len(dataset_val))))

    model, criterion, postprocess = detr.build(model_name, num_classes=n_classes, lr_backbone=args.lr_backbone, **parse_overrides(args.override))
    model.to(device)
    criterion.to(device)
    optimizer = torch.optim.AdamW(detr.param_groups(model, args.lr, args.lr_backbone), lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    autocast_dtype = PRECISIONS[args.precision]
    if autocast_dtype == "amp":
        autocast_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None

    g = torch.Generator().manual_seed(args.seed)
    loader_train = DataLoader(dataset_train, batch_size=args.batch_size, sampler=RandomSampler(dataset_train, generator=g),
                              drop_last=True, collate_fn=collate_fn, num_workers=args.num_workers)
    loader_val = DataLoader(dataset_val, batch_size=args.batch_size, sampler=SequentialSampler(dataset_val),
                            collate_fn=collate_fn, num_workers=args.num_workers)
    if len(loader_train) == 0:
        raise SystemExit(f"the training set has {len(dataset_train)} images, fewer than one batch of {args.batch_size}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, steps_done, history = 0, 0, []
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        start_epoch, steps_done, history = ckpt["epoch"] + 1, ckpt["steps"], ckpt["history"]
        g.set_state(ckpt["sampler_rng"])
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed from {args.resume} at epoch {start_epoch}, step {steps_done}", flush=True)

    print(f"training {model_name} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters) "
          f"on {device}, {len(dataset_train)} images from {coco_path}, batch {args.batch_size}, {args.precision}", flush=True)
    coco_gt = coco_api(dataset_val)
    result = {"AP": None}
    start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        remaining = None if args.max_steps is None else args.max_steps - steps_done
        if remaining is not None and remaining <= 0:
            break
        stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                autocast_dtype, scaler, max_steps=remaining, log=lambda s: print(s, flush=True))
        lr_scheduler.step()
        steps_done += stats.steps
        last = epoch + 1 == args.epochs or (args.max_steps is not None and steps_done >= args.max_steps)
        row = {"epoch": epoch, "steps": steps_done, "train_loss": stats.losses.get("loss"),
               "samples": stats.samples, "wall_time": stats.wall_time, "core_time": stats.core_time}
        if (args.eval_every and (epoch + 1) % args.eval_every == 0) or last:
            result = evaluate(model, postprocess, loader_val, coco_gt, device, autocast_dtype if autocast_dtype != torch.float16 else None)
            row["AP"] = result["AP"]
            print(f"epoch {epoch} mAP {result['AP']:.4f} AP50 {result['AP50']:.4f} ({stats.samples / stats.wall_time:.1f} img/s)", flush=True)
        history.append(row)
        with open(output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        save_checkpoint(output_dir / "checkpoint.pth", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "epoch": epoch, "steps": steps_done, "history": history, "args": vars(args),
            "sampler_rng": g.get_state(), "rng": torch.get_rng_state(),
        })
        if last:
            break
    print(f"done in {time.perf_counter() - start:.1f}s: mAP {result['AP'] if result['AP'] is not None else float('nan'):.4f}", flush=True)
    return {"AP": result["AP"], "stats": result.get("stats"), "history": history}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

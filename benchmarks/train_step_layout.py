"""The synthetic recipe's training step with the model in the contiguous (NCHW) layout and in
channels-last (NHWC), and channels-last with the input batch converted too: the three take steps
in turn on the same batches in one process, so that a shared machine's noise falls on all alike.
Prints each one's median step and its ratio to NCHW.

    python benchmarks/train_step_layout.py            # 50 timed steps after 10 warm-up steps
"""
import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, RandomSampler

import detr
from detr.data import build_dataset, ensure_synthetic
from detr.data.coco import num_classes
from detr.engine import train_step
from detr.misc import NestedTensor, collate_fn
from training.train import SYNTHETIC_DATA, TRAINING_SETUPS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = TRAINING_SETUPS["synthetic"]
    size = setup["scales"][0]
    dataset = build_dataset("train", ensure_synthetic(**SYNTHETIC_DATA), scales=[size], max_size=size, crop=False)
    variants = {}
    for name in ("NCHW", "channels-last", "channels-last, input too"):
        torch.manual_seed(0)
        model, criterion, _ = detr.build(setup["model"], num_classes=num_classes(dataset),
                                         lr_backbone=setup["lr_backbone"], **setup["overrides"])
        if name != "NCHW":
            model.to(memory_format=torch.channels_last)
        variants[name] = (model, criterion, detr.Recipe(setup["lr"], setup["lr_backbone"]).optimizer(model), [])
    batches = iter(DataLoader(dataset, batch_size=setup["batch_size"], sampler=RandomSampler(dataset),
                              collate_fn=collate_fn, drop_last=True))
    for i in range(args.warmup + args.steps):
        samples, targets = next(batches)
        for name, (model, criterion, optimizer, times) in variants.items():
            x = samples
            if name.endswith("input too"):
                x = NestedTensor(samples.tensors.contiguous(memory_format=torch.channels_last), samples.mask)
            t0 = time.perf_counter()
            train_step(model, criterion, x, targets, optimizer)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    base = statistics.median(variants["NCHW"][3])
    for name, (*_, times) in variants.items():
        median = statistics.median(times)
        print(f"{name:26s} median step {median * 1000:6.1f} ms  ratio to NCHW {median / base:.3f}")


if __name__ == "__main__":
    main()

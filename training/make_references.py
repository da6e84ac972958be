"""Writes the reference curves shipped with the suite: the embedded default (tiny DETR, the
synthetic set, 1x1, fp32) trained on the CPU, once per seed, with each run's provenance (command,
torch version, machine, date).

    python -m training.make_references --seeds 42 43 44 45 46            # the shipped file's first five
    python -m training.make_references --append --seeds 47 48 49 50 51   # and the next five

Each run trains the whole recipe, evaluating every 128 steps, and is not stopped at a target:
``--target`` only records when each seed first reached it. ``--max-steps`` keeps the first
evaluations of the unchanged recipe (its schedule counts epochs, so a shorter run is a prefix of
the full one). The runs are sequential and use every core, so that their times are those of a
1x1 run on this machine; nothing else should run meanwhile.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from runtime.device import cpu_model
from training.convergence import read_curve_file, save_curves
from training.train import synthetic_recipe

REFERENCES = Path(__file__).resolve().parent / "references"
DEFAULT = REFERENCES / "synthetic_tiny_1x1_fp32.json"


def first_reaching(curve, target: float) -> Optional[dict]:
    """The first evaluation of ``curve`` at or above ``target``: its steps, samples and times."""
    for point in curve:
        if point["mAP"] >= target:
            return {k: point[k] for k in ("steps", "samples", "elapsed", "train_time") if k in point}
    return None


def run_seed(seed: int, threads: int, max_steps: Optional[int], work: Path, target: float) -> dict:
    out = work / f"seed{seed}"
    command = (
        [
            sys.executable,
            "-m",
            "training.train",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--seed",
            str(seed),
            "--threads",
            str(threads),
        ]
        + (["--max-steps", str(max_steps)] if max_steps else [])
        + ["--output-dir", str(out)]
    )
    subprocess.run(command, check=True)
    result = json.loads((out / "result.json").read_text())
    shown = ["python", "-m", "training.train", *command[3:-2]]
    return {"curve": result["curve"], "provenance": {
        "seed": seed, "command": " ".join(shown), "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {threads} threads", "os": platform.platform(),
        "date": time.strftime("%Y-%m-%d"), "e2e_time": round(result["e2e_time"], 1), "final_mAP": result["mAP"],
        "target": target, "first_at_target": first_reaching(result["curve"], target)}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (default: the whole recipe)")
    p.add_argument(
        "--target", type=float, default=0.40, help="record when each seed first reaches this mAP (default 0.40)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT)
    p.add_argument(
        "--append",
        action="store_true",
        help="add the seeds to --out, which must hold this recipe's curves (more seeds narrow the verdict's intervals)",
    )
    args = p.parse_args(argv)
    runs = existing_runs(args.out, args.seeds, args.max_steps) if args.append else []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            runs.append(run_seed(seed, args.threads, args.max_steps, Path(work), args.target))
            done = runs[-1]["provenance"]
            print(f"seed {seed}: final mAP {done['final_mAP']:.4f} in {done['e2e_time']:.0f}s; "
                  f"{args.target} first at {done['first_at_target']}", flush=True)
            save(args, runs)  # each finished seed is kept, should a later one fail
    print(f"wrote {args.out}")


def existing_runs(path: Path, seeds, max_steps: Optional[int]) -> list:
    """The runs already in ``path``, refused when they were made with another recipe or another
    ``--max-steps``, or hold one of ``seeds``."""
    try:
        curves, meta = read_curve_file(path)
    except ValueError as exc:
        raise SystemExit(f"--append: {exc}") from None
    if meta.get("recipe") != synthetic_recipe():
        raise SystemExit(f"--append: {path} was made with another recipe than this code's")
    if meta.get("max_steps") != max_steps:
        raise SystemExit(f"--append: {path} was made with --max-steps {meta.get('max_steps')}, not {max_steps}")
    made = meta.get("provenance") or []
    if len(made) != len(curves):
        raise SystemExit(f"--append: {path} has {len(curves)} curves but {len(made)} provenance records")
    again = sorted({m["seed"] for m in made} & set(seeds))
    if again:
        raise SystemExit(f"--append: {path} already holds seed(s) {', '.join(map(str, again))}")
    return [{"curve": c, "provenance": m} for c, m in zip(curves, made)]


def save(args: argparse.Namespace, runs) -> None:
    save_curves(args.out, [r["curve"] for r in runs], {
        "device": "cpu", "config": "1x1", "model": "tiny", "dataset": "synthetic", "precision": "fp32",
        "max_steps": args.max_steps, "recipe": synthetic_recipe(),
        "provenance": [r["provenance"] for r in runs]})


if __name__ == "__main__":
    main()

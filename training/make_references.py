"""Writes the reference curves shipped with the suite: the embedded default (tiny DETR, the
synthetic set, 1x1, fp32) trained on the CPU, once per seed, with each run's provenance (command,
torch version, machine, date).

    python -m training.make_references --seeds 42 43 44 45 46 --max-steps 1024

``--max-steps`` keeps the first evaluations of the unchanged recipe (its schedule counts epochs,
so a shorter run is a prefix of the full one). The runs are sequential and use every core.
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

from detr.device import cpu_model
from training.convergence import save_curves

REFERENCES = Path(__file__).resolve().parent / "references"
DEFAULT = REFERENCES / "synthetic_tiny_1x1_fp32.json"


def run_seed(seed: int, threads: int, max_steps: Optional[int], work: Path) -> dict:
    out = work / f"seed{seed}"
    command = [sys.executable, "-m", "detr.train", "--device", "cpu", "--precision", "fp32", "--seed", str(seed),
               "--threads", str(threads)] + (["--max-steps", str(max_steps)] if max_steps else []) + ["--output-dir", str(out)]
    subprocess.run(command, check=True)
    result = json.loads((out / "result.json").read_text())
    shown = ["python", "-m", "detr.train", *command[3:-2]]
    return {"curve": result["curve"], "provenance": {
        "seed": seed, "command": " ".join(shown), "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {threads} threads", "os": platform.platform(),
        "date": time.strftime("%Y-%m-%d"), "e2e_time": round(result["e2e_time"], 1), "final_mAP": result["mAP"]}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (default: the whole recipe)")
    p.add_argument("--out", type=Path, default=DEFAULT)
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            runs.append(run_seed(seed, args.threads, args.max_steps, Path(work)))
            print(f"seed {seed}: final mAP {runs[-1]['provenance']['final_mAP']:.4f} in {runs[-1]['provenance']['e2e_time']:.0f}s", flush=True)
    save_curves(args.out, [r["curve"] for r in runs], {
        "device": "cpu", "config": "1x1", "model": "tiny", "dataset": "synthetic", "precision": "fp32",
        "max_steps": args.max_steps,
        "provenance": [r["provenance"] for r in runs]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

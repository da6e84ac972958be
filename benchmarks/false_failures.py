"""The whole-run judgement's false-failure rate and power, as probabilities over real runs: one part
of the tiny model (default: train 3 steps, which only the ensemble judges) compared again and again,
each time with another seed of the ensemble's perturbations and of the device's own ulp draws, on
correct devices that differ from the CPU everywhere and on devices with a small AdamW fault.
Prints, per device and statistic (:func:`parity.ensemble.scale`), how many runs failed and the
median and largest worst end-to-end margin; the statistics judge the same runs.

    python benchmarks/false_failures.py                      # 10 seeds, train 3 steps, the part's own statistic
    python benchmarks/false_failures.py --seeds 30 --statistic rms median
    python benchmarks/false_failures.py --seeds 20 --part "train step"
    python benchmarks/false_failures.py --seeds 30 --part backbone --ensemble-size 3 5
    python benchmarks/false_failures.py --seeds 6 --part backbone --suite-batch --compile inductor --ensemble-size 3 5 8
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detr  # noqa: E402
from fixtures.models import DEFAULT_SIZES, SEED, make_batch  # noqa: E402
from fixtures.parts import PARTS  # noqa: E402
from parity.compare import compare_part  # noqa: E402
from parity.ensemble import ENSEMBLE_SIZE, STATISTICS  # noqa: E402
from parity.errormodel import FAITHFUL_OPS  # noqa: E402
from parity.faults import parse_fault  # noqa: E402
from runtime.compiler import make_spec  # noqa: E402
from tests.test_fault_catalogue import tiny_parts  # noqa: E402

FAITHFUL = [f"aten.{op}:ulp=1" for op in FAITHFUL_OPS]
# (name, device, fault specs, whether a correct device): the correct ones must pass every time
CORRECT = [
    ("cpu-splitk", "cpu-splitk", [], True),
    ("faithful rounding", "cpu", FAITHFUL, True),
    ("cpu-splitk + faithful rounding", "cpu-splitk", FAITHFUL, True),
]
# Small dense faults, for the power of the end-to-end judgement alone (a faulty row counts as
# detected when its worst end-to-end margin exceeds 1, whatever the op replay says).
FAULTY = {
    "train 3 steps": [("AdamW update 3e-7 too large", "cpu", ["aten.addcdiv_:scale=1.0000003"], False),
                      ("first moment 3e-5 off", "cpu", ["aten.lerp_:scale=1.00003"], False)],
    "other": [("convolutions 3e-6 too large", "cpu", ["aten.convolution:scale=1.000003"], False),
              ("matmuls 3e-6 too large", "cpu", [f"aten.{op}:scale=1.000003" for op in ("mm", "addmm", "bmm")],
               False)],
}


def suite_parts():
    """Like ``tiny_parts``, on the batch ``pytest -m xpu --model-config tiny`` judges."""
    torch.manual_seed(SEED)
    model, criterion, postprocess = detr.build("tiny")
    batch = make_batch(2, DEFAULT_SIZES, num_classes=model.class_embed.out_features - 1)
    components = (model.eval(), criterion, postprocess)
    return {name: (*part.build(components, batch), part.run) for name, part in PARTS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--part", default="train 3 steps", choices=sorted(PARTS))
    parser.add_argument("--statistic", nargs="+", choices=STATISTICS,
                        help="default: the part's own (PARTS[part].judge)")
    parser.add_argument("--ensemble-size", nargs="+", type=int, default=[ENSEMBLE_SIZE],
                        help=f"perturbed CPU runs besides the baseline (default {ENSEMBLE_SIZE})")
    parser.add_argument("--suite-batch", action="store_true",
                        help="the suite's parity batch (two images of 288x256, 256x288) instead of the catalogue's "
                             "small images: more activations, so more near-ties a correct device may flip")
    parser.add_argument("--end-to-end-only", action="store_true", help="skip the op replay (what is measured here "
                        "is the end-to-end judgement; a part's op replay does not depend on the ensemble)")
    parser.add_argument("--compile", metavar="BACKEND", help="one correct device only: this CPU's run through "
                        "torch.compile with BACKEND, judged at the compiled depth (no bisection)")
    args = parser.parse_args()
    module, inputs, run = suite_parts()[args.part] if args.suite_batch else tiny_parts()[args.part]
    judge = dict(PARTS[args.part].judge)
    if args.end_to_end_only:
        judge["replay_ops"] = False
    statistics_ = args.statistic or [judge.get("statistic", "rms")]
    judge.pop("statistic", None)
    devices = CORRECT + FAULTY.get(args.part, FAULTY["other"])
    if args.compile:
        devices = [(f"cpu through {args.compile}", "cpu", [], True)]
        judge.update(whole_run=False, replay_ops=False, compile=make_spec(args.compile, bisect=False))
    print(f"{args.part}, tiny, {args.seeds} seeds per device from {args.first_seed}")
    variants = [(s, size) for s in statistics_ for size in args.ensemble_size]
    margins = {(name, v): [] for name, *_ in devices for v in variants}
    failed = dict.fromkeys(margins, 0)
    start = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:  # seed by seed, so that the devices share each seed's cached ensemble
        for name, device, specs, correct in devices:
            for statistic, size in variants:
                faults = [parse_fault(spec, seed=1000 * seed + i) for i, spec in enumerate(specs)]
                result = compare_part(args.part, module, inputs, run, device, "fp32", faults, seed=seed,
                                      statistic=statistic, ensemble_size=size, **judge)
                worst = max(result.end_to_end + result.compiled, key=lambda e: e.judgement.margin, default=None)
                margin = worst.judgement.margin if worst else 0.0
                margins[name, (statistic, size)].append(margin)
                failed[name, (statistic, size)] += not result.passed if correct else margin > 1
                print(f"  {name}, {statistic}, {size} members, seed {seed}: {'pass' if result.passed else 'FAIL'} "
                      f"at {margin:.3f} ({worst.name if worst else 'identical'})", file=sys.stderr, flush=True)
    for name, _, _, correct in devices:
        for statistic, size in variants:
            what = "false failures" if correct else "detected"
            m = margins[name, (statistic, size)]
            print(f"{name:32s} {statistic:6s} {size} members: {what} {failed[name, (statistic, size)]}/{args.seeds}; "
                  f"worst end-to-end margin median {statistics.median(m):.3f}, max {max(m):.3f}, min {min(m):.3f}")
    print(f"{(time.perf_counter() - start) / args.seeds:.0f} s per seed for the {len(devices)} devices")


if __name__ == "__main__":
    main()

"""The whole-run judgement's false-failure rate and power, as probabilities over real runs: one part
of the tiny model (default: train 3 steps, which only the ensemble judges) compared again and again,
each time with another seed of the ensemble's perturbations and of the device's own ulp draws, on
correct devices that differ from the CPU everywhere and on devices with a small AdamW fault.
Prints, per device, how many runs failed and the median and largest worst end-to-end margin.

    python benchmarks/false_failures.py                      # 10 seeds, train 3 steps
    python benchmarks/false_failures.py --seeds 20 --part "train step"
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures.parts import PARTS  # noqa: E402
from parity.compare import compare_part  # noqa: E402
from parity.errormodel import FAITHFUL_OPS  # noqa: E402
from parity.faults import parse_fault  # noqa: E402
from tests.test_fault_catalogue import tiny_parts  # noqa: E402

FAITHFUL = [f"aten.{op}:ulp=1" for op in FAITHFUL_OPS]
# (name, device, fault specs, whether a correct device): the correct ones must pass every time
DEVICES = [
    ("cpu-splitk", "cpu-splitk", [], True),
    ("faithful rounding", "cpu", FAITHFUL, True),
    ("cpu-splitk + faithful rounding", "cpu-splitk", FAITHFUL, True),
    ("AdamW update 3e-7 too large", "cpu", ["aten.addcdiv_:scale=1.0000003"], False),
    ("first moment 3e-5 off", "cpu", ["aten.lerp_:scale=1.00003"], False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--part", default="train 3 steps", choices=sorted(PARTS))
    args = parser.parse_args()
    module, inputs, run = tiny_parts()[args.part]
    print(f"{args.part}, tiny, {args.seeds} seeds per device")
    margins = {name: [] for name, *_ in DEVICES}
    failed = dict.fromkeys(margins, 0)
    start = time.perf_counter()
    for seed in range(args.seeds):  # seed by seed, so that the devices share each seed's cached ensemble
        for name, device, specs, _ in DEVICES:
            faults = [parse_fault(spec, seed=1000 * seed + i) for i, spec in enumerate(specs)]
            result = compare_part(args.part, module, inputs, run, device, "fp32", faults, seed=seed,
                                  **PARTS[args.part].judge)
            margins[name].append(result.worst_end_to_end().judgement.margin)
            failed[name] += not result.passed
            print(f"  {name}, seed {seed}: {'pass' if result.passed else 'FAIL'} at {margins[name][-1]:.3f}",
                  file=sys.stderr, flush=True)
    for name, _, _, correct in DEVICES:
        what = "false failures" if correct else "detected"
        print(f"{name:32s} {what} {failed[name]}/{args.seeds}; worst end-to-end margin median "
              f"{statistics.median(margins[name]):.3f}, max {max(margins[name]):.3f}, "
              f"min {min(margins[name]):.3f}")
    print(f"{(time.perf_counter() - start) / args.seeds:.0f} s per seed for the {len(DEVICES)} devices")


if __name__ == "__main__":
    main()

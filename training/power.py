"""The power of the convergence verdict, measured on real runs: the shipped reference seeds, each
resampled as a device run against the others.

For m device runs, every set of m of the n seeds (or, where there are more than ``DRAWS`` sets,
that many drawn at random with a fixed seed) is judged (their mean) against the other n - m,
after a change that a slower or a worse device makes: its curve stretched over ``factor`` times
the trained samples (the same mAPs, reached later), or every mAP multiplied by ``factor``. With
``factor`` 1 the fraction that fails is the false-positive rate on real runs; otherwise it is the
probability of detection. Each draw is a real seed's run, with that seed's noise, which a shifted
mean curve (noise-free) does not have. The reference side has n - m seeds, not the n a device run
is judged against, so these figures are slightly pessimistic.

    python -m training.power            # the table for the shipped default file
"""
import argparse
import itertools
import math
import random
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from .convergence import Curve, judge_against_seeds, judge_sign_off, read_curve_file
from .make_references import DEFAULT

DRAWS = 2000  # sets judged per rate at most: the rate's standard error is then at most 1.1 %
STRETCHES = (1.0, 1.1, 1.2, 1.25, 1.3, 1.4, 1.45, 1.5, 1.6, 1.8, 2.0)
LOWERINGS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.69, 0.6, 0.5)


def stretched(curve: Curve, factor: float) -> Curve:
    """A device that learns ``factor`` times more slowly per image: the same mAPs, reached later."""
    return [{**p, "samples": p["samples"] * factor} for p in curve]


def lowered(curve: Curve, factor: float) -> Curve:
    """A device whose every evaluation reaches ``factor`` times the mAP."""
    return [{**p, "mAP": p["mAP"] * factor if p.get("mAP") is not None else None} for p in curve]


def subsets(n: int, runs: int, draws: int = DRAWS, seed: int = 0) -> List[tuple]:
    """Every ``runs``-subset of ``range(n)``, or ``draws`` of them drawn at random (without repeats)
    where there are more."""
    if math.comb(n, runs) <= draws:
        return list(itertools.combinations(range(n), runs))
    rng, chosen = random.Random(seed), set()
    while len(chosen) < draws:
        chosen.add(tuple(sorted(rng.sample(range(n), runs))))
    return sorted(chosen)


def detection_rate(curves: Sequence[Curve], change: Callable[[Curve, float], Curve], factor: float,
                   runs: int = 1, draws: int = DRAWS, judge: Callable = judge_against_seeds,
                   **judge_options) -> float:
    """The fraction of the ``runs``-subsets of ``curves`` (see :func:`subsets`), changed by
    ``factor``, that ``judge`` (the default verdict, or :func:`judge_sign_off`) fails against the
    remaining curves."""
    failed = total = 0
    for chosen in subsets(len(curves), runs, draws):
        device = [change(curves[k], factor) for k in chosen]
        reference = [c for k, c in enumerate(curves) if k not in chosen]
        failed += not judge(device, reference, **judge_options).passed
        total += 1
    return failed / total


def power_table(curves: Sequence[Curve], runs: Sequence[int] = (1, 3),
                judge: Callable = judge_against_seeds) -> Dict[str, List[List[float]]]:
    """{"stretched"|"lowered": [[factor, rate for each m in runs], ...]}."""
    table = {}
    for name, change, factors in (("stretched", stretched, STRETCHES), ("lowered", lowered, LOWERINGS)):
        table[name] = [[f] + [detection_rate(curves, change, f, m, judge=judge) for m in runs] for f in factors]
    return table


def main(argv: Sequence[str] = ()) -> None:
    p = argparse.ArgumentParser("python -m training.power", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", type=Path, default=DEFAULT, help="a reference file (default: the shipped one)")
    p.add_argument("--runs", type=int, nargs="+", default=[1, 3], help="device runs per verdict (default 1 3)")
    p.add_argument("--sign-off", action="store_true",
                   help="the sign-off verdict (the default one and the one-sided curve-mean test, both passed)")
    args = p.parse_args(list(argv) or None)
    curves, _ = read_curve_file(args.curves)
    table = power_table(curves, args.runs, judge_sign_off if args.sign_off else judge_against_seeds)
    header = " | ".join(f"{m} run{'s' if m > 1 else ''}" for m in args.runs)
    for name, rows in table.items():
        what = "samples needed (x)" if name == "stretched" else "mAP reached (x)"
        print(f"\n| {what} | {header} |\n|---|" + "---|" * len(args.runs))
        for factor, *rates in rows:
            print(f"| {factor:g} | " + " | ".join(f"{r:.0%}" for r in rates) + " |")
    print(f"\n{len(curves)} seeds of {args.curves.name}; each draw against the other {len(curves)} - m")


if __name__ == "__main__":
    main()

"""How much the benchmark harness adds to the time of the step it measures.

The training step is timed twice over, in one process, interleaved pair by pair (the order
alternating, so that drift and warming caches favour neither):
  harness  as suite/test_benchmark.py times it: pytest-benchmark's pedantic runner around
           ``step()``, i.e. the fault-injection context, the step, the device synchronisation;
  bare     ``step.body()`` then a synchronisation, between two perf_counter reads.
Prints both medians, the ratio of the medians and the median of the per-pair ratios (the verdict:
pairs share the machine's load of the moment), and exits 1 when the harness adds 2% or more.

    python benchmarks/overhead.py                     # tiny, 1 image of 64 px, on the CPU
    python benchmarks/overhead.py --xpu cuda --model-config r50 --batch-size 8 --image-size 800
"""
import argparse
import inspect
import statistics
import sys
import time
import warnings
from types import SimpleNamespace
from typing import List, Tuple

import torch
from pytest_benchmark.fixture import BenchmarkFixture
from pytest_benchmark.utils import NameWrapper

from fixtures.steps import Step, TrainStep, Workload
from runtime.device import Device, import_plugins, resolve_device

LIMIT = 0.02


class _QuietLogger:
    def debug(self, *args, **kwargs) -> None:
        pass

    info = warning = error = debug


def benchmark_fixture(name: str) -> BenchmarkFixture:
    """A fixture built as pytest-benchmark's ``benchmark`` fixture builds it, with its default options."""
    options = dict(disable_gc=False, timer=NameWrapper(time.perf_counter), min_rounds=5, min_time=5e-6,
                   max_time=1.0, warmup=False, warmup_iterations=100000, calibration_precision=10,
                   add_stats=lambda stats: None, logger=_QuietLogger(), warner=warnings.warn, disabled=False,
                   cprofile=False, cprofile_loops=None, cprofile_dump=False)
    accepted = inspect.signature(BenchmarkFixture).parameters
    node = SimpleNamespace(name=name, _nodeid=f"benchmarks/overhead.py::{name}")
    return BenchmarkFixture(node, **{k: v for k, v in options.items() if k in accepted})


def harness_round(step: Step) -> float:
    """Seconds of one round timed by pytest-benchmark, exactly as the suite's benchmark calls it."""
    fixture = benchmark_fixture("test_train_step")
    fixture.pedantic(step, rounds=1, iterations=1, warmup_rounds=0)
    return fixture.stats.stats.data[0]


def bare_round(step: Step) -> float:
    start = time.perf_counter()
    step.body()
    step.device.synchronize()
    return time.perf_counter() - start


def measure(step: Step, pairs: int, warmup: int) -> Tuple[List[float], List[float]]:
    """(harness seconds, bare seconds), one of each per pair."""
    for _ in range(warmup):
        step()
    harness, bare = [], []
    for i in range(pairs):
        if i % 2:
            bare.append(bare_round(step))
            harness.append(harness_round(step))
        else:
            harness.append(harness_round(step))
            bare.append(bare_round(step))
    return harness, bare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xpu", default="cpu", help="device under test (default cpu)")
    parser.add_argument("--xpu-plugin", action="append", default=[], help="vendor extension to import first")
    parser.add_argument("--model-config", default="tiny", choices=("tiny", "r50"))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=60, help="interleaved (harness, bare) pairs (default 60)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_plugins(args.xpu_plugin)
    device = Device(resolve_device(args.xpu))
    workload = Workload(args.model_config, args.batch_size, args.image_size)
    with TrainStep(workload, device, args.precision) as step:
        harness, bare = measure(step, args.pairs, args.warmup)
    med_h, med_b = statistics.median(harness), statistics.median(bare)
    paired = statistics.median(h / b for h, b in zip(harness, bare))
    overhead = paired - 1
    print(f"training step {workload.id} {args.precision} on {device.device} ({torch.get_num_threads()} threads), "
          f"{args.pairs} interleaved pairs")
    print(f"  harness (pytest-benchmark pedantic, step()): median {med_h * 1e3:.2f} ms")
    print(f"  bare loop (step.body() + synchronize):       median {med_b * 1e3:.2f} ms")
    print(f"  ratio of medians {med_h / med_b:.4f}; median of per-pair ratios {paired:.4f}")
    verdict = "PASS" if overhead < LIMIT else "FAIL"
    print(f"{verdict}: harness overhead {overhead:+.2%} (limit {LIMIT:.0%})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

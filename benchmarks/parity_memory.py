"""Peak resident memory and wall time of the parity suite with the replay trace in memory and
spilled to a temporary file (``DETR_PARITY_SPILL=0`` and ``1``), measured with ``/usr/bin/time -v``
in the same run. Prints both and their ratios.

    python benchmarks/parity_memory.py                          # r50 train step parts on the CPU
    python benchmarks/parity_memory.py -- -m xpu                # the whole conformance run
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(spill: bool, pytest_args) -> "tuple[float, float]":
    """(peak resident GiB, wall seconds) of one pytest run."""
    with tempfile.TemporaryDirectory() as reports:
        result = subprocess.run(
            ["/usr/bin/time", "-v", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--report-dir={reports}", *pytest_args],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DETR_PARITY_SPILL": "1" if spill else "0"})
    if result.returncode != 0:
        sys.exit(f"pytest failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 2**20
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":"))))
    return rss, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pytest_args", nargs="*", default=["suite/test_train_step.py", "-m", "xpu", "--xpu", "cpu"],
                        help="what pytest runs (after --); default: the r50 training-step parts on the CPU")
    args = parser.parse_args()
    if not os.path.exists("/usr/bin/time"):
        sys.exit("/usr/bin/time is needed (GNU time, for -v)")
    in_memory = measure(False, args.pytest_args)
    spilled = measure(True, args.pytest_args)
    print(f"pytest {' '.join(args.pytest_args)}")
    print(f"trace in memory: peak RSS {in_memory[0]:.2f} GiB, wall {in_memory[1]:.1f} s")
    print(f"trace spilled:   peak RSS {spilled[0]:.2f} GiB, wall {spilled[1]:.1f} s")
    print(f"ratio spilled / in memory: memory {spilled[0] / in_memory[0]:.2f}, time {spilled[1] / in_memory[1]:.2f}")


if __name__ == "__main__":
    main()

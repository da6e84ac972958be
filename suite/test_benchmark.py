"""The DETR core training step and inference step on the device under test, timed with
pytest-benchmark.

One round is one step with the batch already on the device, synchronised before the timer stops:
FlagPerf's p_core for one device. ``extra_info`` of each saved benchmark holds samples/s, the
FLOPs per sample, the achieved TFLOP/s, memory and the fixed hyper-parameters (see
fixtures/benchmark.py). ``--inject-fault`` specs apply inside the timed region.

With ``--compile BACKEND`` each step is timed a second time through ``torch.compile``, in the same
group, after the eager one: its ``extra_info`` adds the compile time (outside the rounds), the
graphs, and ``speedup_over_eager``, the eager median over the compiled one from this run.
"""
import pytest

from fixtures.benchmark import run_benchmark
from fixtures.steps import InferenceStep, TrainStep

pytestmark = pytest.mark.benchmark


def test_train_step(benchmark, xpu, precision, workload, bench_options, injected_faults, pytestconfig):
    """Forward, criterion with Hungarian matching, backward, clip at 0.1, AdamW step."""
    benchmark.group = f"train {workload.model} {precision}"
    with TrainStep(workload, xpu, precision, injected_faults) as step:
        run_benchmark(benchmark, step, bench_options.warmup, pytestconfig)


def test_inference_step(benchmark, xpu, precision, workload, bench_options, injected_faults, pytestconfig):
    """Forward in eval mode and PostProcess; DETR-R50 published 0.036 s per image (``s_per_image``)."""
    benchmark.group = f"inference {workload.model} {precision}"
    with InferenceStep(workload, xpu, precision, injected_faults) as step:
        run_benchmark(benchmark, step, bench_options.warmup, pytestconfig)


def test_train_step_compiled(benchmark, xpu, precision, workload, bench_options, compile_spec, pytestconfig):
    """The train step through ``torch.compile`` (the optimizer step eager unless --compile-optimizer)."""
    benchmark.group = f"train {workload.model} {precision}"
    with TrainStep(workload, xpu, precision, compile=compile_spec) as step:
        run_benchmark(benchmark, step, bench_options.warmup, pytestconfig)


def test_inference_step_compiled(benchmark, xpu, precision, workload, bench_options, compile_spec, pytestconfig):
    """The inference step through ``torch.compile``."""
    benchmark.group = f"inference {workload.model} {precision}"
    with InferenceStep(workload, xpu, precision, compile=compile_spec) as step:
        run_benchmark(benchmark, step, bench_options.warmup, pytestconfig)

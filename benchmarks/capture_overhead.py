"""What op capture costs: one DETR part's forward and backward run bare, and run under the parity
engine's capture (every aten op recorded with its module, inputs and outputs copied to the CPU),
interleaved pair by pair in one process. Prints the medians and their ratio.

    python benchmarks/capture_overhead.py                       # tiny transformer on the CPU
    python benchmarks/capture_overhead.py --model-config r50 --part backbone --keep stats
"""
import argparse
import statistics
import time

import torch

import detr
from detr.misc import nested_tensor_from_tensor_list
from fixtures.models import make_batch
from parity.capture import capture


def part_step(name: str, model_config: str):
    """A callable running one part's forward and backward on fixed inputs, and its root module."""
    torch.manual_seed(0)
    model, _, _ = detr.build(model_config)
    model.eval()
    padded = nested_tensor_from_tensor_list(make_batch()[0])
    if name == "backbone":
        body = model.backbone[0]
        pixels = padded.tensors.clone().requires_grad_(True)

        def step():
            from detr.misc import NestedTensor

            body(NestedTensor(pixels, padded.mask))["0"].tensors.sum().backward()

        return step, body
    with torch.no_grad():
        features, pos = model.backbone(padded)
        src = model.input_proj(features[-1].tensors)
    transformer = model.transformer

    def step():
        hs, memory = transformer(src, features[-1].mask, model.query_embed.weight, pos[-1])
        (hs.sum() + memory.sum()).backward()

    return step, transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", default="tiny", choices=sorted(detr.CONFIGS))
    parser.add_argument("--part", default="transformer", choices=["transformer", "backbone"])
    parser.add_argument("--keep", default="tensors", choices=["tensors", "outputs", "stats"])
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    step, root = part_step(args.part, args.model_config)
    step()  # warm-up
    bare, captured, ops = [], [], 0
    for i in range(args.pairs):
        for mode in (("bare", "capture") if i % 2 == 0 else ("capture", "bare")):
            start = time.perf_counter()
            if mode == "bare":
                step()
                bare.append(time.perf_counter() - start)
            else:
                _, trace = capture(step, root_module=root, keep=args.keep)
                captured.append(time.perf_counter() - start)
                ops = len(trace)
    b, c = statistics.median(bare), statistics.median(captured)
    print(f"{args.model_config} {args.part}, forward + backward, keep={args.keep}: {ops} ops captured")
    print(f"bare     median {b * 1e3:8.1f} ms")
    print(f"capture  median {c * 1e3:8.1f} ms")
    print(f"capture / bare = {c / b:.2f}x ({(c - b) / ops * 1e6:.0f} us per op)")


if __name__ == "__main__":
    main()

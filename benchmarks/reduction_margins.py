"""Margins of the reduction rule at large K: correct fp32 summation orders, which must pass, beside
precision leaks, which must fail (margin above 1), for mm, sum and a convolution's weight gradient
from K = 512 to 1e6, layer norm's weight and bias gradients (sums over K tokens) and softmax over rows
of up to 16384, with the per-element bound alone (the rule before the reduction-rms test) and
with the whole rule.

    python benchmarks/reduction_margins.py [--k 512 8192 131072 1048576] [--rows 16] [--data normal]

The margin of a variant is its error against the float64 golden over the allowance that
``parity.errormodel.ErrorModel`` gives the op on the same inputs: standard-normal terms (mixed
signs, as gradients have), ``uniform`` (all positive: the sum drifts) or ``relu`` (half zeros).
The correct orders are real fp32 arithmetic: torch's own kernel (the CPU baseline), one accumulator
adding the terms in order (sequential), the terms reversed, split-K with 2, 16 and 256 partial sums
added in fp32, pairwise (a tree of halves, 64 terms at the leaves) and, for sum, 8 and 256 strided
lanes. The leaks: TF32-rounded inputs, the output rounded to bf16, and a relative bias of 1e-4.
"""
import argparse
import dataclasses
import time

import torch

from parity.errormodel import ErrorModel
from parity.judge import judge_float
from parity.precision import round_to_tf32

DATA = {"normal": lambda shape, g: torch.randn(shape, generator=g),
        "uniform": lambda shape, g: torch.rand(shape, generator=g),
        "relu": lambda shape, g: torch.randn(shape, generator=g).clamp(min=0)}


def split_k(parts, a, b=None):
    """a @ b (or a.sum(1)) as ``parts`` fp32 partial results over K, added in fp32 in order."""
    k = a.shape[1]
    bounds = [round(i * k / parts) for i in range(parts + 1)]
    total = None
    for lo, hi in zip(bounds, bounds[1:]):
        part = a[:, lo:hi] @ b[lo:hi] if b is not None else a[:, lo:hi].sum(1)
        total = part if total is None else total + part
    return total


def sequential(a, b=None, chunk=4096):
    """One fp32 accumulator per output, the terms added one at a time in order (in chunks of
    ``chunk`` terms at once across the outputs, for speed; the order per output is the same)."""
    k = a.shape[1]
    total = torch.zeros(a.shape[0], b.shape[1] if b is not None else 1)
    for lo in range(0, k, chunk):
        terms = a[:, lo:lo + chunk, None] * b[None, lo:lo + chunk] if b is not None else a[:, lo:lo + chunk, None]
        for j in range(terms.shape[1]):
            total += terms[:, j]
    return total if b is not None else total[:, 0]


def lanes(a, count):
    """a.sum(1) with ``count`` fp32 accumulators, lane j adding the terms j, j + count, ... in order."""
    x = torch.nn.functional.pad(a, (0, -a.shape[1] % count)).reshape(a.shape[0], -1, count)
    acc = torch.zeros(a.shape[0], count)
    for i in range(x.shape[1]):
        acc += x[:, i]
    return acc.sum(1)


def pairwise(a, b=None, leaf=64):
    k = a.shape[1]
    if k <= leaf:
        return a @ b if b is not None else a.sum(1)
    half = k // 2
    return (pairwise(a[:, :half], None if b is None else b[:half], leaf)
            + pairwise(a[:, half:], None if b is None else b[half:], leaf))


def leaks(base, exact_with_tf32):
    return {"TF32 inputs": exact_with_tf32, "bf16 output": base.bfloat16().float(), "bias 1e-4": base * (1 + 1e-4)}


def variants(a, b=None):
    """name -> fp32 result, for a @ b (or a.sum(1) when b is None)."""
    run = (lambda x, y: x @ y) if b is not None else (lambda x, y: x.sum(1))
    base = run(a, b)
    flip = run(a.flip(1), None if b is None else b.flip(0))
    out = {"cpu": base, "reversed": flip, "pairwise": pairwise(a, b), "sequential": sequential(a, b)}
    out.update({f"split-K {p}": split_k(p, a, b) for p in (2, 16, 256)})
    if b is None:
        out.update({f"{n} lanes": lanes(a, n) for n in (8, 256)})
    out.update(leaks(base, run(round_to_tf32(a), None if b is None else round_to_tf32(b))))
    return out


def margins(op, args, golden, results, baseline, position=0):
    """name -> (per-element margin, whole-rule margin) of each result; ``golden`` is output
    ``position`` of the op (the others are None)."""
    outputs = [None] * position + [golden] + [None] * (2 - position if op.endswith("backward") else 0)
    allowance = ErrorModel().allowance(op, args, outputs, position, baseline)
    element = dataclasses.replace(allowance, sigma=None)
    return {name: (judge_float(v, baseline, golden, element).margin, judge_float(v, baseline, golden, allowance).margin)
            for name, v in results.items()}


def matmul_or_sum(op, a, b=None):
    a64 = a.double()
    golden = a64 @ b.double() if b is not None else a64.sum(1)
    args = {"self": a64, "mat2": b.double()} if b is not None else {"self": a64, "dim": [1], "keepdim": False}
    found = variants(a, b)
    return margins(op, args, golden, found, found["cpu"])


def conv_weight_grad(k, data, g):
    """The weight gradient of a 3x3 convolution of 16 channels, K = batch x pixels (2 images)."""
    side = max(2, round((k / 2) ** 0.5))
    x, grad = data((2, 16, side, side), g), torch.randn(2, 16, side, side, generator=g)
    w = torch.randn(16, 16, 3, 3, generator=g) * 0.1
    geometry = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)

    def weight_grad(gy, xx, ww):
        return torch.ops.aten.convolution_backward(gy, xx, ww, None, *geometry, [False, True, False])[1]

    base = weight_grad(grad, x, w)
    per_image = [weight_grad(grad[i:i + 1], x[i:i + 1], w) for i in range(2)]
    results = {"cpu": base, "split-K 2 (images)": per_image[0] + per_image[1],
               "reversed images": per_image[1] + per_image[0]}
    results.update(leaks(base, weight_grad(round_to_tf32(grad), round_to_tf32(x), round_to_tf32(w))))
    args = dict(grad_output=grad.double(), input=x.double(), weight=w.double(), bias_sizes=None, stride=[1, 1],
                padding=[1, 1], dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1,
                output_mask=[False, True, False])
    golden = weight_grad(grad.double(), x.double(), w.double())
    return 2 * side * side, margins("aten.convolution_backward", args, golden, results, base, position=1)


def rows_in_orders(terms):
    """The sum over the rows of ``terms`` [K, N] in the correct orders, name -> [N] fp32."""
    t = terms.T.contiguous()
    out = {"reversed": t.flip(1).sum(1), "pairwise": pairwise(t), "sequential": sequential(t)}
    out.update({f"split-K {p}": split_k(p, t) for p in (2, 16, 256)})
    return out


def layer_norm_grads(k, data, g, width=16):
    """The weight and bias gradients of a layer norm over ``width`` features: sums over K tokens."""
    x, grad = data((k, width), g) * 3 + 1, torch.randn(k, width, generator=g)
    w, b = torch.randn(width, generator=g), torch.randn(width, generator=g)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [width], w, b, 1e-5)
    args = dict(grad_out=grad.double(), input=x.double(), normalized_shape=[width], mean=mean.double(),
                rstd=rstd.double(), weight=w.double(), bias=b.double(), output_mask=[True, True, True])
    golden = torch.ops.aten.native_layer_norm_backward(*args.values())
    base = torch.ops.aten.native_layer_norm_backward(grad, x, [width], mean, rstd, w, b, [True, True, True])
    xhat = (x - mean) * rstd
    found = {}
    for position, terms in ((1, grad * xhat), (2, grad)):
        results = {"cpu": base[position], **rows_in_orders(terms)}
        results.update({n: v for n, v in leaks(base[position], None).items() if n != "TF32 inputs"})
        found[position] = margins("aten.native_layer_norm_backward", args, golden[position], results, base[position],
                                  position)
    return k, found[1], found[2]


def softmax_rows(k, data, g, rows=16):
    """Softmax over rows of K logits (attention over K tokens), its sum in the correct orders."""
    x = data((rows, k), g) * 4
    e = (x - x.amax(1, keepdim=True)).exp()
    results = {"cpu": torch.softmax(x, 1)}
    results.update({name: e / total[:, None] for name, total in rows_in_orders(e.T).items()})
    results.update({n: v for n, v in leaks(results["cpu"], None).items() if n != "TF32 inputs"})
    golden = torch.softmax(x.double(), 1)
    return k, margins("aten._softmax", {"self": x.double(), "dim": 1, "half_to_float": False}, golden, results,
                      results["cpu"])


def table(title, rows):
    names = list(rows[0][1])
    print(f"\n{title}: per-element margin / whole-rule margin, > 1 fails")
    print("| K | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for k, m in rows:
        print(f"| {k} | " + " | ".join(f"{m[n][0]:.3g} / {m[n][1]:.3g}" for n in names) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", default=[512, 8192, 131072, 1048576])
    p.add_argument("--rows", type=int, default=16, help="m = n of the mm, rows of the sum (default 16)")
    p.add_argument("--data", choices=sorted(DATA), default="normal")
    args = p.parse_args()
    data = DATA[args.data]
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for op in ("aten.mm", "aten.sum"):
        rows = []
        for k in args.k:
            a = data((args.rows, k), g)
            b = data((k, args.rows), g) if op == "aten.mm" else None
            rows.append((k, matmul_or_sum(op, a, b)))
        table(f"{op} ({args.rows} x K x {args.rows} for mm, {args.rows} rows of K for sum; {args.data} terms)", rows)
    table(f"aten.convolution_backward, weight gradient (3x3, 16 channels, 2 images; {args.data} input)",
          [conv_weight_grad(k, data, g) for k in args.k])
    norms = [layer_norm_grads(k, data, g) for k in args.k]
    table(f"aten.native_layer_norm_backward, weight gradient (16 features, K tokens; {args.data} input)",
          [(k, weight) for k, weight, _ in norms])
    table(f"aten.native_layer_norm_backward, bias gradient (16 features, K tokens; {args.data} input)",
          [(k, bias) for k, _, bias in norms])
    table(f"aten._softmax over rows of K (16 rows; {args.data} logits times 4; K up to 16384, the longest attention "
          "row at the reference size)", [softmax_rows(k, data, g) for k in args.k if k <= 16384] or
          [softmax_rows(16384, data, g)])
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

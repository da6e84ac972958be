"""Margins of the reduction rule at large K: correct fp32 summation orders, which must pass, beside
precision leaks, which must fail (margin above 1), for mm and sum from K = 512 to 1e6.

    python benchmarks/reduction_margins.py [--k 512 8192 131072 1048576] [--rows 16]

The margin of a variant is its largest error against the float64 golden over the allowance that
``parity.errormodel.ErrorModel`` gives the op on the same inputs (standard-normal terms, mixed signs,
as gradients have). The correct orders are real fp32 arithmetic: torch's own kernel (the CPU
baseline), one accumulator adding the terms in order (sequential), the terms reversed, split-K with
2, 16 and 256 partial sums added in fp32, and pairwise (a tree of halves, 64 terms at the leaves).
The leaks: TF32-rounded inputs, the output rounded to bf16, and a relative bias of 1e-4.
"""
import argparse

import numpy as np
import torch

from parity.errormodel import ErrorModel
from parity.precision import round_to_tf32


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


def pairwise(a, b=None, leaf=64):
    k = a.shape[1]
    if k <= leaf:
        return a @ b if b is not None else a.sum(1)
    half = k // 2
    return (pairwise(a[:, :half], None if b is None else b[:half], leaf)
            + pairwise(a[:, half:], None if b is None else b[half:], leaf))


def variants(a, b=None):
    """name -> fp32 result, for a @ b (or a.sum(1) when b is None)."""
    run = (lambda x, y: x @ y) if b is not None else (lambda x, y: x.sum(1))
    base = run(a, b)
    flip = run(a.flip(1), None if b is None else b.flip(0))
    out = {"cpu": base, "reversed": flip, "pairwise": pairwise(a, b), "sequential": sequential(a, b)}
    out.update({f"split-K {p}": split_k(p, a, b) for p in (2, 16, 256)})
    tf32 = run(round_to_tf32(a), None if b is None else round_to_tf32(b))
    out.update({"TF32 inputs": tf32, "bf16 output": base.bfloat16().float(), "bias 1e-4": base * (1 + 1e-4)})
    return out


def margins(op, a, b=None):
    a64 = a.double()
    golden = a64 @ b.double() if b is not None else a64.sum(1)
    args = {"self": a64, "mat2": b.double()} if b is not None else {"self": a64, "dim": [1]}
    allowed = ErrorModel().allowance(op, args, [golden], 0, variants(a, b)["cpu"]).values
    err = {name: (v.double() - golden).abs().numpy().reshape(-1) for name, v in variants(a, b).items()}
    return {name: float(np.max(e / allowed)) for name, e in err.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", default=[512, 8192, 131072, 1048576])
    p.add_argument("--rows", type=int, default=16, help="m = n of the mm, rows of the sum (default 16)")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    for op in ("aten.mm", "aten.sum"):
        rows = []
        for k in args.k:
            a = torch.randn(args.rows, k, generator=g)
            b = torch.randn(k, args.rows, generator=g) if op == "aten.mm" else None
            rows.append((k, margins(op, a, b)))
        names = list(rows[0][1])
        print(f"\n{op} ({args.rows} x K x {args.rows} for mm, {args.rows} rows of K for sum): margins, > 1 fails")
        print("| K | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for k, m in rows:
            print(f"| {k} | " + " | ".join(f"{m[n]:.3g}" for n in names) + " |")


if __name__ == "__main__":
    main()

"""The partial sums of a reduction's actual terms: how large the running sums of a correct fp32
order get, for the statistical part of the reduction rule (:mod:`parity.errormodel`).

An order that adds the K terms ``t_1 .. t_K`` of one output one at a time (a GEMM micro-kernel's
K loop, a CPU loop) rounds each running sum ``s_i`` once, by at most half an ulp, and
``ulp(s) <= 2 u |s|``. With rounding errors that are independent and uniform in that interval
(Higham and Mary's model), the error of the output has variance at most

    (u^2 / 3) * (sum_i s_i^2 + sum_k t_k^2 + G^2)

where the second sum is the rounding of each product (no fused multiply-add) and the last the
rounding of the output G. Blocked, pairwise and split-K orders round fewer large sums and stay
below the one-accumulator order; the reversed order's running sums are the suffix sums.

``sum_i s_i^2`` is bounded from the terms themselves, in blocks of L = sqrt(K) / 4 consecutive
terms: inside block b every running sum is within ``M_b = sum |t|`` (over the block) of the sum
``S_{b-1}`` before it, so ``sum_i s_i^2 <= sum_b L_b (|S_{b-1}| + M_b)^2``, for any structure of
the terms (drift, correlations, cancellation). With random-sign terms that bound is about 1.5
times the true energy (``docs/error-model.md``). Every function returns, per output element, the
larger of the prefix and suffix bound plus the two rounding terms, as float64 shaped like the
output, computed with 2 + 1 / L times the op's own flops (block sums and absolute block sums in
float32, and the squares once).
"""
import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Blocks = Iterator[Tuple[torch.Tensor, torch.Tensor, int]]
# A sum more than DRIFT times the root of its squared terms drifts: its running sums grow about
# linearly, and once their ulp nears the small terms those round away the same way at every step
# (one accumulator over 1e6 products of two uniform numbers ends 7 sigma low). Such sums are left
# to the per-element bound. Random-sign terms reach DRIFT with probability 1e-15.
DRIFT = 8.0


def block_length(k: int) -> int:
    """Terms per block for a reduction of ``k`` terms (at least 1)."""
    return max(1, int(math.sqrt(k) / 4))


def _bounds(k: int) -> Iterator[Tuple[int, int]]:
    step = block_length(k)
    return ((lo, min(lo + step, k)) for lo in range(0, k, step))


def energy(blocks: Blocks, squares: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``max(prefix, suffix) + squares + total^2`` from ``blocks`` (block sum, block sum of
    absolute terms, block length), in order; ``total`` is the full sum (float64, the output's shape).
    Infinite where the sum drifts (``DRIFT``)."""
    total = total.to(torch.float64)
    running = torch.zeros_like(total)
    prefix, suffix = torch.zeros_like(total), torch.zeros_like(total)
    for part, absolute, length in blocks:
        absolute = absolute.to(torch.float64)
        prefix += length * (running.abs() + absolute).square()
        running += part.to(torch.float64)
        suffix += length * ((total - running).abs() + absolute).square()
    squares = squares.to(torch.float64)
    e = torch.maximum(prefix, suffix) + squares + total.square()
    return torch.where(total.abs() > DRIFT * squares.sqrt(), torch.full_like(e, math.inf), e)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def matmul(a: torch.Tensor, b: torch.Tensor, total: torch.Tensor, alpha: float = 1.0,
           offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``alpha * a @ b (+ offset)``: a [..., M, K], b [..., K, N] (broadcasting batch), total
    [..., M, N]; ``offset`` (beta * self of addmm, broadcast to total) is the first term."""
    a, b = _f32(a) * alpha, _f32(b)
    k = a.shape[-1]

    def blocks() -> Blocks:
        if offset is not None:
            o = torch.broadcast_to(_f32(offset), total.shape)
            yield o, o.abs(), 1
        for lo, hi in _bounds(k):
            x, y = a[..., lo:hi], b[..., lo:hi, :]
            yield x @ y, x.abs() @ y.abs(), hi - lo

    squares = a.square() @ b.square()
    if offset is not None:
        squares = squares + torch.broadcast_to(_f32(offset), total.shape).square()
    return energy(blocks(), squares, total)


# Lane counts of strided sums (SIMD lanes, unrolled accumulators, GPU threads): lane j adds the terms
# j, j + P, j + 2P, ... Data whose signs repeat with a period that divides P makes each lane's
# running sums grow where the contiguous ones cancel.
LANES = (2, 4, 8, 16, 32, 64, 128, 256)
# A sum with this many copies of one nonzero term may round the same way at every step, which the
# rounding model does not cover: one accumulator adding one value 256 times exceeds the C sqrt(K)
# bound (1.1x to 1.2x for 0.1, 0.7, 1.1, 2.3; 0.81x at 128 copies), and a million copies of 0.1
# end 1 % off. From 64 copies on (half of 128), such sums get the worst case K u.
REPEATS = 64


def _contiguous(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    def blocks() -> Blocks:
        for lo, hi in _bounds(x.shape[1]):
            part = x[:, lo:hi]
            yield part.sum(1), part.abs().sum(1), hi - lo

    return energy(blocks(), x.square().sum(1), total)


def _lanes(x: torch.Tensor, lanes: int) -> torch.Tensor:
    r, k = x.shape
    y = F.pad(x, (0, -k % lanes)).reshape(r, -1, lanes).transpose(1, 2).reshape(r * lanes, -1)
    per_lane = y.sum(1).to(torch.float64)
    inside = _contiguous(y, per_lane).reshape(r, lanes).sum(1)
    running = per_lane.reshape(r, lanes).cumsum(1)
    total = running[:, -1:]
    return inside + torch.maximum(running.square().sum(1), (total - running).square().sum(1))


def repeated(x: torch.Tensor) -> torch.Tensor:
    """True for each row [R, K] that holds ``REPEATS`` copies of one nonzero value."""
    r, k = x.shape
    ordered = x.sort(1).values
    change = torch.ones(r, k, dtype=torch.long)
    change[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).long()
    groups = change.cumsum(1) - 1 + k * torch.arange(r)[:, None]  # one id per value and row
    counts = torch.bincount(groups.reshape(-1), weights=(ordered != 0).reshape(-1).double(), minlength=r * k)
    return counts.reshape(r, k).amax(1) >= REPEATS


def rows(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The sum of each row of ``x`` [R, K], in the worst of the contiguous orders and every lane
    count of ``LANES``; total [R] (any shape of R elements). Infinite for rows of repeated terms."""
    x = _f32(x)
    flat_total = total.reshape(-1).to(torch.float64)
    e = _contiguous(x, flat_total)
    for lanes in LANES:
        if 2 * lanes <= x.shape[1]:
            e = torch.maximum(e, _lanes(x, lanes))
    e = torch.where(repeated(x), torch.full_like(e, math.inf), e)
    return e.reshape(total.shape)


def reduced(x: torch.Tensor, dims: Sequence[int], total: torch.Tensor) -> torch.Tensor:
    """``x.sum(dims)`` (all dims when empty); total is the sum in its own shape (keepdim or not)."""
    return rows(as_rows(x, dims), total)


def as_rows(x: torch.Tensor, dims: Optional[Sequence[int]]) -> torch.Tensor:
    """``x`` as [kept elements, reduced elements] for a sum over ``dims`` (all when empty or None)."""
    dims = sorted({d % x.dim() for d in dims}) if dims and x.dim() else list(range(x.dim()))
    kept = [d for d in range(x.dim()) if d not in dims]
    return x.permute(kept + dims).reshape(math.prod(x.shape[d] for d in kept), -1)


def conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int], stride, padding,
                     dilation, total: torch.Tensor) -> torch.Tensor:
    """The weight gradient [O, C, kh, kw] of a 2-d convolution (groups 1): per weight, the sum over
    images and output pixels (in that order) of grad [N, O, H', W'] times the input x [N, C, H, W]
    it met."""
    o = weight_shape[0]
    kernel = tuple(weight_shape[2:])
    step = block_length(grad.shape[0] * math.prod(grad.shape[2:]))

    def images() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for n in range(x.shape[0]):  # one image's columns [C kh kw, H' W'] at a time
            yield (_f32(grad[n]).reshape(o, -1),
                   F.unfold(_f32(x[n:n + 1]), kernel, dilation=dilation, padding=padding, stride=stride)[0])

    def blocks() -> Blocks:
        for g, u in images():
            for lo in range(0, g.shape[1], step):
                gs, us = g[:, lo:lo + step], u[:, lo:lo + step]
                yield gs @ us.T, gs.abs() @ us.abs().T, gs.shape[1]

    squares = sum(g.square() @ u.square().T for g, u in images())
    return energy(blocks(), squares, total.reshape(o, -1)).reshape(total.shape)


def channel_blocks(run: Callable[[slice], torch.Tensor], channels: int, per_channel: int,
                   squares: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """A convolution whose sum runs over ``channels`` x ``per_channel`` terms (channel-major):
    ``run(slice)`` gives the partial result over those channels (``run(slice, absolute=True)`` on
    absolute values)."""
    step = max(1, block_length(channels * per_channel) // per_channel)

    def blocks() -> Blocks:
        for lo in range(0, channels, step):
            s = slice(lo, min(lo + step, channels))
            yield run(s), run(s, absolute=True), (s.stop - s.start) * per_channel

    return energy(blocks(), squares, total)


def convolution(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, total: torch.Tensor) -> torch.Tensor:
    """The output of a 2-d convolution (groups 1, not transposed, bias left out: it is exact to
    add last): x [N, C, H, W], w [O, C, kh, kw]; total [N, O, H', W']."""
    x, w = _f32(x), _f32(w)

    def run(s: slice, absolute: bool = False) -> torch.Tensor:
        xs, ws = x[:, s], w[:, s]
        if absolute:
            xs, ws = xs.abs(), ws.abs()
        return F.conv2d(xs, ws, None, stride, padding, dilation)

    squares = F.conv2d(x.square(), w.square(), None, stride, padding, dilation)
    return channel_blocks(run, w.shape[1], math.prod(w.shape[2:]), squares, total)


def conv_input_grad(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation,
                    total: torch.Tensor) -> torch.Tensor:
    """The input gradient [N, C, H, W] of a 2-d convolution (groups 1): per input element, the sum
    over output channels and kernel positions of grad [N, O, H', W'] times the weight w [O, C, kh, kw]."""
    grad, w, x = _f32(grad), _f32(w), _f32(x)

    def backward(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(g, x, weight, None, stride, padding,
                                                   dilation, False, [0, 0], 1, [True, False, False])[0]

    def run(s: slice, absolute: bool = False) -> torch.Tensor:
        gs, ws = grad[:, s], w[s]
        return backward(gs.abs(), ws.abs()) if absolute else backward(gs, ws)

    squares = backward(grad.square(), w.square())
    return channel_blocks(run, w.shape[0], math.prod(w.shape[2:]), squares, total)


def sequential_drift(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """The relative error of summing ``terms`` (positive, any shape) along ``dim`` with one float32
    accumulator, in order or reversed, whichever is larger (float64, ``dim`` kept with size 1).

    Positive terms do not cancel, and once the running sum's ulp nears a term, every term rounds the
    same way: one accumulator's error grows faster than sqrt(K) (softmax's denominator over 8192
    logits: 2x the C sqrt(K) u bound). That drift is measured here on the op's own terms, by
    running the order (numpy's accumulate is strictly sequential) rather than modelled."""
    x = terms.detach().movedim(dim, -1).to(torch.float32).numpy()
    exact = x.astype(np.float64).sum(-1)
    forward = np.cumsum(x, axis=-1, dtype=np.float32)[..., -1]
    backward = np.cumsum(x[..., ::-1], axis=-1, dtype=np.float32)[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = np.maximum(np.abs(forward - exact), np.abs(backward - exact)) / exact
    return torch.from_numpy(np.nan_to_num(drift, nan=0.0, posinf=0.0)).unsqueeze(dim % max(terms.dim(), 1))

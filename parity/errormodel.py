"""The error model: how far from the float64 golden a correct implementation of one op may land.

For each element of each output of an op (isolated replay: the device gets the baseline's exact
inputs) the allowed absolute error is the largest of these components:

``rounding``   ``(ROUNDING_ULPS + REFERENCE_ULPS) * eps * |G|`` and the smallest normal number. Every
               op may be faithfully rounded rather than correctly rounded (1 ulp: a fused kernel
               that keeps an intermediate, a scalar operand rounded to the tensor's dtype first).
               ``REFERENCE_ULPS``: the ulp self-tests add their errors to the CPU's result, which
               is itself up to one ulp from exact where the CPU kernel is not correctly rounded
               (measured: the CPU's float32 sqrt is 0.67 ulp off). ``eps * |G|`` bounds ulp(G)
               from above. The smallest normal allows flushing subnormal results to zero, a common
               accelerator mode.
``ulp budget`` ``(budget + REFERENCE_ULPS) * eps * |G|`` for elementwise functions, with the documented
               worst-case error of the function in ulps (``docs/accuracy.md``): the CUDA Math
               API on ``cuda``, the larger of CUDA's and OpenCL's elsewhere. Half-precision results
               are computed in float32 and rounded, so their budget is the rounding.
``fma``        ``eps * |intermediate|`` for compound elementwise ops (addcmul, addcdiv, lerp, add with
               alpha, the sigmoid and tanh backward): a device may contract ``a * b + c`` into one
               rounding or not, which moves the result by one rounding of the product.
``reduction``  ``u * min(K, C_REDUCTION * sqrt(K)) * M`` for sums, means, matmuls, convolutions and
               their gradients, softmax and layer norm, with ``M = |A| |B|`` (the same op on the
               absolute values) and ``K`` the number of terms in each sum. ``K * u`` is the worst
               case of any summation order (Higham, ch. 3); ``C_REDUCTION * sqrt(K) * u`` is Higham
               and Mary's probabilistic bound with lambda = 2. Real kernels (blocked, pairwise,
               tree reductions) stay far inside it: the CPU's own worst margin is in the report.
               A bf16 or TF32 rounding of an fp32 op is 2^13 to 2^16 times u and stays visible.
               With a half-precision operand or result (the working precision is the lowest of
               the op's floating inputs and output) sums accumulate in float32 (cuBLAS, cuDNN,
               oneDNN, the CPU), so u is float32's, plus one rounding of the half type at M:
               PyTorch allows reduced-precision reductions by default, which may round a split-K
               partial sum to the half type. Ops in ``HALF_ACCUMULATION`` may accumulate in the
               half type itself, because the reference CPU kernel does: its layer-norm backward
               sums bf16 gradients into the float32 weight and bias gradients 4e4 to 8e4 float32
               units off (measured in ``amp``, oneDNN on or off).
``reduction rms``  for fp32 sums, means, matmuls and 2-d convolutions and their gradients, and
               layer norm's weight and bias gradients (sums over tokens), of at
               least ``RMS_MIN_TERMS`` terms, a second test over the whole output: the RMS of the
               error in units of ``sigma``, the standard deviation that a correct order which
               rounds every running sum would reach on these terms (:mod:`parity.partial_sums`),
               must stay below ``rms_limit(n)``, the ``1 - RMS_FALSE_RATE`` quantile of a
               chi-square mean over n = min(elements, ``RMS_DOF_CAP``) degrees of freedom (1.44
               for 64 elements or more, 4.89 for one). The worst case over every order grows with
               K, real errors with sqrt(K): this test keeps a TF32 or bf16 rounding, or a 1e-4
               bias, visible up to K = 1e6 (``docs/calibration.md``). A baseline whose own RMS is
               more than half the limit (TF32 emulated) widens it to twice the baseline's.
``baseline``   ``BASELINE_FACTOR * max |B - G|``: a device may be as inexact as the trusted CPU
               baseline, up to twice its worst error (the multiplier of PyTorch's own fp32 accuracy
               check). This covers ops the model has no entry for.

An op passes when every element is within its allowance and its RMS within the reduction-rms
limit: its *margin*, the larger of max |D - G| / allowance and RMS / limit, is at most 1.
Margins are reported for every op, with the component that set the allowance.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import chi2

from . import partial_sums, reorder
from .metrics import all_finite, as_numpy64

ROUNDING_ULPS = 1.0
REFERENCE_ULPS = 1.0
BASELINE_FACTOR = 2.0
C_REDUCTION = 2.0
FLOAT32_U = 2.0 ** -24
# Below this many terms the worst case over all orders is within a few times the real error, and
# TF32 inputs or a 1e-4 bias of a matmul exceed it (margins 6.9 and 2.4 at K = 2048).
RMS_MIN_TERMS = 2048
# One false failure in a million correct outputs under the rounding model, and at most 64
# independent errors per output: outputs that share terms (equal columns) have fewer than they have elements.
RMS_FALSE_RATE = 1e-6
RMS_DOF_CAP = 64
# Reductions whose reference CPU kernel accumulates half-precision operands in the half type.
HALF_ACCUMULATION = ("native_layer_norm_backward",)

# The arithmetic ops a device may round faithfully instead of correctly (1 ulp). Not every op: a
# faithfully rounded op returns an exactly representable result exactly (arange, floor, copies,
# max), and moving those by an ulp is no correct device (floor(1.9999999) flips a position-encoding
# frequency).
FAITHFUL_OPS = ("add", "sub", "mul", "div", "addcmul", "addcdiv", "lerp", "sqrt", "rsqrt", "exp", "log", "sin",
                "cos", "pow", "sigmoid", "sigmoid_backward", "threshold_backward", "neg", "reciprocal",
                "mm", "bmm", "addmm", "convolution", "convolution_backward", "sum", "mean", "cumsum", "_softmax",
                "_log_softmax", "_softmax_backward_data", "native_layer_norm", "native_layer_norm_backward",
                "linalg_vector_norm", "_cdist_forward", "nll_loss_forward", "nll_loss2d_forward")

# Documented worst-case float32 errors in ulps (docs/accuracy.md). "cuda": the CUDA Math API,
# which PyTorch's CUDA kernels call; "default": the larger of CUDA's and the OpenCL full profile's,
# for backends whose vendor documents nothing tighter. Division counts 2: PyTorch's CUDA kernel
# divides a tensor by a scalar as a * (1/b).
ULP_BUDGETS = {
    "cuda": {"rsqrt": 2, "exp": 2, "exp2": 2, "expm1": 1, "log": 1, "log2": 1, "log10": 2, "log1p": 1,
             "tanh": 2, "sin": 2, "cos": 2, "tan": 4, "erf": 2, "erfc": 4, "pow": 4, "div": 2,
             "reciprocal": 1, "sqrt": 1, "atan": 2, "atan2": 3, "asin": 2, "acos": 2},
    "default": {"rsqrt": 2, "exp": 3, "exp2": 3, "expm1": 3, "log": 3, "log2": 3, "log10": 3, "log1p": 3,
                "tanh": 5, "sin": 4, "cos": 4, "tan": 5, "erf": 16, "erfc": 16, "pow": 16, "div": 2.5,
                "reciprocal": 2.5, "sqrt": 3, "atan": 5, "atan2": 6, "asin": 4, "acos": 4},
}
# Elementwise ops built from a function of the table and roundings: (function, extra roundings).
COMPOSED = {"sigmoid": ("exp", 2), "nll_loss_backward": ("div", 1), "nll_loss2d_backward": ("div", 1),
            "_foreach_div": ("div", 0), "_foreach_sqrt": ("sqrt", 0), "_foreach_exp": ("exp", 0),
            "_foreach_reciprocal": ("reciprocal", 0), "_foreach_addcdiv": ("div", 0), "addcdiv": ("div", 0)}


@dataclass
class Allowance:
    """Allowed absolute error per element (flat float64, the output's size), the largest of its
    ``components`` (name -> flat array, or a scalar for all elements)."""

    values: np.ndarray
    components: Dict[str, np.ndarray] = field(default_factory=dict)
    sigma: Optional[np.ndarray] = None
    rms_limit: float = math.inf

    @property
    def names(self) -> List[str]:
        return list(self.components)

    def component(self, index: int) -> str:
        """The component that set the allowance of element ``index``."""
        if not self.components:
            return "given"
        at = {name: float(v.reshape(-1)[index if v.size > 1 else 0]) for name, v in self.components.items()}
        return max(at, key=at.get)

    @staticmethod
    def of(components: Dict[str, np.ndarray], size: int) -> "Allowance":
        values = np.zeros(size)
        for v in components.values():
            np.maximum(values, v.reshape(-1) if v.size > 1 else v.reshape(-1)[0], out=values)
        return Allowance(values, components)


@dataclass
class OpContext:
    """One op as the error model sees it: its packet name without namespace (``mm``), its bound
    arguments in float64 on the CPU, its golden outputs (float64) and the output position."""

    name: str
    args: Dict[str, Any]
    outputs: Sequence[Optional[torch.Tensor]]
    position: int
    dtype: torch.dtype
    budgets: Dict[str, float] = field(default_factory=lambda: dict(ULP_BUDGETS["default"]))
    input_dtypes: Tuple[torch.dtype, ...] = ()

    @property
    def eps(self) -> float:
        return torch.finfo(self.dtype).eps

    @property
    def u(self) -> float:
        return self.eps / 2

    @property
    def work_u(self) -> float:
        """The unit roundoff of the working precision: the lowest of the output's and the
        floating tensor arguments' (bound ``args`` are float64 copies, so ``input_dtypes`` says)."""
        return max([self.u] + [torch.finfo(d).eps / 2 for d in self.input_dtypes])

    def arg(self, name: str) -> Any:
        """The argument ``name``; for list arguments of ``_foreach`` ops, the element at ``position``."""
        value = self.args.get(name)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[self.position] if self.position < len(value) else None
        return value

    @property
    def out(self) -> torch.Tensor:
        return self.outputs[self.position]


def _f32(t: torch.Tensor) -> torch.Tensor:
    """|t| in float32: allowances need two digits, and float32 kernels are many times faster."""
    return t.detach().to(torch.float32).abs()


def _sum_terms(c: OpContext, m: torch.Tensor, k: float, worst: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reduction allowance of sums of ``k`` terms with absolute sums ``m``; where ``worst`` is
    True, K u, the worst case of any order, instead of the probabilistic C sqrt(K) u."""
    terms = min(k, C_REDUCTION * math.sqrt(max(k, 1.0)))
    if worst is not None and bool(worst.any()):
        m = m.to(torch.float64)
        terms = torch.where(worst.reshape(m.shape), torch.full_like(m, float(k)), torch.full_like(m, terms))
    m = m.to(torch.float64)
    if c.work_u <= FLOAT32_U:
        return c.u * terms * m
    accumulate = c.work_u if c.name in HALF_ACCUMULATION else FLOAT32_U
    return (accumulate * terms + c.work_u) * m


def _reduced_count(source: torch.Tensor, result: torch.Tensor) -> float:
    return max(source.numel() / max(result.numel(), 1), 1.0)


def _matmul(c: OpContext) -> torch.Tensor:
    a, b = c.arg("self"), c.arg("mat2")
    return _sum_terms(c, torch.matmul(_f32(a), _f32(b)), a.shape[-1])


def _scalar(c: OpContext, name: str) -> float:
    """addmm's beta or alpha: 1 when not given, and 0 when given as 0 (the input is then ignored)."""
    value = c.arg(name)
    return 1.0 if value is None else float(value)


def _addmm(c: OpContext) -> torch.Tensor:
    batched = "batch1" in c.args
    a, b = c.arg("batch1" if batched else "mat1"), c.arg("batch2" if batched else "mat2")
    beta, alpha = abs(_scalar(c, "beta")), abs(_scalar(c, "alpha"))
    m = alpha * torch.matmul(_f32(a), _f32(b)) + (beta * _f32(c.arg("self")) if beta else 0.0)
    return _sum_terms(c, m, a.shape[-1] + 1)


def _conv_geometry(c: OpContext) -> List[Any]:
    return [c.arg(n) for n in ("stride", "padding", "dilation", "transposed", "output_padding", "groups")]


def _convolution(c: OpContext) -> torch.Tensor:
    w = c.arg("weight")
    bias = c.arg("bias")
    m = torch.ops.aten.convolution(_f32(c.arg("input")), _f32(w), _f32(bias) if bias is not None else None,
                                   *_conv_geometry(c))
    groups, transposed = c.arg("groups"), c.arg("transposed")
    k = (w.shape[0] // groups if transposed else w.shape[1]) * math.prod(w.shape[2:]) + (bias is not None)
    return _sum_terms(c, m, k)


def _convolution_backward(c: OpContext) -> torch.Tensor:
    grad, x, w = c.arg("grad_output"), c.arg("input"), c.arg("weight")
    mask = [i == c.position for i in range(3)]
    m = torch.ops.aten.convolution_backward(_f32(grad), _f32(x), _f32(w), c.arg("bias_sizes"),
                                            *_conv_geometry(c), mask)[c.position]
    groups = c.arg("groups")
    if c.position == 0:
        k = (w.shape[1] if c.arg("transposed") else w.shape[0] // groups) * math.prod(w.shape[2:])
    else:
        k = grad.shape[0] * math.prod(grad.shape[2:])
    return _sum_terms(c, m, k)


def _sum(c: OpContext) -> torch.Tensor:
    x = c.arg("self")
    dims = c.arg("dim")
    keep = bool(c.arg("keepdim"))
    absx = _f32(x)
    m = absx.sum(dim=dims, keepdim=keep) if dims not in (None, [], ()) else absx.sum()
    if c.name == "mean":
        m = m / _reduced_count(x, c.out)
    k = _reduced_count(x, c.out)
    # Repeated terms may round the same way at every step, which the sqrt(K) bound does not model.
    worst = partial_sums.repeated(partial_sums.as_rows(x, dims)) if k >= partial_sums.REPEATS else None
    return _sum_terms(c, m.reshape(c.out.shape), k, worst)


def _cumsum(c: OpContext) -> torch.Tensor:
    x = c.arg("self")
    dim = c.arg("dim")
    return _sum_terms(c, _f32(x).cumsum(dim), x.shape[dim] if x.dim() else 1)


def _norm(c: OpContext) -> torch.Tensor:
    x = c.arg("self") if "self" in c.args else c.arg("tensors")
    return _sum_terms(c, c.out.abs(), _reduced_count(x, c.out))


def _last_dim_softmax_terms(c: OpContext, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    dim = c.arg("dim") % max(x.dim(), 1)
    return x - x.amax(dim, keepdim=True), dim, x.shape[dim] if x.dim() else 1


def _denominator(c: OpContext, exps: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """The relative error of softmax's sum of the exponentials ``exps``: the probabilistic C sqrt(K)
    u, plus twice what one fp32 accumulator drifts on these positive terms (measured, in either order)."""
    drift = 2 * partial_sums.sequential_drift(exps, dim) if exps.dim() else 0.0
    return _sum_terms(c, torch.ones_like(exps), k) + drift


def _softmax(c: OpContext) -> torch.Tensor:
    shifted, dim, k = _last_dim_softmax_terms(c, c.arg("self"))
    y = c.out.abs()
    exp_budget = _budget("exp", c)
    return y * (c.eps * (exp_budget + 2 + shifted.abs()) + _denominator(c, shifted.exp(), dim, k))


def _log_softmax(c: OpContext) -> torch.Tensor:
    shifted, dim, k = _last_dim_softmax_terms(c, c.arg("self"))
    exps = shifted.exp()
    lse = exps.sum(dim, keepdim=True).log()
    exp_budget, log_budget = _budget("exp", c), _budget("log", c)
    return c.eps * (c.out.abs() + shifted.abs() + (log_budget + 1) * lse.abs() + exp_budget) + \
        _denominator(c, exps, dim, k)


def _softmax_backward(c: OpContext) -> torch.Tensor:
    g, y = c.arg("grad_output"), c.arg("output")
    dim = c.arg("dim") % max(y.dim(), 1)
    k = y.shape[dim] if y.dim() else 1
    dot = (g * y).abs().sum(dim, keepdim=True)
    return c.eps * (g * y).abs() + _sum_terms(c, y.abs() * (dot + g.abs()), k)


def _log_softmax_backward(c: OpContext) -> torch.Tensor:
    g, y = c.arg("grad_output"), c.arg("output")
    dim = c.arg("dim") % max(y.dim(), 1)
    k = y.shape[dim] if y.dim() else 1
    total = g.abs().sum(dim, keepdim=True)
    return c.eps * (g.abs() + (_budget("exp", c) + 1) * y.exp() * total) + _sum_terms(c, y.exp() * total, k)


def _layer_norm_rows(c: OpContext) -> Tuple[torch.Tensor, int, Tuple[int, ...]]:
    x, shape = c.arg("input"), tuple(c.arg("normalized_shape"))
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    return x, math.prod(shape), dims


def _layer_norm(c: OpContext) -> torch.Tensor:
    x, k, dims = _layer_norm_rows(c)
    mean, rstd = c.outputs[1], c.outputs[2]
    relative = c.u * min(k, C_REDUCTION * math.sqrt(k)) + (_budget("rsqrt", c) + 1) * c.eps
    if c.position == 1:
        return _sum_terms(c, x.abs().mean(dims, keepdim=True).reshape(mean.shape), k)
    if c.position == 2:
        return relative * rstd.abs()
    shape = mean.shape + (1,) * (x.dim() - mean.dim())
    mean_k, rstd_k = mean.reshape(shape), rstd.reshape(shape)
    xhat = (x - mean_k) * rstd_k
    w = c.arg("weight")
    w = w.abs() if w is not None else torch.ones(())
    mean_error = _sum_terms(c, x.abs().mean(dims, keepdim=True), k) * rstd_k
    b = c.arg("bias")
    rounding = c.eps * (c.out.abs() + (b.abs() if b is not None else 0) + w * xhat.abs())
    return w * (xhat.abs() * relative + mean_error) + rounding


def _layer_norm_backward(c: OpContext) -> torch.Tensor:
    g = c.arg("grad_out")
    x, k, dims = _layer_norm_rows(c)
    mean, rstd = c.arg("mean"), c.arg("rstd")
    shape = mean.shape + (1,) * (x.dim() - mean.dim())
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    w = c.arg("weight")
    if c.position == 0:
        gw = g * w if w is not None else g
        spread = gw.abs() + gw.abs().mean(dims, keepdim=True) + xhat.abs() * (gw * xhat).abs().mean(dims, keepdim=True)
        return _sum_terms(c, rstd.reshape(shape).abs() * spread, k) + c.eps * c.out.abs()
    rows = tuple(range(x.dim() - len(dims)))
    m = (g * xhat).abs().sum(rows) if c.position == 1 else g.abs().sum(rows)
    return _sum_terms(c, m.reshape(c.out.shape), x.numel() / k)


def _picked(c: OpContext) -> Tuple[torch.Tensor, torch.Tensor]:
    """|w_t * x_t| and w_t of an nll_loss (any spatial shape), ignored targets zero."""
    x, target, weight = c.arg("self"), c.arg("target"), c.arg("weight")
    ignore = c.arg("ignore_index")
    valid = target != ignore
    safe = torch.where(valid, target, torch.zeros_like(target))
    picked = x.gather(1, safe.unsqueeze(1)).squeeze(1) if x.dim() > 1 else x[safe]
    w = weight[safe] if weight is not None else torch.ones_like(picked)
    w = torch.where(valid, w, torch.zeros_like(w))
    return (w * picked).abs(), w


def _nll_loss(c: OpContext) -> torch.Tensor:
    terms, w = _picked(c)
    reduction = c.arg("reduction")
    if reduction == 0:  # none: one product per element
        return c.eps * terms
    if c.position == 1:
        return _sum_terms(c, w.sum(), terms.numel())
    m = terms.sum() / (w.sum() if reduction == 1 else 1.0)
    return _sum_terms(c, m, terms.numel()) + _budget("div", c) * c.eps * m


def _cdist(c: OpContext) -> torch.Tensor:
    x1 = c.arg("x1")
    return _sum_terms(c, c.out.abs(), x1.shape[-1]) + c.eps * c.out.abs()


def _cdist_backward(c: OpContext) -> torch.Tensor:
    g, x2 = c.arg("grad"), c.arg("x2")
    m = g.abs().sum(-1, keepdim=True).expand(c.out.shape)
    return _sum_terms(c, m, x2.shape[-2])


def _max_pool_backward(c: OpContext) -> torch.Tensor:
    args = [c.arg(n) for n in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")]
    m = torch.ops.aten.max_pool2d_with_indices_backward(_f32(c.arg("grad_output")), c.arg("self").to(torch.float32),
                                                         *args, c.arg("indices"))
    return _sum_terms(c, m, math.prod(c.arg("kernel_size")))


def _fma(c: OpContext) -> Optional[torch.Tensor]:
    """One rounding of the product in ``a + b * c``-shaped elementwise ops, None for other ops."""
    name = c.name.replace("_foreach_", "").rstrip("_")
    if name in ("addcmul", "addcdiv"):
        t1, t2 = c.arg("tensor1"), c.arg("tensor2")
        value = c.arg("value")
        value = value.abs() if isinstance(value, torch.Tensor) else abs(float(1 if value is None else value))
        product = t1 * t2 if name == "addcmul" else t1 / t2
        return c.eps * value * product.abs()
    if name == "lerp":
        start, end, weight = c.arg("self"), c.arg("end"), c.arg("weight")
        weight = weight.abs() if isinstance(weight, torch.Tensor) else abs(float(weight))
        return c.eps * (1 + weight) * (end - start).abs()
    if name in ("add", "sub") and c.arg("alpha") not in (None, 1):
        other = c.arg("other")
        return c.eps * abs(float(c.arg("alpha"))) * (other.abs() if isinstance(other, torch.Tensor) else abs(other))
    if name == "sigmoid_backward":
        return c.eps * (c.arg("grad_output") * c.arg("output")).abs()
    if name == "tanh_backward":
        return c.eps * (c.arg("grad_output").abs() * c.arg("output").square())
    return None


def rms_limit(elements: int) -> float:
    """The largest RMS error, in units of sigma, that ``elements`` correct errors reach but with
    probability ``RMS_FALSE_RATE``."""
    dof = max(1, min(elements, RMS_DOF_CAP))
    return math.sqrt(chi2.isf(RMS_FALSE_RATE, dof) / dof)


def _plain_conv(c: OpContext) -> bool:
    w = c.arg("weight")
    return w is not None and w.dim() == 4 and c.arg("groups") == 1 and not c.arg("transposed")


def _energy_matmul(c: OpContext) -> torch.Tensor:
    if c.name in ("mm", "bmm"):
        return partial_sums.matmul(c.arg("self"), c.arg("mat2"), c.out)
    batched = "batch1" in c.args
    a, b = c.arg("batch1" if batched else "mat1"), c.arg("batch2" if batched else "mat2")
    beta, alpha = _scalar(c, "beta"), _scalar(c, "alpha")
    offset = beta * c.arg("self") if beta else None
    return partial_sums.matmul(a, b, c.out, alpha, offset)


def _energy_convolution(c: OpContext) -> torch.Tensor:
    x, w = c.arg("input"), c.arg("weight")
    geometry = [c.arg(n) for n in ("stride", "padding", "dilation")]
    if c.name == "convolution":
        bias = c.arg("bias")
        total = c.out - bias.reshape(1, -1, 1, 1) if bias is not None else c.out
        return partial_sums.convolution(x, w, *geometry, total)
    g = c.arg("grad_output")
    if c.position == 0:
        return partial_sums.conv_input_grad(g, x, w, *geometry, c.out)
    if c.position == 1:
        return partial_sums.conv_weight_grad(g, x, w.shape, *geometry, c.out)
    return partial_sums.reduced(g, [0, 2, 3], c.out)


def _energy_sum(c: OpContext) -> torch.Tensor:
    x, dims = c.arg("self"), c.arg("dim")
    dims = list(dims) if dims not in (None, [], ()) else []
    if c.name == "mean":  # the sum's error over k, and one more rounding for the division
        k = _reduced_count(x, c.out)
        return partial_sums.reduced(x, dims, c.out * k) / k ** 2 + c.out.square()
    return partial_sums.reduced(x, dims, c.out)


def _energy_layer_norm_backward(c: OpContext) -> torch.Tensor:
    """The weight and bias gradients: sums over every row (token) of grad_out * xhat and grad_out."""
    g = c.arg("grad_out")
    x, _, dims = _layer_norm_rows(c)
    rows = list(range(x.dim() - len(dims)))
    if c.position == 1:
        mean, rstd = c.arg("mean"), c.arg("rstd")
        shape = mean.shape + (1,) * (x.dim() - mean.dim())
        g = g * (x - mean.reshape(shape)) * rstd.reshape(shape)
    return partial_sums.reduced(g, rows, c.out)


# The energy (partial_sums) of each output element, for ops whose terms_per_element is known.
STATISTICAL: Dict[str, Callable[[OpContext], torch.Tensor]] = {
    "mm": _energy_matmul, "bmm": _energy_matmul, "addmm": _energy_matmul, "baddbmm": _energy_matmul,
    "convolution": _energy_convolution, "convolution_backward": _energy_convolution,
    "sum": _energy_sum, "mean": _energy_sum, "native_layer_norm_backward": _energy_layer_norm_backward,
}


def terms_per_element(c: OpContext) -> int:
    """The number of terms of each sum of output ``c.position`` of a reduction op, 0 otherwise."""
    if c.name in ("mm", "bmm"):
        return c.arg("self").shape[-1]
    if c.name in ("addmm", "baddbmm"):
        return c.arg("batch1" if "batch1" in c.args else "mat1").shape[-1] + 1
    if c.name in ("convolution", "convolution_backward") and _plain_conv(c):
        w = c.arg("weight")
        if c.name == "convolution":
            return w.shape[1] * math.prod(w.shape[2:])
        g = c.arg("grad_output")
        return w.shape[0] * math.prod(w.shape[2:]) if c.position == 0 else g.shape[0] * math.prod(g.shape[2:])
    if c.name in ("sum", "mean"):
        return int(_reduced_count(c.arg("self"), c.out))
    if c.name == "native_layer_norm_backward" and c.position > 0:  # over rows; the input gradient's K is a row
        x, k, _ = _layer_norm_rows(c)
        return x.numel() // k
    return 0


def _sigma(c: OpContext) -> Optional[torch.Tensor]:
    """The standard deviation per element of a correct fp32 order's error, for the reduction-rms
    test; None where the test does not apply."""
    if c.name not in STATISTICAL or c.work_u > FLOAT32_U or c.dtype != torch.float32 or c.out is None:
        return None
    if terms_per_element(c) < RMS_MIN_TERMS:  # 0 for convolutions the energy does not cover
        return None
    return (c.u ** 2 / 3 * STATISTICAL[c.name](c)).sqrt()


REDUCTIONS: Dict[str, Callable[[OpContext], torch.Tensor]] = {
    "mm": _matmul, "bmm": _matmul, "addmm": _addmm, "baddbmm": _addmm,
    "convolution": _convolution, "convolution_backward": _convolution_backward,
    "sum": _sum, "mean": _sum, "nansum": _sum, "cumsum": _cumsum,
    "linalg_vector_norm": _norm, "norm": _norm, "_foreach_norm": _norm,
    "_softmax": _softmax, "_log_softmax": _log_softmax,
    "_softmax_backward_data": _softmax_backward, "_log_softmax_backward_data": _log_softmax_backward,
    "native_layer_norm": _layer_norm, "native_layer_norm_backward": _layer_norm_backward,
    "nll_loss_forward": _nll_loss, "nll_loss2d_forward": _nll_loss,
    "_cdist_forward": _cdist, "_cdist_backward": _cdist_backward,
    "max_pool2d_with_indices_backward": _max_pool_backward,
}


def _budget(function: str, c: OpContext) -> float:
    if c.dtype in (torch.float16, torch.bfloat16):
        return 0.0
    return float(c.budgets.get(function, 0.0))


class ErrorModel:
    """Allowances for a device whose elementwise functions come from ``math_library`` (``cuda``: the
    CUDA Math API's budgets; ``default``: the larger of CUDA's and OpenCL's). Vendors adjust it per
    op through :meth:`set_ulp_budget` and :meth:`scale` (the ``pytest_detr_adjust_error_model``
    hook); every adjustment is listed in ``adjustments`` and reported. Stateless apart from that; safe to share."""

    def __init__(self, math_library: str = "default"):
        if math_library not in ULP_BUDGETS:
            raise ValueError(f"no documented ULP table for the math library {math_library!r}; "
                             f"known: {', '.join(ULP_BUDGETS)}")
        self.backend = math_library
        self.budgets: Dict[str, float] = {k: float(v) for k, v in ULP_BUDGETS[self.backend].items()}
        self.factors: Dict[str, float] = {}
        self.adjustments: List[str] = []

    def set_ulp_budget(self, function: str, ulps: float, reason: str) -> None:
        """Sets the documented worst-case error of the elementwise ``function`` (``exp``, ``rsqrt``;
        ops composed of it follow) in float32 ulps: a vendor's own accuracy table."""
        if not (isinstance(ulps, (int, float)) and ulps >= 0 and math.isfinite(ulps)) or not reason:
            raise ValueError(
                f"set_ulp_budget({function!r}, {ulps!r}): expected a finite number of ulps >= 0 and a reason"
            )
        known = sorted({f for table in ULP_BUDGETS.values() for f in table})
        if function not in known:
            raise ValueError(f"set_ulp_budget({function!r}, ...): not an elementwise function of the ULP tables; "
                             f"known: {', '.join(known)}")
        self.adjustments.append(f"ulp budget of {function}: {self.budgets.get(function, 0.0):g} -> {ulps:g} ({reason})")
        self.budgets[function] = float(ulps)

    def scale(self, op: str, factor: float, reason: str) -> None:
        """Multiplies every allowance of ``op`` (``aten.bmm``; its overloads too) by ``factor``:
        above 1 widens it, below 1 tightens it."""
        if not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)) or not reason:
            raise ValueError(f"scale({op!r}, {factor!r}): expected a finite factor > 0 and a reason")
        name = op.split(".")[1] if op.startswith("aten.") and op.count(".") >= 1 else op
        if not isinstance(op, str) or not name.isidentifier() or not hasattr(torch.ops.aten, name):
            raise ValueError(f"scale({op!r}, ...): expected an aten op such as 'aten.bmm' (no patterns); "
                             f"torch has no aten.{name}")
        self.factors[name] = self.factors.get(name, 1.0) * factor
        self.adjustments.append(f"allowance of aten.{name} x{factor:g} ({reason})")

    def ulp_budget(self, op: str, dtype: torch.dtype = torch.float32) -> float:
        """The documented error in ulps of elementwise ``op`` (packet name, ``aten.`` optional)."""
        name = op.split(".")[-1].rstrip("_")
        function, extra = COMPOSED.get(name, (name.replace("_foreach_", ""), 0))
        if dtype in (torch.float16, torch.bfloat16):
            return 0.0
        return self.budgets[function] + extra if function in self.budgets else 0.0

    def correct_device_profile(self) -> List[str]:
        """Fault specs that make a run behave like a correct device by this model: every
        elementwise function wrong by up to its documented budget, and every reduction of
        :data:`parity.reorder.COVERED` moved by a draw of another summation order's error.
        (Members that instead rounded every op of ``FAITHFUL_OPS`` one ulp away failed tiny's train
        3 steps on cpu-splitk, 2.94: a last-bit change of a sum's result cannot model the error of a
        cancelling weight gradient, which AdamW turns into a visible change of a weight; see
        docs/calibration.md.)"""
        elementwise = [f"aten.{name}:ulp={int(self.ulp_budget(name))}"
                       for name in sorted(set(self.budgets) | set(COMPOSED)) if int(self.ulp_budget(name)) > 0]
        return elementwise + [f"aten.{name}:reorder=1" for name in reorder.COVERED]

    def allowance(self, op: str, args: Dict[str, Any], golden: Sequence[Optional[torch.Tensor]], position: int,
                  baseline: torch.Tensor, dtype: Optional[torch.dtype] = None,
                  input_dtypes: Sequence[torch.dtype] = ()) -> Allowance:
        """The allowed error of output ``position`` of ``op`` (``aten.mm``), from its float64
        arguments ``args`` (bound by name) and golden outputs; ``baseline`` is the CPU's output;
        ``input_dtypes`` are the dtypes the op's floating arguments had on the device."""
        g = golden[position].detach().to("cpu", torch.float64)
        dtype = dtype or baseline.dtype
        context = OpContext(op.split(".")[-1], args, [t.detach().to(torch.float64) if isinstance(t, torch.Tensor)
                                                      and t.is_floating_point() else t for t in golden],
                            position, dtype, self.budgets, tuple(input_dtypes))
        parts = self._components(context, g, baseline)
        sigma = _sigma(context) if context.position < len(context.outputs) else None
        factor = self.factors.get(context.name, 1.0)
        if factor != 1.0:
            parts = {k: v * factor for k, v in parts.items()}
        # NaN where an input is not finite: those positions are judged by their NaN/Inf layout
        allowance = Allowance.of({k: v if all_finite(v) else np.nan_to_num(v, nan=0.0, posinf=np.inf)
                                  for k, v in parts.items()}, g.numel())
        if sigma is not None:
            allowance.sigma = np.nan_to_num(_numpy(sigma, g.shape) * factor, nan=np.inf, posinf=np.inf)
            allowance.rms_limit = rms_limit(g.numel())
        return allowance

    def _components(self, c: OpContext, g: torch.Tensor, baseline: torch.Tensor) -> Dict[str, np.ndarray]:
        absg = np.abs(g.numpy().reshape(-1))
        rounding = np.maximum((ROUNDING_ULPS + REFERENCE_ULPS) * c.eps * absg, torch.finfo(c.dtype).tiny)
        parts = {"rounding": rounding}
        budget = self.ulp_budget(c.name, c.dtype)
        if budget:
            parts["ulp budget"] = (budget + REFERENCE_ULPS) * c.eps * absg
        fma = _fma(c)
        if fma is not None:
            parts["fma"] = _numpy(fma, g.shape) + rounding
        model = REDUCTIONS.get(c.name)
        if model is not None and c.position < len(c.outputs) and c.out is not None:
            parts["reduction"] = _numpy(model(c), g.shape) + rounding
        if tuple(baseline.shape) == tuple(g.shape) and baseline.numel():
            with np.errstate(invalid="ignore"):  # inf - inf where both are infinite
                diff = np.abs(as_numpy64(baseline) - g.numpy().reshape(-1))
            worst = float(diff.max())
            if not math.isfinite(worst):
                diff = diff[np.isfinite(diff)]
                worst = float(diff.max()) if diff.size else 0.0
            parts["baseline"] = np.array(BASELINE_FACTOR * worst)
        return parts

    def for_values(self, golden: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> Allowance:
        """The allowance of values that are selected, not computed (index outputs, exact ops)."""
        return self.allowance("aten.select_values", {}, [golden], 0, baseline, dtype)


def _numpy(t: Any, shape: torch.Size) -> np.ndarray:
    """A flat float64 array of the output's size from a tensor that broadcasts to ``shape``."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64)
    if tuple(t.shape) != tuple(shape):
        t = torch.broadcast_to(t, shape)
    return t.reshape(-1).numpy()

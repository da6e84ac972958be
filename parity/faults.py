"""Fault injection into the device under test's run, to prove that the comparison catches and
localises wrong ops. A spec is ``<namespace>.<op>[.<overload>]:<kind>[=<value>]``, e.g.
``aten.softmax:noise=1e-3``, ``aten.mm:round=tf32``, ``aten.native_layer_norm:nan``.

Faults perturb the floating outputs of every matching op call; they never touch integer outputs,
and never view ops (whose outputs share memory with their inputs). ``*`` matches every op (e.g.
``*:ulp=1``: every op's output moved by up to one ulp). A packet name matches every overload;
a composite op that the dispatcher decomposes before any mode sees it (``aten.softmax``)
also matches the op it becomes (``aten._softmax``), see :data:`DECOMPOSED_TO`.
"""
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import torch

from runtime import compat
from runtime.faultspec import parse_kind

from . import reorder
from .precision import round_to_tf32
from .ulp import perturb_ulps

KINDS = {
    "noise": "noise=<relative std>: multiplies each element by (1 + std * N(0, 1)), fixed seed",
    "offset": "offset=<abs>: adds a constant",
    "scale": "scale=<factor>: multiplies by a factor",
    "round": "round=bf16|fp16|tf32: rounds to that format (tf32: 10-bit mantissa)",
    "round-inputs": "round-inputs=bf16|fp16|tf32: rounds the op's floating inputs to that format before it runs, "
                    "as TF32 hardware does",
    "ulp": "ulp=<k>: moves each element by a uniform random whole number of ulps, at most k (a correct "
           "device's last-bit error), fixed seed",
    "reorder": "reorder=<c>: adds c times a Gaussian draw of the error of summing in another order, "
               "u sqrt(K E / (16 ln 2)) per element with E the sum of squared terms (mm, bmm, addmm, baddbmm, "
               "convolution and its backward, sum, mean; see parity/reorder.py), fixed seed",
    "nan": "nan[=<fraction>]: one element (or that fraction of them) becomes NaN",
    "inf": "inf[=<fraction>]: one element (or that fraction of them) becomes +Inf",
    "zero": "zero[=<fraction>]: every element (or that fraction of them) becomes 0",
    "delay": "delay=<seconds>: sleeps after the op (a slow device, for benchmark gates)",
}
VALUE_REQUIRED = ("noise", "offset", "scale", "round", "round-inputs", "delay", "ulp", "reorder")
# A spec may end with @k>=N (calls whose reduction has at least N terms) or @numel>=N (calls with at
# least N output elements): a kernel that switches algorithm above a size.
SIZES = ("k", "numel")
EVERY_OP = "*"
ROUND_FORMATS = ("bf16", "fp16", "tf32")
GRAMMAR = ("<namespace>.<op>[.<overload>]:<kind>[=<value>][@k>=N|@numel>=N] or *:<kind>[=<value>], "
           "e.g. aten.softmax:noise=1e-3, aten.convolution_backward:round-inputs=tf32@k>=8192")

# Composite ops never reach a dispatch mode; a fault on them applies to what they decompose into.
DECOMPOSED_TO = {
    "aten.softmax": ("aten._softmax",),
    "aten.log_softmax": ("aten._log_softmax",),
    "aten.layer_norm": ("aten.native_layer_norm",),
    "aten.group_norm": ("aten.native_group_norm",),
    "aten.dropout": ("aten.native_dropout",),
    "aten.conv1d": ("aten.convolution",),
    "aten.conv2d": ("aten.convolution",),
    "aten.linear": ("aten.addmm", "aten.mm", "aten.bmm"),
    "aten.matmul": ("aten.mm", "aten.bmm"),
}


@dataclass
class FaultSpec:
    """One parsed fault. ``fired`` counts the op calls it perturbed."""

    spec: str
    op: str
    kind: str
    value: Union[float, str, None] = None
    seed: int = 0
    fired: int = 0
    fired_on: List[str] = field(default_factory=list)
    size: str = ""  # "k" or "numel" with @, else ""
    at_least: int = 0

    def matches(self, func: torch._ops.OpOverload) -> bool:
        packet, full = str(func.overloadpacket), str(func)
        return self.op in (EVERY_OP, packet, full) or packet in DECOMPOSED_TO.get(self.op, ())

    def large_enough(self, func: torch._ops.OpOverload, args: Sequence, outputs) -> bool:
        """Whether this call is as large as the spec's ``@k>=N`` or ``@numel>=N`` asks (always without)."""
        if not self.size:
            return True
        if self.size == "k":
            return (reduction_length(func, args, outputs) or 0) >= self.at_least
        return max((t.numel() for t in _tensors(outputs)), default=0) >= self.at_least

    def sized_by_inputs(self, func: torch._ops.OpOverload, args: Sequence) -> bool:
        """Whether :meth:`large_enough` can decide from the inputs alone, before the op runs."""
        return not self.size or (self.size == "k" and reduction_length(func, args) is not None)

    def round_inputs(self, func: torch._ops.OpOverload, args: Sequence, kwargs: dict):
        """Copies of the floating tensor arguments rounded to the spec's format, for ``round-inputs``."""
        self.fired += 1
        if len(self.fired_on) < 10:
            self.fired_on.append(str(func))

        def rounded(t):
            return self._round(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        return compat.tree_map(rounded, (tuple(args), dict(kwargs)))

    def reorder(self, func: torch._ops.OpOverload, args: Sequence, kwargs: dict, outputs):
        """The outputs of a reduction moved by a draw of another summation order's error
        (:mod:`parity.reorder`); other ops' outputs unchanged and not counted."""
        terms = reorder.energies(func, args, kwargs)
        if not any(terms):
            return outputs
        self.fired += 1
        if len(self.fired_on) < 10:
            self.fired_on.append(str(func))
        single = not isinstance(outputs, (tuple, list))
        moved = [reorder.draw(t, *terms[i], self.value, self._generator())
                 if i < len(terms) and terms[i] is not None and isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for i, t in enumerate([outputs] if single else outputs)]
        return moved[0] if single else type(outputs)(moved)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        if self.value == "tf32":
            return round_to_tf32(x.float()).to(x.dtype)
        return x.to(torch.float16 if self.value == "fp16" else torch.bfloat16).to(x.dtype)

    def apply(self, output: torch.Tensor) -> torch.Tensor:
        """The faulted version of one floating output; any shape, same dtype and device."""
        if self.kind == "delay":
            return output
        x = output
        if self.kind == "noise":
            noise = torch.randn(x.shape, generator=self._generator()).to(x.device)
            return (x.float() * (1 + self.value * noise)).to(x.dtype)
        if self.kind == "ulp":
            return perturb_ulps(x, self.value, self._generator())
        if self.kind == "offset":
            return x + self.value
        if self.kind == "scale":
            return x * self.value
        if self.kind == "round":
            return self._round(x)
        fill = {"nan": math.nan, "inf": math.inf, "zero": 0.0}[self.kind]
        if self.value is None and self.kind == "zero":
            return torch.zeros_like(x)
        mask = self._positions(x)
        return torch.where(mask.to(x.device), torch.full_like(x, fill), x)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.fired)

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask (CPU, shape of x): the middle element, or a fixed random fraction."""
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        if x.numel() == 0:
            return mask.reshape(x.shape)
        if self.value is None:
            mask[x.numel() // 2] = True
        else:
            count = max(1, round(self.value * x.numel()))
            mask[torch.randperm(x.numel(), generator=self._generator())[:count]] = True
        return mask.reshape(x.shape)

    def perturb(self, func: torch._ops.OpOverload, outputs):
        """Applies the fault to the floating tensors of an op's return value (in place for ops
        that mutate an input) and counts the firing."""
        self.fired += 1
        if len(self.fired_on) < 10:
            self.fired_on.append(str(func))
        if self.kind == "delay":
            time.sleep(self.value)
            return outputs
        in_place = func._schema.is_mutable

        def one(t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return t
            faulted = self.apply(t)
            if in_place:
                t.copy_(faulted)
                return t
            return faulted

        if isinstance(outputs, (tuple, list)):
            return type(outputs)(one(t) for t in outputs)
        return one(outputs)


def parse_fault(spec: str, seed: int = 0) -> FaultSpec:
    """Parses one fault spec; ValueError says what is accepted."""
    body, _, condition = spec.strip().partition("@")
    size, at_least = _parse_size(condition, spec) if condition else ("", 0)
    op, sep, rest = body.partition(":")
    if not sep or not op or not rest:
        raise ValueError(f"fault spec {spec!r}: expected {GRAMMAR}")
    _check_op(op, spec)
    kind, has_value, raw = parse_kind(rest, KINDS, spec, VALUE_REQUIRED)
    value: Union[float, str, None] = None
    if kind in ("round", "round-inputs"):
        if raw not in ROUND_FORMATS:
            raise ValueError(f"fault spec {spec!r}: round to {raw!r}? accepted: {', '.join(ROUND_FORMATS)}")
        value = raw
    elif has_value:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"fault spec {spec!r}: value {raw!r} is not a number ({KINDS[kind]})") from None
        if not math.isfinite(value):
            raise ValueError(f"fault spec {spec!r}: value must be finite")
        if kind in ("nan", "inf", "zero") and not 0 < value <= 1:
            raise ValueError(f"fault spec {spec!r}: {kind} takes a fraction in (0, 1], got {raw}")
        if kind in ("noise", "delay", "ulp", "reorder") and value < 0:
            raise ValueError(f"fault spec {spec!r}: {kind} must not be negative, got {raw}")
        if kind == "ulp" and not value.is_integer():
            raise ValueError(f"fault spec {spec!r}: ulp counts whole ulps, got {raw}")
    if kind == "reorder" and op != EVERY_OP and op.split(".")[1] not in reorder.COVERED:
        raise ValueError(f"fault spec {spec!r}: reorder models the reductions {', '.join(reorder.COVERED)}; "
                         f"{op} is not one of them")
    return FaultSpec(spec=spec.strip(), op=op, kind=kind, value=value, seed=seed, size=size, at_least=at_least)


def _parse_size(condition: str, spec: str):
    name, sep, number = condition.partition(">=")
    if not sep or name not in SIZES or not number.isdigit():
        raise ValueError(f"fault spec {spec!r}: expected @k>=N (reduction length) or @numel>=N (output elements) "
                         f"after the kind, got @{condition}")
    return name, int(number)


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in compat.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def reduction_length(func: torch._ops.OpOverload, args: Sequence, outputs=None) -> Optional[int]:
    """The number of terms each output element of the call sums: the contracted dimension of a
    matmul, the kernel volume times input channels of a convolution (for its backward, the larger of
    the input and the weight gradient's: the batch times the output's spatial size), and input
    over output elements for a reduction (None while its ``outputs`` are not known). 1 for
    elementwise ops."""
    name = str(func.overloadpacket).split(".")[-1]
    if name in ("mm", "bmm", "matmul"):
        return int(args[0].shape[-1])
    if name in ("addmm", "baddbmm", "addbmm", "addmv"):
        return int(args[1].shape[-1])
    if name in ("convolution", "_convolution"):
        return reorder.convolution_terms(args[1], args[6], args[8])
    if name == "convolution_backward":
        grad, weight, transposed, groups = args[0], args[2], args[7], args[9]
        return int(max(reorder.input_grad_terms(weight, transposed, groups), grad.shape[0] * math.prod(grad.shape[2:])))
    if outputs is None:
        return None
    inputs, results = _tensors(args), _tensors(outputs)
    if not inputs or not results:
        return 1
    return max(1, inputs[0].numel() // max(1, max(t.numel() for t in results)))


def parse_faults(specs: Iterable[Union[str, FaultSpec]]) -> List[FaultSpec]:
    """Parses specs (FaultSpec objects pass through); each gets its own seed."""
    return [s if isinstance(s, FaultSpec) else parse_fault(s, seed=i) for i, s in enumerate(specs)]


def _check_op(op: str, spec: str) -> None:
    if op == EVERY_OP:
        return
    parts = op.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"fault spec {spec!r}: op {op!r} must be <namespace>.<op>[.<overload>], "
                         "e.g. aten.addmm or aten._softmax.default")
    try:
        packet = getattr(getattr(torch.ops, parts[0]), parts[1])
    except (AttributeError, RuntimeError):
        raise ValueError(f"fault spec {spec!r}: no operator {'.'.join(parts[:2])!r} in this torch build "
                         "(names are aten op names such as aten.addmm, aten._softmax, "
                         "aten.native_layer_norm, aten.convolution_backward)") from None
    if len(parts) == 3 and parts[2] not in packet.overloads():
        raise ValueError(f"fault spec {spec!r}: {parts[0]}.{parts[1]} has no overload {parts[2]!r}; "
                         f"it has: {', '.join(packet.overloads())}")


def is_view_op(func: torch._ops.OpOverload) -> bool:
    """True for ops whose every output aliases an input without writing it (view, t, split...)."""
    returns = compat.return_aliases(func)
    return bool(returns) and all(write is False for write in returns)


def run_with_faults(faults: Sequence[FaultSpec], func: torch._ops.OpOverload, args: Sequence, kwargs: dict):
    """``func(*args, **kwargs)`` with every matching fault, in order: ``round-inputs`` rounds copies
    of the inputs before the op runs (not for ops that write an argument), the others change its
    return value."""
    active = [f for f in faults if f.matches(func)] if faults and not is_view_op(func) else []
    if not active:
        return func(*args, **kwargs)
    rounding = [f for f in active if f.kind == "round-inputs" and not func._schema.is_mutable]
    # Past matmuls and convolutions, a reduction's length is known from its output: run it once to see.
    unsized = [f for f in rounding if not f.sized_by_inputs(func, args)]
    trial = func(*args, **kwargs) if unsized else None
    for fault in rounding:
        if fault.large_enough(func, args, trial):
            with compat.disable_current_modes():  # the fault's own ops belong to no trace
                args, kwargs = fault.round_inputs(func, args, kwargs)
    outputs = func(*args, **kwargs)
    for fault in active:
        if fault.kind != "round-inputs" and fault.large_enough(func, args, outputs):
            with compat.disable_current_modes():
                outputs = (fault.reorder(func, args, kwargs, outputs) if fault.kind == "reorder"
                           else fault.perturb(func, outputs))
    return outputs


def never_fired(faults: Iterable[FaultSpec]) -> List[FaultSpec]:
    """The faults whose op never ran (a typo, or an op this part does not use)."""
    return [f for f in faults if f.fired == 0]


class FaultMode(compat.TorchDispatchMode):
    """Applies faults to the outputs of matching ops of whatever runs inside it."""

    def __init__(self, faults: Sequence[FaultSpec]):
        super().__init__()
        self.faults = list(faults)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_with_faults(self.faults, func, args, kwargs or {})


@contextlib.contextmanager
def inject(faults: Iterable[Union[str, FaultSpec]]) -> Iterator[List[FaultSpec]]:
    """Context manager for runs that do not capture: ``with inject(["aten.mm:scale=2"]) as fs:``;
    afterwards ``fs[i].fired`` says how often each fired."""
    parsed = parse_faults(faults)
    if not parsed:
        yield parsed
        return
    with FaultMode(parsed):
        yield parsed

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
from typing import Iterable, Iterator, List, Sequence, Union

import torch

from runtime import compat
from runtime.faultspec import parse_kind

from .precision import round_to_tf32
from .ulp import perturb_ulps

KINDS = {
    "noise": "noise=<relative std>: multiplies each element by (1 + std * N(0, 1)), fixed seed",
    "offset": "offset=<abs>: adds a constant",
    "scale": "scale=<factor>: multiplies by a factor",
    "round": "round=bf16|fp16|tf32: rounds to that format (tf32: 10-bit mantissa)",
    "ulp": "ulp=<k>: moves each element by a uniform random whole number of ulps, at most k (a correct "
           "device's last-bit error), fixed seed",
    "nan": "nan[=<fraction>]: one element (or that fraction of them) becomes NaN",
    "inf": "inf[=<fraction>]: one element (or that fraction of them) becomes +Inf",
    "zero": "zero[=<fraction>]: every element (or that fraction of them) becomes 0",
    "delay": "delay=<seconds>: sleeps after the op (a slow device, for benchmark gates)",
}
VALUE_REQUIRED = ("noise", "offset", "scale", "round", "delay", "ulp")
EVERY_OP = "*"
ROUND_FORMATS = ("bf16", "fp16", "tf32")
GRAMMAR = "<namespace>.<op>[.<overload>]:<kind>[=<value>] or *:<kind>[=<value>], e.g. aten.softmax:noise=1e-3"

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

    def matches(self, func: torch._ops.OpOverload) -> bool:
        packet, full = str(func.overloadpacket), str(func)
        return self.op in (EVERY_OP, packet, full) or packet in DECOMPOSED_TO.get(self.op, ())

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
            if self.value == "tf32":
                return round_to_tf32(x.float()).to(x.dtype)
            return x.to(torch.float16 if self.value == "fp16" else torch.bfloat16).to(x.dtype)
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
    op, sep, rest = spec.strip().partition(":")
    if not sep or not op or not rest:
        raise ValueError(f"fault spec {spec!r}: expected {GRAMMAR}")
    _check_op(op, spec)
    kind, has_value, raw = parse_kind(rest, KINDS, spec, VALUE_REQUIRED)
    value: Union[float, str, None] = None
    if kind == "round":
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
        if kind in ("noise", "delay", "ulp") and value < 0:
            raise ValueError(f"fault spec {spec!r}: {kind} must not be negative, got {raw}")
        if kind == "ulp" and not value.is_integer():
            raise ValueError(f"fault spec {spec!r}: ulp counts whole ulps, got {raw}")
    return FaultSpec(spec=spec.strip(), op=op, kind=kind, value=value, seed=seed)


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


def apply_faults(faults: Sequence[FaultSpec], func: torch._ops.OpOverload, outputs):
    """Applies every matching fault, in order, to an op's return value."""
    if not faults or is_view_op(func):
        return outputs
    for fault in faults:
        if fault.matches(func):
            with compat.disable_current_modes():  # the fault's own ops belong to no trace
                outputs = fault.perturb(func, outputs)
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
        return apply_faults(self.faults, func, func(*args, **(kwargs or {})))


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

"""Whole-run results judged against natural variability, as the CESM ensemble consistency test
judges ports of chaotic codes: a part's final outputs and gradients (one forward and backward, or
several optimizer steps) are compared with an ensemble of CPU runs whose weights and inputs carry
ulp-level perturbations, whose elementwise functions are wrong by up to their documented budgets
and whose sums, matmuls and convolutions carry a drawn error of another summation order
(:mod:`parity.reorder`), as a correct device may be by the error model
(:meth:`~parity.errormodel.ErrorModel.correct_device_profile`). Without the second, a part with no
weights (the sine position encoding) has no variability at all, and a device whose sine is within
CUDA's documented 2 ulp would fail its output; without the third, a device that only sums in
another order fails three training steps, whose cancelling weight gradients AdamW amplifies.

An op-level allowance cannot judge these: AdamW divides by sqrt(v) and turns last-bit differences
of near-zero gradients into changes of a whole learning rate, and after a deep network a legitimate
kernel difference is amplified by the network's condition, which no single op sees. The ensemble
measures that amplification on the CPU.

The rule, per output tensor: with r_d the device's RMSE against golden and r_j each member's
(the unperturbed baseline is a member), the statistic S = r_d^2 / mean_j(r_j^2) follows an F
distribution with (nu, J nu) degrees of freedom if the device's error is another draw of the same
variability (Gaussian errors, nu independent ones per tensor). The device fails when S exceeds the
F quantile at 1 - FALSE_POSITIVE_RATE / T, T the number of tensors judged in the part (Bonferroni),
so a correct device fails a part with probability at most FALSE_POSITIVE_RATE. The margin is
sqrt(S / quantile): the device's RMSE in units of the allowed RMSE.

``statistic="median"`` measures each run's error by the square root of the median squared error
over the tensor instead of the RMS. Parameters after AdamW steps need it: Adam divides by
sqrt(v) + eps, so where a clipped gradient is near eps (about 1e-8) a discrete event of a correct
device, one ReLU of a near-cancelling residual sum flipping at one step, changes a block of
thousands of weights by up to a tenth of a learning rate. The members rarely draw such an
event; the median ignores it, while a dense fault (the update scaled, a moment off) moves every
element and the median with it. Measured on tiny's layer2.0.conv1.weight after three steps at
seed 8 with every add rounded faithfully: 4 % of the elements more than 10x the members' RMS, the
RMS 6.4x the members', the median 1.02x (docs/calibration.md).

``NU_MAX``: a tensor's elements share upstream error and are far from independent, so each tensor
is credited with at most this many degrees of freedom. That widens the envelope for large tensors
(in a part of 176 tensors a device may reach 3.3 times the RMS error of the 6 draws: 5 perturbed
runs and the baseline) and
keeps scalars (nu = 1) honest about their heavy tail.
"""
import hashlib
import math
from collections import OrderedDict
from typing import Any, Callable, Hashable, List, Optional

import numpy as np
import torch
from scipy.stats import f as f_distribution

from runtime import compat

from .errormodel import REFERENCE_ULPS, ROUNDING_ULPS
from .judge import OutputJudgement, nonfinite_verdict, structure_verdict
from .metrics import as_numpy64, metrics_of_difference, rms_finite, rmse_of_difference
from .ulp import perturb_ulps

# Perturbed runs besides the baseline. A correct device flips ReLUs whose pre-activation it puts on
# the other side of zero (tiny's compiled backbone: one at 1.3e-7, in layer2.1, moves a weight
# gradient by 1.1); a member draws such a flip only by chance. Measured on that backbone through
# Inductor at the suite's batch, seeds 0-5: with 3 members the correct compiled run failed at seeds
# 0 and 1 (54x, 236x), with 5 and with 8 at none (docs/calibration.md).
ENSEMBLE_SIZE = 5
PERTURBATION_ULPS = 1
FALSE_POSITIVE_RATE = 0.005
NU_MAX = 4
CACHE_ENTRIES = 6
STATISTICS = ("rms", "median")


def perturb_module(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Moves every floating parameter and buffer of ``module`` (in place) by up to one ulp."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(perturb_ulps(tensor, PERTURBATION_ULPS, generator))
    return module


def perturb_inputs(inputs: Any, generator: torch.Generator) -> Any:
    """A copy of a pytree of inputs with every floating tensor moved by up to one ulp."""
    def move(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return perturb_ulps(leaf.detach(), PERTURBATION_ULPS, generator).requires_grad_(leaf.requires_grad)
        return leaf

    return compat.tree_map(move, inputs)


def digest(*trees: Any) -> str:
    """A content hash of tensors (and the repr of other leaves) in pytrees, for the cache key."""
    h = hashlib.blake2b(digest_size=16)
    for tree in trees:
        for leaf in compat.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()


class EnsembleCache:
    """The members of recent ensembles, by key: the fault catalogue and repeated parts reuse them."""

    def __init__(self, entries: int = CACHE_ENTRIES):
        self.entries = entries
        self.store: "OrderedDict[Hashable, List[Any]]" = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], List[Any]]) -> List[Any]:
        if key in self.store:
            self.store.move_to_end(key)
            return self.store[key]
        members = build()
        self.store[key] = members
        while len(self.store) > self.entries:
            self.store.popitem(last=False)
        return members


CACHE = EnsembleCache()


def threshold(nu: int, members: int, tests: int) -> float:
    """The F quantile that S may reach: false-positive rate FALSE_POSITIVE_RATE over ``tests``."""
    return float(f_distribution.ppf(1 - FALSE_POSITIVE_RATE / max(tests, 1), nu, members * nu))


def scale(errors: np.ndarray, statistic: str) -> float:
    """The size of one run's flat float64 ``errors``: their RMS, or the root of their median square."""
    if statistic == "median":
        return math.sqrt(float(np.median(errors * errors))) if errors.size else 0.0
    return rms_finite(errors)


def judge_against_ensemble(device: torch.Tensor, baseline: torch.Tensor, golden: torch.Tensor,
                           members: List[Optional[torch.Tensor]], tests: int,
                           statistic: str = "rms") -> OutputJudgement:
    """Judges one final output or gradient (any shape) against the ensemble ``members`` (the
    baseline first); ``tests`` is the number of tensors judged in the part; ``statistic`` is
    how each run's error is sized (one of ``STATISTICS``)."""
    problem = structure_verdict(device, baseline, golden, check_dtype=False)
    if problem:
        return OutputJudgement(0, "ensemble", False, problem, float("inf"))
    usable = [m for m in members if m is not None and tuple(m.shape) == tuple(golden.shape)]
    d, g = as_numpy64(device), as_numpy64(golden)
    runs = [as_numpy64(m) for m in usable]
    finite = np.isfinite(d) & np.isfinite(g)
    for r in runs:
        finite &= np.isfinite(r)
    verdict = nonfinite_verdict(device, baseline)
    d, g, runs = d[finite], g[finite], [r[finite] for r in runs]
    device_rmse = scale(d - g, statistic)
    spread = float(np.mean([scale(r - g, statistic) ** 2 for r in runs])) if runs else 0.0
    nu = max(1, min(int(g.size), NU_MAX))
    eps = torch.finfo(baseline.dtype).eps if baseline.is_floating_point() else 0.0
    floor = (ROUNDING_ULPS + REFERENCE_ULPS) * eps * rms_finite(g)
    allowed = max(float(np.sqrt(threshold(nu, max(len(runs), 1), tests) * spread)), floor,
                  torch.finfo(torch.float64).tiny)
    margin = device_rmse / allowed if device_rmse else 0.0
    base_margin = scale(runs[0] - g, statistic) / allowed if runs else None
    if verdict is None and not margin <= 1:
        size = "RMSE" if statistic == "rms" else "median error"
        verdict = (f"fail: {size} {device_rmse:.3g} is {margin:.3g}x the ensemble's allowed {allowed:.3g} "
                   f"({len(runs)} CPU runs, false-positive rate {FALSE_POSITIVE_RATE:g})")
    return OutputJudgement(0, "ensemble", verdict is None, verdict or "pass", margin, "ensemble",
                           metrics_of_difference(d - g, g), rmse_of_difference(runs[0] - g) if runs else None,
                           base_margin)

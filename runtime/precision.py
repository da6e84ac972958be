"""The precisions a run can be in, and the one parser of a ``--precision`` list.

What each precision means for a part's casts and switches is in ``parity.precision``; for a
training run, in ``training.train``.
"""
from typing import List

PRECISIONS = ("fp32", "tf32", "amp", "fp16", "bf16")


def parse_precision_names(spec: str) -> List[str]:
    """``"fp32, bf16,fp32"`` -> ``["fp32", "bf16"]``: repeats are merged, in first-seen order, since a
    repeated precision would run twice under ids that no report or expectations entry matches.
    ValueError names the accepted ones."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no precision given; accepted: {', '.join(PRECISIONS)}")
    bad = [n for n in names if n not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision {', '.join(map(repr, bad))}; accepted: {', '.join(PRECISIONS)}"
                         " (comma-separated)")
    return list(dict.fromkeys(names))

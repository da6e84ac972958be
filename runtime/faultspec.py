"""The grammar that the suite's two families of injected faults share: a place, then a kind from a
table of kinds, with a value where the kind takes one.

- op faults (``--inject-fault``, :mod:`parity.faults`): ``<aten op>:<kind>[=<value>]``;
- training faults (``--fail-at``, :mod:`training.faults`): ``<rank>:<step>:<kind>``.

Each family keeps its table as ``{kind: "how to write it: what it does"}``; help texts and error
messages are built from the table, so a new kind is written once.
"""
from typing import Collection, Mapping, Tuple


def parse_kind(text: str, kinds: Mapping[str, str], spec: str, needs_value: Collection[str] = (),
               label: str = "fault spec") -> Tuple[str, bool, str]:
    """``"noise=1e-3"`` -> ``("noise", True, "1e-3")``; ValueError names ``spec`` and the accepted kinds.
    A kind listed in ``needs_value`` must have a value; one that is not in ``kinds``' help as
    ``kind=`` or ``kind[=`` takes none."""
    kind, has_value, raw = text.partition("=")
    if kind not in kinds:
        raise ValueError(f"{label} {spec!r}: unknown kind {kind!r}; accepted kinds:\n  " + "\n  ".join(kinds.values()))
    if kind in needs_value and not has_value:
        raise ValueError(f"{label} {spec!r}: kind {kind!r} needs a value: {kinds[kind]}")
    if has_value and not kinds[kind].startswith((f"{kind}=", f"{kind}[=")):
        raise ValueError(f"{label} {spec!r}: kind {kind!r} takes no value: {kinds[kind]}")
    return kind, has_value, raw


def kinds_help(kinds: Mapping[str, str]) -> str:
    """``"noise, offset, ..."``: the kinds' names for an option's help text."""
    return ", ".join(kinds)

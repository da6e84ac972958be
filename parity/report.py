"""Parity results as files, written atomically (a temporary file in the same directory, then
``os.replace``, readable as the umask allows): JSON for machines, Markdown for people, plus one
terminal line per (part, precision). Runs accumulate: an entry replaces the earlier one of the same
node id, device and precision, every entry carries the time it was written, and a report that
cannot be read is kept aside as ``*.corrupt-<time>``, never overwritten. Sessions that write one
report at once take turns (:func:`runtime.files.locked`).

A report is ``{"tests": [entry, ...]}``; an entry is :meth:`parity.compare.PartResult.to_dict`:
``nodeid, part, device, precision, passed, ops_checked, ops_identical, ops_skipped, worst_op_margin,
worst_end_to_end_margin, ensemble_size, first_failure`` (a dict with ``op, module, phase, shapes,
max_abs, max_rel, cosine, rmse, margin, verdict``, or null), ``ops`` (one row per replayed op, with
its ``margin``: the error in units of its allowance, the ``baseline_margin`` and the ``allowance``
component that set it; null for ops bit-identical to the baseline, which pass by construction),
``whole_run``, ``end_to_end``, ``faults``, ``notes``, and ``expected_failure`` (the reason and entry of an
expectations file that names the test, or null).
Non-finite floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` so the JSON is strict.
"""
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from runtime.files import CorruptReport, PathLike, atomic_write, load_list_or_set_aside, locked, remove_temporaries

MAX_MARKDOWN_ROWS = 40


ENTRY_KEY = ("nodeid", "device", "precision")


def merge_entries(existing: Iterable[dict], new: Iterable[dict]) -> List[dict]:
    """``existing`` in its order without the entries that ``new`` replaces (same node id, device and
    precision), then ``new``."""
    new = list(new)
    replaced = {tuple(e.get(k) for k in ENTRY_KEY) for e in new}
    return [e for e in existing if tuple(e.get(k) for k in ENTRY_KEY) not in replaced] + new


def _entry(test: Any, nodeid: Optional[str] = None) -> dict:
    return test.to_dict(nodeid) if hasattr(test, "to_dict") else dict(test)


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def to_json(tests: Iterable[Any]) -> str:
    """The JSON text of a report; ``tests`` are PartResult-like objects or entry dicts."""
    return json.dumps({"tests": [_strict(_entry(t)) for t in tests]}, indent=1, allow_nan=False)


def write_json(path: PathLike, tests: Iterable[Any]) -> Path:
    return atomic_write(path, to_json(tests))


def load_json(path: PathLike) -> Dict[str, List[dict]]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}"


def _cos(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else _num(value)


def _cell(text: Any) -> str:
    return str(text if text not in (None, "") else "-").replace("|", "\\|").replace("\n", " ")


def to_markdown(tests: Iterable[Any], title: str = "Parity report") -> str:
    """Summary table, then per test the first failure, notes, and the worst ops."""
    entries = [_entry(t) for t in tests]
    lines = [f"# {title}", "", "Margins are errors in units of their allowance: 1 or less passes. Ops and "
             "outputs bit-identical to the baseline pass by construction and have no margin.", "",
             "| test | part | device | precision | result | ops checked (identical) | worst op margin "
             "| worst end-to-end margin "
             "| first failure |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        worst = _worst_row(e)
        fail = e.get("first_failure")
        lines.append("| " + " | ".join(_cell(v) for v in (
            e.get("nodeid"), e.get("part"), e.get("device"), e.get("precision"),
            _result(e), f"{e.get('ops_checked')} ({e.get('ops_identical') or 0})",
            f"{_num(worst.get('margin'))} ({worst.get('overload')})" if worst else None,
            _num(e.get("worst_end_to_end_margin")),
            f"{fail.get('overload') or fail.get('module')}: {fail.get('verdict')}" if fail else None)) + " |")
    for e in entries:
        lines += ["", f"## {e.get('part')} ({e.get('precision')} on {e.get('device')})", ""]
        if e.get("nodeid"):
            lines.append(f"Test: `{e['nodeid']}`")
        fail = e.get("first_failure")
        if fail:
            lines += ["", f"**First failure** ({fail.get('source', 'replay')}): `{fail.get('overload')}` "
                          f"({fail.get('phase')}) in `{fail.get('module')}`, shapes `{fail.get('shapes')}`: "
                          f"{fail.get('verdict')}. max abs {_num(fail.get('max_abs'))}, max rel "
                          f"{_num(fail.get('max_rel'))}, cosine {_cos(fail.get('cosine'))}, rmse "
                          f"{_num(fail.get('rmse'))}, margin {_num(fail.get('margin'))}."]
        for f in e.get("faults") or []:
            lines.append(f"- injected fault `{f['spec']}` fired {f['fired']} time(s)")
        for n in e.get("notes") or []:
            lines.append(f"- note: {n}")
        rows = _interesting_rows(e.get("ops") or [])
        if rows:
            lines += ["", "| # | op | module | phase | shapes | max abs | max rel | cosine | margin | CPU margin "
                          "| allowance | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append("| " + " | ".join(_cell(v) for v in (
                    r.get("index"), r.get("overload"), r.get("module"), r.get("phase"), r.get("shapes"),
                    _num(r.get("max_abs")), _num(r.get("max_rel")), _cos(r.get("cosine")), _num(r.get("margin")),
                    _num(r.get("baseline_margin")), r.get("allowance"), r.get("verdict"))) + " |")
    return "\n".join(lines) + "\n"


def _result(entry: dict) -> str:
    """pass, an expected failure (an expectations entry names the test) with its reason, or FAIL."""
    if entry.get("passed"):
        return "pass"
    return f"expected failure: {entry['expected_failure']}" if entry.get("expected_failure") else "**FAIL**"


def _margin(row: dict) -> float:
    value = row.get("margin")
    if isinstance(value, str):
        return math.inf if value == "inf" else -1.0
    return -1.0 if value is None else value


def _worst_row(entry: dict) -> Optional[dict]:
    rows = [r for r in entry.get("ops") or [] if r.get("status") != "skipped" and r.get("margin") is not None]
    return max(rows, key=_margin, default=None)


def _interesting_rows(rows: List[dict]) -> List[dict]:
    """Failing ops first (in order), then the largest margins, at most MAX_MARKDOWN_ROWS."""
    failing = [r for r in rows if r.get("status") == "fail"]
    rest = sorted((r for r in rows if r.get("status") == "pass"), key=_margin, reverse=True)
    return (failing + rest)[:MAX_MARKDOWN_ROWS]


def write_markdown(path: PathLike, tests: Iterable[Any], title: str = "Parity report") -> Path:
    return atomic_write(path, to_markdown(tests, title))


def write_report(directory: PathLike, tests: Iterable[Any], name: str = "parity") -> Dict[str, Any]:
    """Merges ``tests`` into ``<name>.json`` and ``<name>.md`` under ``directory`` and writes one
    margin plot per new part; returns their paths (``plots``: a list), the merged ``entries`` and a
    ``warning`` (None, or what happened to an unreadable earlier report)."""
    from .plots import write_plots

    written = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tests = [{**_entry(t), "time": written} for t in tests]
    directory = Path(directory)
    warning = None
    with locked(directory / f"{name}.json"):  # another session may be adding to the same report
        for names in (f"{name}.json", f"{name}.md", "margins-*.png"):
            remove_temporaries(directory, names)
        try:
            existing = load_list_or_set_aside(directory / f"{name}.json", "tests")
        except CorruptReport as exc:
            existing, warning = [], str(exc)
        entries = merge_entries(existing, tests)
        return {"json": write_json(directory / f"{name}.json", entries),
                "markdown": write_markdown(directory / f"{name}.md", entries),
                "plots": write_plots(directory, tests), "entries": entries, "warning": warning}


def _compiled_summary(entries: List[dict]) -> str:
    """``, compiled with inductor: 1 graph(s), 0 break(s), worst margin 0.31`` for parts run with
    ``--compile``; empty otherwise."""
    compiled = [e["compiled"] for e in entries if e.get("compiled")]
    if not compiled:
        return ""
    margins = [e["worst_compiled_margin"] for e in entries if isinstance(e.get("worst_compiled_margin"), float)]
    worst = f"worst margin {_num(max(margins))}" if margins else "bit-identical to the baseline"
    decomposed = [e["decomposed"] for e in entries if e.get("decomposed")]
    count = sum(d["ops_checked"] for d in decomposed)
    replayed = f"{count} decomposed ops replayed, " if count else ""
    nodes = [e["localised"]["node"] for e in entries if (e.get("localised") or {}).get("node")]
    culprit = f", bisected to node #{nodes[0]['index']} {nodes[0]['target']} in {nodes[0]['module']}" if nodes else ""
    return (f", {replayed}compiled with {compiled[0]['backend']}: {sum(c['graphs'] for c in compiled)} graph(s), "
            f"{sum(c['breaks'] for c in compiled)} break(s), {worst}{culprit}")


def summary_lines(tests: Iterable[Any]) -> List[str]:
    """One line per (part, precision): ops checked, the worst op margin and its op, the worst
    end-to-end margin, the first failure."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for t in tests:
        e = _entry(t)
        groups.setdefault((e.get("part"), e.get("precision")), []).append(e)
    lines = []
    for (part, precision), entries in groups.items():
        checked = sum(e.get("ops_checked") or 0 for e in entries)
        same = sum(e.get("ops_identical") or 0 for e in entries)
        worst = max((w for w in map(_worst_row, entries) if w), key=_margin, default=None)
        fail = next((e["first_failure"] for e in entries if e.get("first_failure")), None)
        failed = [e for e in entries if not e.get("passed")]
        status = "FAIL" if any(not e.get("expected_failure") for e in failed) else "XFAIL" if failed else "PASS"
        tensors = sum(e.get("tensors_judged") or 0 for e in entries)
        if checked or not tensors:
            line = f"{status} {part} [{precision}]: {checked} ops checked"
        else:  # a whole run judged at its end only (several steps: no op-by-op replay)
            by = " by median error" if any(e.get("statistic") == "median" for e in entries) else ""
            line = (f"{status} {part} [{precision}]: {tensors} tensors judged end to end against the ensemble{by} "
                    f"({sum(e.get('tensors_identical') or 0 for e in entries)} bit-identical to the baseline)")
        if checked:
            line += f" ({same} bit-identical to the baseline)"
        if worst:
            line += f", worst op margin {_num(worst.get('margin'))} ({worst.get('overload')} in {worst.get('module')})"
        ends = [
            e.get("worst_end_to_end_margin") for e in entries if isinstance(e.get("worst_end_to_end_margin"), float)
        ]
        if ends:
            line += f", worst end-to-end margin {_num(max(ends))}"
        line += _compiled_summary(entries)
        errors = [e["error"] for e in entries if e.get("error")]
        if errors:
            line += f", error: {errors[0]}"
        elif fail:
            line += f", first failure: {fail.get('overload') or fail.get('module')} in {fail.get('module')}: " \
                    f"{fail.get('verdict')}"
        else:
            line += ", no failure"
        lines.append(line)
    return lines

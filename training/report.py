"""The training report: one JSON row per configuration run, merged across runs, and a Markdown page in
the layout of FlagPerf's vendor pages (environment, general metrics, performance table, convergence).

Both files are rewritten atomically after every run, one session at a time; a report file that cannot
be read is kept aside under a new name, never overwritten.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from runtime.files import CorruptReport, atomic_write, load_list_or_set_aside, locked, remove_temporaries

JSON_NAME = "training_report.json"
MD_NAME = "training_report.md"
ROW_KEY = ("config", "device", "precision", "model", "dataset", "compiled")  # compiled: a --compile backend
CONFIG_ORDER = {"1x1": 0, "1x8": 1, "2x8": 2}

GENERAL_METRICS = (
    ("task", "object detection", ""),
    ("model", "DETR ({model})", ""),
    ("dataset", "{dataset}", ""),
    ("precision", "{precision}", ""),
    ("hyper-parameters", "fix_hp, see performance", "the same on every device"),
    ("device", "{device_name}", ""),
    ("memory", "mem, see performance", "peak allocated by the framework / total, GiB"),
    ("end-to-end time", "e2e_time, see performance", "launch to the last process exit, initialisation included, s"),
    ("whole throughput", "p_whole, see performance", "trained images / (training + evaluation time), all ranks"),
    ("training throughput", "p_train, see performance", "as p_whole without the evaluation time"),
    (
        "**core throughput**",
        "**p_core, see performance**",
        "forward + loss + backward + step only, device synchronised (p_core > p_train > p_whole)",
    ),
    ("result", "mAP, see performance", "COCO AP@[.5:.95]: final (best)"),
)


def row_key(row: Dict[str, Any]) -> Tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def merge_rows(existing: Sequence[Dict[str, Any]], new: Dict[str, Any]) -> List[Dict[str, Any]]:
    """``existing`` with ``new`` replacing the row of the same configuration/device/precision/model/dataset."""
    rows = [r for r in existing if row_key(r) != row_key(new)] + [new]
    return sorted(
        rows,
        key=lambda r: (
            str(r.get("device")),
            str(r.get("precision")),
            CONFIG_ORDER.get(r.get("config"), 99),
            str(r.get("config")),
        ),
    )


def load_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of an earlier report; a corrupt file is renamed to ``*.corrupt-<time>`` and CorruptReport raised."""
    return load_list_or_set_aside(path, "rows")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "/"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fix_hp_text(fix_hp: Dict[str, Any]) -> str:
    return f"bs={fix_hp.get('batch_size_per_device')}, lr={fix_hp.get('lr')}" + (
        f", steps<={fix_hp['max_steps']}" if fix_hp.get("max_steps") else "")


def map_text(row: Dict[str, Any]) -> str:
    if row.get("mAP") is None:
        return "/"
    text = f"{row['mAP']:.4f}"
    if row.get("best_mAP") is not None and row["best_mAP"] != row["mAP"]:
        text += f" (best {row['best_mAP']:.4f})"
    return text


def mem_text(row: Dict[str, Any]) -> str:
    actual, total = row.get("mem_actual_gib"), row.get("mem_total_gib")
    return f"{_fmt(actual, 1)}/{_fmt(total, 1)}"


def target_text(row: Dict[str, Any]) -> str:
    if row.get("target_mAP") is None:
        return "no target (bounded run)"
    if row.get("time_to_target") is None:
        return f"{row['target_mAP']:g} not reached"
    return f"{row['target_mAP']:g} in {row['time_to_target']:.0f} s / {row['steps_to_target']} steps"


PERF_HEADER = ("config", "precision", "fix_hp", "e2e_time", "p_whole", "p_train", "p_core", "mAP", "target", "mem")


def performance_rows(rows: Sequence[Dict[str, Any]]) -> List[List[str]]:
    return [
        [
            f"{r.get('device_name', r.get('device'))} {r['config']}"
            + (f" compiled {r['compiled']}" if r.get("compiled") else ""),
            str(r.get("precision")),
            fix_hp_text(r.get("fix_hp") or {}),
            _fmt(r.get("e2e_time"), 0),
            _fmt(r.get("p_whole")),
            _fmt(r.get("p_train")),
            _fmt(r.get("p_core")),
            map_text(r),
            target_text(r),
            mem_text(r),
        ]
        for r in rows
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(rows: Sequence[Dict[str, Any]], environment: Dict[str, Any]) -> str:
    """The vendor page: environment, general metrics, the performance table and the convergence verdicts."""
    first = rows[-1] if rows else {}
    acc = environment.get("accelerator") or {}
    deps = ", ".join(f"{k} {v}" for k, v in (environment.get("dependencies") or {}).items())
    plugins = ", ".join(f"{k} {v}" for k, v in (environment.get("plugins") or {}).items()) or "none"
    out = [
        "# DETR training: FlagPerf-style report",
        "",
        "## Environment",
        "",
        "- Hardware",
        f"  - machine: {environment.get('hardware', '/')}",
        f"  - accelerator: {acc.get('name', '/')} x {acc.get('count', '/')}, {_fmt(acc.get('memory_gib'), 1)} GiB",
        f"  - interconnect between nodes: {environment.get('interconnect', '/')}",
        "- Software",
        f"  - OS: {environment.get('os', '/')}",
        f"  - kernel: {environment.get('kernel', '/')}",
        f"  - accelerator driver: {environment.get('driver', '/')}",
        f"  - framework: {environment.get('framework', '/')}; Python {environment.get('python', '/')}",
        f"  - device plugins: {plugins}",
        f"  - dependencies: {deps or '/'}",
        "",
        "## General metrics",
        "",
        table(
            ("metric", "value", "note"),
            [
                (
                    name,
                    value.format(
                        model=first.get("model", "/"),
                        dataset=first.get("dataset", "/"),
                        precision=", ".join(sorted({str(r.get("precision")) for r in rows})) or "/",
                        device_name=first.get("device_name", first.get("device", "/")),
                    ),
                    note,
                )
                for name, value, note in GENERAL_METRICS
            ],
        ),
        "",
        "## Performance",
        "",
        table(PERF_HEADER, performance_rows(rows)),
        "",
        "Throughputs in images/s over all ranks; e2e_time in seconds; mem in GiB (on the CPU: peak resident size "
        "of a rank / host memory).",
        "",
        "## Convergence against the reference",
        "",
    ]
    for r in rows:
        verdict = r.get("verdict") or {}
        name = f"{r.get('device_name', r.get('device'))} {r['config']} {r.get('precision')}"
        line = f"- {name}: {verdict.get('text', 'no reference')}"
        if r.get("reference"):
            line += f"; reference: {r['reference']}"
        if r.get("plot"):
            line += f" ![curve]({r['plot']})"
        out.append(line)
        ddp = r.get("ddp_equivalence") or {}
        if ddp.get("checked_steps"):
            worst = ddp.get("worst") or {}
            out.append(
                f"  - DDP equivalence over steps {ddp['checked_steps']}: {'pass' if ddp['passed'] else '**FAIL**'}, "
                f"worst gradient margin {ddp['worst_grad_margin']:.3g}, "
                f"parameter margin {ddp['worst_param_margin']:.3g} "
                f"({worst.get('what')} of {worst.get('tensor')} on rank {worst.get('rank')})"
            )
    out.append("")
    return "\n".join(out)


def write_report(
    report_dir: Path, row: Dict[str, Any], environment: Dict[str, Any]
) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Merges ``row`` into the report under ``report_dir`` and rewrites JSON and Markdown; returns
    the rows and a warning when an unreadable earlier report had to be set aside."""
    report_dir.mkdir(parents=True, exist_ok=True)
    warning = None
    with locked(report_dir / JSON_NAME):  # another session may be adding its row
        for name in (JSON_NAME, MD_NAME):
            remove_temporaries(report_dir, name)
        try:
            existing = load_rows(report_dir / JSON_NAME)
        except CorruptReport as exc:
            existing, warning = [], str(exc)
        rows = merge_rows(existing, row)
        atomic_write(report_dir / JSON_NAME, json.dumps({"environment": environment, "rows": rows}, indent=1) + "\n")
        atomic_write(report_dir / MD_NAME, render_markdown(rows, environment))
    return rows, warning


def summary_lines(rows: List[Dict[str, Any]], report_dir: Path) -> List[str]:
    """The terminal summary of a session's training rows: the performance table, each convergence
    verdict and DDP equivalence check, and where the report is."""
    lines = table(PERF_HEADER, performance_rows(rows)).splitlines()
    for row in rows:
        if row.get("verdict"):
            lines.append(f"{row['device']} {row['config']}: convergence {row['verdict']['text']}")
        ddp = row.get("ddp_equivalence") or {}
        if ddp.get("checked_steps"):
            lines.append(
                f"{row['device']} {row['config']}: DDP equivalence over steps {ddp['checked_steps']} "
                f"{'PASS' if ddp['passed'] else 'FAIL'}, worst gradient margin {ddp['worst_grad_margin']:.3g}, "
                f"parameter margin {ddp['worst_param_margin']:.3g}")
    lines.append(f"report: {Path(report_dir) / MD_NAME}")
    return lines

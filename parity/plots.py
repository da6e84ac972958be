"""One PNG per part and precision: each replayed op's error in units of its allowance, along
execution order, for the device and for the CPU baseline, with failures marked. An engineer sees
where error grows, and how close the CPU itself comes, without reading JSON."""
import re
from pathlib import Path
from typing import Iterable, List

from runtime.files import PathLike, atomic_write

FLOOR = 1e-4  # margins of exact ops (0) are drawn at the bottom of the log axis


def _value(v) -> float:
    if isinstance(v, str):
        return float(v)
    return float(v) if v is not None else 0.0


def plot_filename(entry: dict) -> str:
    """``margins-<part>-<precision>-<device>.png``: one plot per report entry's key, so that the
    plots of a report that accumulates runs on several devices do not replace each other."""
    key = f"{entry.get('part')}-{entry.get('precision')}-{entry.get('device')}"
    return f"margins-{re.sub(r'[^A-Za-z0-9]+', '-', key).strip('-').lower()}.png"


def plot_margins(entry: dict, path: PathLike) -> Path:
    """Writes the margin plot of one report entry (see :mod:`parity.report`) to ``path``."""
    import io

    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    rows = [r for r in entry.get("ops") or [] if r.get("status") != "skipped" and r.get("margin") is not None]
    order = list(range(len(rows)))
    device = [max(_value(r["margin"]), FLOOR) for r in rows]
    baseline = [max(_value(r.get("baseline_margin")), FLOOR) for r in rows]
    failed = [i for i, r in enumerate(rows) if r.get("status") == "fail"]
    # A bare Figure with fixed margins and line markers: no pyplot figure manager, no second draw
    # for tight_layout, no per-point paths of scatter.
    figure = Figure(figsize=(10, 3.6), dpi=100)
    figure.subplots_adjust(left=0.09, right=0.99, bottom=0.14, top=0.9)
    axis = figure.add_subplot()
    axis.plot(order, baseline, ".", markersize=3, color="tab:gray", alpha=0.6, label="CPU baseline")
    axis.plot(order, device, ".", markersize=3, color="tab:blue", label=f"device ({entry.get('device')})")
    if failed:
        axis.plot([order[i] for i in failed], [device[i] for i in failed], "x", markersize=7, color="tab:red",
                  label=f"failed ({len(failed)})")
    axis.axhline(1.0, color="tab:red", linewidth=1, linestyle="--")
    axis.set_yscale("log")
    # Fixed limits: an empty log axis (a part whose every op is bit-identical) gets a readable range.
    axis.set_ylim(FLOOR / 2, max([10.0] + [2 * m for m in device + baseline if m < float("inf")]))
    axis.set_xlim(-1, max(len(rows), 1))
    # Decades only, labelled as plain numbers: minor ticks and mathtext labels were most of a draw.
    axis.yaxis.set_major_locator(LogLocator(base=10))
    axis.yaxis.set_minor_locator(NullLocator())
    axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_xlabel("op in execution order (isolated replay)")
    axis.set_ylabel("error / allowed error")
    status = "pass" if entry.get("passed") else "FAIL"
    end = entry.get("worst_end_to_end_margin")
    end = f"{_value(end):.3g}" if end is not None else "- (identical)"
    axis.set_title(f"{entry.get('part')} [{entry.get('precision')} on {entry.get('device')}]: {status}, "
                   f"{len(rows)} ops differ from the baseline, worst end-to-end margin {end}", fontsize=9)
    axis.legend(loc="upper left", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())


def write_plots(directory: PathLike, entries: Iterable[dict]) -> List[Path]:
    """One PNG per entry that replayed ops, under ``directory``."""
    return [plot_margins(e, Path(directory) / plot_filename(e)) for e in entries if e.get("ops")]

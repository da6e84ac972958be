"""FlagPerf's training metrics, computed from the raw counters a ``training.train`` run writes to result.json.

All throughputs are global: samples trained on all ranks together, per second.
- p_whole: samples / (training + evaluation time)
- p_train: samples / training time (data loading included, evaluation excluded; of the slowest rank)
- p_core:  samples / device-synchronised forward+loss+backward+step time (of the slowest rank)
"""
import math
from typing import Any, Dict, Optional


class MetricsError(ValueError):
    """The counters cannot give honest metrics (zero time, missing fields); the message says which."""


REQUIRED = ("samples", "train_time", "eval_time", "core_time", "steps")


def _rate(samples: float, seconds: float, name: str) -> float:
    if not seconds > 0 or not math.isfinite(seconds):
        raise MetricsError(f"{name}: {samples} samples over {seconds} s is not a throughput")
    return samples / seconds


def flagperf_metrics(result: Dict[str, Any], e2e_time: Optional[float] = None) -> Dict[str, Any]:
    """{e2e_time, p_whole, p_train, p_core, mAP, best_mAP, ...} from a run's result.json.

    ``e2e_time`` is the launcher's wall time (process start to the last exit); without it the
    rank-0 process's own figure is used.
    """
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise MetricsError(f"result lacks {missing}")
    samples = float(result["samples"])
    train, evaluation, core = float(result["train_time"]), float(result["eval_time"]), float(result["core_time"])
    target = result.get("target_reached") or {}
    return {
        "e2e_time": float(e2e_time if e2e_time is not None else result["e2e_time"]),
        "p_whole": _rate(samples, train + evaluation, "p_whole"),
        "p_train": _rate(samples, train, "p_train"),
        "p_core": _rate(samples, core, "p_core"),
        "samples": samples,
        "steps": int(result["steps"]),
        "mAP": result.get("mAP"),
        "best_mAP": result.get("best_mAP"),
        "target_mAP": result.get("target_mAP"),
        "time_to_target": target.get("elapsed"),
        "steps_to_target": target.get("steps"),
        "mem_actual_gib": result.get("mem_actual_gib"),
        "mem_total_gib": result.get("mem_total_gib"),
    }


def ranks_agree(result: Dict[str, Any]) -> bool:
    """True when every rank ended with bit-identical parameters."""
    digests = result.get("param_digests") or []
    return len(digests) == int(result.get("world_size", len(digests))) and len(set(digests)) == 1

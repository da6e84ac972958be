"""The suite's state for one pytest session, kept in ``config.stash`` under one key.

Set up by ``markers.plugin`` in ``pytest_configure`` from the validated options; the fixtures and
report hooks read and add to it. A session that failed before configuration has none.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pytest


@dataclass
class SuiteState:
    xpu: Any  # runtime.device.Device: the device under test
    precisions: List[str]
    model_config: str
    faults: List[str] = field(default_factory=list)
    fault_fired: Counter = field(default_factory=Counter)
    coco_batch: Optional[Any] = None  # detr.data.batch.CocoBatch with --coco-path
    parity_images: int = 2  # --batch-size
    parity_size: Optional[Tuple[int, int]] = None  # --image-size (short, max); None: the default batch
    expectations: Optional[Any] = None  # markers.expectations.Expectations with --expectations
    bench: Optional[Any] = None  # fixtures.benchmark.BenchOptions
    compile: Optional[Any] = None  # runtime.compiler.CompileSpec with --compile
    parity_results: List[Dict[str, Any]] = field(default_factory=list)
    parity_report: Optional[Dict[str, Any]] = None
    report_error: Optional[str] = None  # why the parity report could not be written
    unmatched_comparison: Optional[str] = None  # a --benchmark-compare that compared nothing, said once
    training_rows: List[Dict[str, Any]] = field(default_factory=list)
    eager_medians: Dict[str, float] = field(default_factory=dict)  # benchmark step -> seconds, for compiled ratios

    @property
    def device(self):
        return self.xpu.device


STATE = pytest.StashKey[SuiteState]()


def state(config: pytest.Config) -> SuiteState:
    return config.stash[STATE]


def state_or_none(config: pytest.Config) -> Optional[SuiteState]:
    """The state, or None where configuration stopped early (a usage error) or in a stand-in config."""
    stash = getattr(config, "stash", None)
    return stash.get(STATE, None) if stash is not None else None

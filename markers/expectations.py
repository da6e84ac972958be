"""Known failures of a device, recorded in an expectations file (``--expectations FILE``, or the
ini value ``expectations``) as the conformance suites of GPU drivers do.

One entry a line: a node id or a pattern, whitespace, then the reason; ``#`` starts a comment::

    # backend 0.3: layer-norm backward accumulates in fp16 (VENDOR-1234)
    suite/test_transformer.py::test_transformer[amp]   layer norm backward in fp16, VENDOR-1234
    suite/test_train_step.py::*[bf16]                  bf16 AdamW in progress

In a pattern ``*`` and ``?`` are wildcards and everything else is literal, brackets included,
since node ids use them for parameters. A matching test becomes a strict xfail with the reason:
its failure is reported as expected, and once it passes the run fails and names the entry to
remove.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest


class ExpectationsError(ValueError):
    """The expectations file cannot be used; the message names the file and line."""


class VerdictFailure(pytest.fail.Exception):
    """A failure of the suite's own verdict (an op, an end-to-end or a whole-run check): the only
    failure that an expectations entry turns into an expected one, with the assertions of the
    suite's tests. Anything else that goes wrong in a listed test stays an error."""


# What an entry may excuse: the suite's verdicts, and the assertions of its training tests.
EXPECTED = (VerdictFailure, AssertionError)


@dataclass(frozen=True)
class Expectation:
    pattern: str
    reason: str
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def matches(self, nodeid: str) -> bool:
        if "*" not in self.pattern and "?" not in self.pattern:
            return nodeid == self.pattern
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in self.pattern)
        return re.fullmatch(regex, nodeid) is not None


@dataclass
class Expectations:
    entries: List[Expectation]
    path: str
    applied: Dict[str, Expectation] = field(default_factory=dict)  # node id -> its entry
    outcomes: Dict[str, str] = field(default_factory=dict)  # node id -> "failed as expected" or "passed"

    @classmethod
    def load(cls, path) -> "Expectations":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ExpectationsError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ExpectationsError(f"{path}: cannot be read: {exc}") from None
        entries = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) < 2:
                raise ExpectationsError(f"{path}:{number}: {raw.strip()!r} has no reason; "
                                        "expected '<node id or pattern> <reason>'")
            pattern, reason = parts[0], parts[1].strip()
            if "::" not in pattern and "*" not in pattern:
                raise ExpectationsError(f"{path}:{number}: {pattern!r} is neither a node id (file::test[params]) "
                                        "nor a pattern with * or ?")
            entries.append(Expectation(pattern, reason, str(path), number))
        return cls(entries, str(path))

    def find(self, nodeid: str) -> Optional[Expectation]:
        """The first entry naming ``nodeid`` exactly, else the first pattern that matches it."""
        exact = next((e for e in self.entries if e.pattern == nodeid), None)
        return exact or next((e for e in self.entries if e.matches(nodeid)), None)

    def unused(self) -> List[Expectation]:
        """Entries that matched no selected test: stale, or deselected by -k/-m."""
        used = set(self.applied.values())
        return [e for e in self.entries if e not in used]

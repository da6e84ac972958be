"""A baseline trace's tensors kept in an unnamed temporary file (under ``$TMPDIR``) instead of
memory. The r50 training step's trace holds about 5 GiB of inputs and outputs; isolated replay needs
one op's at a time, so the trace keeps a :class:`Stored` handle per tensor and replay loads each
record just before it judges it. Strides are kept, so a replayed op sees the layout the baseline saw.
"""
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Tuple

import torch

from runtime import compat

OFF = ("0", "false", "no", "off")


class SpillError(OSError):
    """The trace could not be written to its temporary file; the message names TMPDIR and DETR_PARITY_SPILL."""


def spill_enabled() -> bool:
    """``DETR_PARITY_SPILL``: on unless it is ``0``, ``false``, ``no`` or ``off`` (any case)."""
    return os.environ.get("DETR_PARITY_SPILL", "1").strip().lower() not in OFF


class TensorStore:
    """Append-only tensor storage in a temporary file that the system deletes when it is closed."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="detr-parity-trace-")
        self._size = 0
        self._lock = threading.Lock()  # autograd may run backward ops on another thread

    def put(self, t: torch.Tensor) -> "Stored":
        """Writes ``t`` (any device; a CPU copy's storage is written) and returns its handle."""
        t = t.detach()
        flat = t.reshape(-1) if t.device.type == "cpu" and t.is_contiguous() else None  # a view, no copy
        # one element is contiguous whatever its stride, and a strided view of bytes cannot be taken
        if flat is not None and t.numel() > 0 and flat.stride(0) == 1 and not (t.is_conj() or t.is_neg()):
            # written straight from the tensor's memory: the copy below would be one more pass over it
            raw, stride, storage_offset = flat.view(torch.uint8), t.stride(), 0
        else:
            copy = t.to("cpu", copy=True)
            raw = torch.empty(0, dtype=torch.uint8).set_(compat.untyped_storage(copy))
            stride, storage_offset = copy.stride(), copy.storage_offset()
        with self._lock:
            offset = self._size
            self._file.seek(offset)
            try:
                raw.numpy().tofile(self._file)
            except OSError as exc:
                raise SpillError(f"writing the parity trace under {tempfile.gettempdir()} failed after "
                                 f"{self._size / 2**20:.0f} MiB ({exc}): free space there, set TMPDIR to a "
                                 "larger disk, or keep the trace in memory with DETR_PARITY_SPILL=0") from exc
            self._size += raw.numel()
        return Stored(self, offset, raw.numel(), t.dtype, tuple(t.shape), tuple(stride), storage_offset)

    def read(self, offset: int, nbytes: int) -> bytearray:
        buffer = bytearray(nbytes)
        with self._lock:
            self._file.seek(offset)
            self._file.readinto(buffer)
        return buffer

    @property
    def nbytes(self) -> int:
        return self._size


@dataclass(frozen=True)
class Stored:
    """A handle to one tensor in a :class:`TensorStore`."""

    store: TensorStore
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int

    def load(self) -> torch.Tensor:
        """A fresh CPU tensor with the stored values, shape and strides."""
        if self.nbytes == 0:
            return torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        raw = torch.frombuffer(self.store.read(self.offset, self.nbytes), dtype=torch.uint8)
        return torch.as_strided(raw.view(self.dtype), self.shape, self.stride, self.storage_offset)


def load_tree(tree: Any) -> Any:
    """``tree`` with every :class:`Stored` leaf loaded."""
    return compat.tree_map(lambda leaf: leaf.load() if isinstance(leaf, Stored) else leaf, tree)

"""Batching of images of different sizes, and the few distributed helpers the loss needs."""
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


class NonFiniteError(ValueError):
    """NaN or Inf where the computation needs finite numbers (boxes, matching costs)."""


class NestedTensor:
    """A padded batch: ``tensors`` [B, C, H, W] and ``mask`` [B, H, W], True on padding."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self) -> str:
        mask = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask})"


def nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> NestedTensor:
    """Pads a list of [C, H_i, W_i] images to [B, C, max H, max W] with a mask."""
    if not tensor_list:
        raise ValueError("cannot batch an empty list of images")
    if any(t.ndim != 3 for t in tensor_list):
        shapes = [tuple(t.shape) for t in tensor_list]
        raise ValueError(f"expected images of shape [C, H, W], got {shapes}")
    max_size = [max(sizes) for sizes in zip(*(t.shape for t in tensor_list))]
    first = tensor_list[0]
    tensor = torch.zeros([len(tensor_list)] + max_size, dtype=first.dtype, device=first.device)
    mask = torch.ones((len(tensor_list), max_size[1], max_size[2]), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensor, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


def collate_fn(batch):
    """DataLoader collate: [(image [3, H, W], target)] -> (NestedTensor, tuple of targets)."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), targets


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0

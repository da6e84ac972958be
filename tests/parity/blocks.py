"""Small models for the parity engine's own tests (not DETR: parity/ knows nothing of it)."""
import torch

from parity.capture import OUTSIDE, UNKNOWN_PHASE
from runtime import compat


def cpu_cannot_capture(precision: str):
    """Why this torch's CPU cannot run a captured forward and backward in ``precision``, or None.
    torch 1.12's CPU has no float16 convolution, and its layer norm backward under a dispatch mode
    fails in autocast ('expected scalar type BFloat16 but found Float')."""
    from parity.capture import capture

    norm, x = torch.nn.LayerNorm(8), torch.randn(2, 3, 8)

    def autocast_norm():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(torch.nn.functional.linear(x, torch.eye(8)))
        y.float().sum().backward()

    probes = {"fp16": lambda: torch.nn.functional.conv2d(torch.ones(1, 1, 2, 2).half(), torch.ones(1, 1, 1, 1).half()),
              "amp": lambda: capture(autocast_norm)}
    try:
        probes.get(precision, lambda: None)()
    except RuntimeError as error:
        return f"torch {torch.__version__} on the CPU: {error}"
    return None


def reported(module: str, phase: str):
    """(module, phase) that a report gives an op of ``module`` in ``phase``: without the autograd
    node (torch before 2.0) a backward op runs outside every module, in an unknown phase."""
    if phase == "backward" and not compat.has_autograd_node():
        return OUTSIDE, UNKNOWN_PHASE
    return module, phase


class Block(torch.nn.Module):
    """conv -> relu -> layer norm -> self-attention -> linear; [B, 3, H, W] -> [B, 4]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.norm = torch.nn.LayerNorm(8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        f = self.norm(self.act(self.conv(x)).flatten(2).transpose(1, 2))
        a, _ = self.attn(f, f, f)
        return self.head(f + a).mean(1)

"""Small models for the parity engine's own tests (not DETR: parity/ knows nothing of it)."""
import torch


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

"""The tiny transformer the synthetic experiments (b)-(d) adapt, built from a local config with
random frozen weights (the real-data experiment (e) uses a pretrained encoder instead:
realdata_data.py)."""
from __future__ import annotations

from torch import nn


class TinyBlock(nn.Module):
    """One pre-norm transformer block: x [B, S, d] -> [B, S, d]. Attention (``qkv``, ``out``) and
    an MLP (``linear1`` d -> 2d, ReLU, ``linear2`` 2d -> d), both residual."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.linear1, self.linear2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, -1).unbind(2)
        a = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2))
        x = x + self.out(a.transpose(1, 2).reshape(B, S, d))
        return x + self.linear2(nn.functional.relu(self.linear1(self.norm2(x))))



"""An independent PyTorch model of the reference encoder (MW2StackRNNPoolingMultihead), for tests.

Written from the reference's description, not from primus_jax: channels-first input (B, 6, T),
torch's own AdaptiveAvgPool1d and GRU, and the state-dict keys of the released checkpoint
(without its "imu_encoder." prefix). forward returns (ssl, mmcl), each (B, 512).
"""
import torch
from torch import nn


class Block(nn.Module):
    """Conv1d (no bias, dilation 2) then a pool, held as `net` like the reference's blocks."""

    def __init__(self, in_channels, out_channels, kernel, pool):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel, dilation=2, bias=False), pool)

    def forward(self, x):
        return self.net(x)


class ReferenceEncoder(nn.Module):
    def __init__(self, width=32, hidden=512):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.GroupNorm(2, 6),
            Block(6, width, 10, nn.MaxPool1d(3)),
            Block(width, width, 5, nn.MaxPool1d(3)),
            Block(width, width, 5, nn.AdaptiveAvgPool1d(32)),
            nn.GroupNorm(4, width),
            nn.GRU(input_size=32, hidden_size=hidden, batch_first=True),  # steps over the 32 channels
        )
        self.ssl_head = nn.Linear(hidden, hidden)
        self.mmcl_head = nn.Linear(hidden, hidden)

    def forward(self, x):
        _, h_final = self.backbone(x)
        return self.ssl_head(h_final[0]), self.mmcl_head(h_final[0])

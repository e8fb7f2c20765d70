"""The IMU encoder as a PyTorch module holding the reference's state-dict keys, for the ONNX export.

`TorchIMUEncoder(model, window_length)` computes what `IMUEncoder` computes, in torch's layout:

    backbone.0  GroupNorm(2, 6)                         (N, 6, T)
    backbone.1  net = Conv1d(6, C, 10, dilation 2), MaxPool1d(3)
    backbone.2  net = Conv1d(C, C, 5, dilation 2), MaxPool1d(3)
    backbone.3  net = Conv1d(C, C, 5, dilation 2), AdaptiveAvgPool1d(P) as a fixed matrix
    backbone.4  GroupNorm(4, C)                         (N, C, P)
    backbone.5  GRU(hidden), batch-first, h_0 = 0       steps over the C channels ("channels",
                                                        the reference's quirk) or the P bins ("time")
    ssl_head, mmcl_head  Linear(hidden, ssl_dim / mm_dim) of the final hidden state

torch's AdaptiveAvgPool1d has no ONNX form when P does not divide the input length (T = 250 pools
15 -> 32), so the window length is fixed at construction and the pool is x @ A with A =
`models.adaptive_avg_pool_matrix` (a non-persistent buffer: the state dict keeps the reference's keys).
"""
import torch
from torch import nn

from primus_jax import convert, models


class ConvBlock(nn.Module):
    """`net` = Sequential(Conv1d without bias, pool), as the reference's conv blocks."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, pool: nn.Module):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel, dilation=models.CONV_DILATION, bias=False), pool)

    def forward(self, x):
        return self.net(x)


class FixedAveragePool(nn.Module):
    """AdaptiveAvgPool1d(out_length) of (N, C, in_length) inputs as one matmul with a fixed matrix."""

    def __init__(self, in_length: int, out_length: int):
        super().__init__()
        matrix = torch.from_numpy(models.adaptive_avg_pool_matrix(in_length, out_length))
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, x):
        return x @ self.matrix


class TorchIMUEncoder(nn.Module):
    """`IMUEncoder` `model`'s function on windows (N, window_length, 6) float32, channels last.

    forward(x) returns (ssl (N, ssl_dim), mmcl (N, mm_dim), finite (N,) bool): finite[i] is False
    when window i holds a NaN or an infinity, and that row of ssl and mmcl is then NaN (a runtime
    may otherwise return ordinary-looking numbers for it). Load weights with
    `load_params(params)`; the computation is float32 whatever `model.dtype` is.
    unroll_gru: False runs the GRU as one nn.GRU call (one ONNX GRU node once exported); True
    writes its S steps out with the same weights, h' = n + z (h - n) with
    r, z = sigmoid(x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z}),
    n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)), which a tracer unrolls into S cell copies.
    """

    def __init__(self, model: models.IMUEncoder, window_length: int, unroll_gru: bool = False):
        super().__init__()
        self.unroll_gru = unroll_gru
        channels, pooled = model.conv_channels, model.pooled_length
        conv3_length = models.conv_stack_lengths(window_length)[4]
        self.gru_over = model.gru_over
        self.backbone = nn.Sequential(
            nn.GroupNorm(2, models.INPUT_CHANNELS, eps=1e-5),
            ConvBlock(models.INPUT_CHANNELS, channels, models.CONV_KERNELS[0], nn.MaxPool1d(models.POOL_SIZE)),
            ConvBlock(channels, channels, models.CONV_KERNELS[1], nn.MaxPool1d(models.POOL_SIZE)),
            ConvBlock(channels, channels, models.CONV_KERNELS[2], FixedAveragePool(conv3_length, pooled)),
            nn.GroupNorm(4, channels, eps=1e-5),
            nn.GRU(pooled if model.gru_over == "channels" else channels, model.hidden_dim, batch_first=True),
        )
        self.ssl_head = nn.Linear(model.hidden_dim, model.ssl_dim)
        self.mmcl_head = nn.Linear(model.hidden_dim, model.mm_dim)

    def load_params(self, params) -> "TorchIMUEncoder":
        """Copy Flax `IMUEncoder` params in (`convert.torch_state_dict`, strict); returns self."""
        state = {key: torch.from_numpy(value) for key, value in convert.torch_state_dict(params).items()}
        self.load_state_dict(state, strict=True)
        return self

    def forward(self, x):
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        features = self.backbone[:5](x.transpose(1, 2))  # (N, C, P)
        if self.gru_over == "time":
            features = features.transpose(1, 2)
        emb = self.unrolled_gru(features) if self.unroll_gru else self.backbone[5](features)[1][0]
        nan = torch.tensor(float("nan"), dtype=emb.dtype)
        ssl = torch.where(finite[:, None], self.ssl_head(emb), nan)
        mmcl = torch.where(finite[:, None], self.mmcl_head(emb), nan)
        return ssl, mmcl, finite

    def unrolled_gru(self, features):
        """The GRU's final hidden state (N, H) of batch-first features (N, S, D), step by step."""
        gru = self.backbone[5]
        hidden = gru.hidden_size
        input_proj = features @ gru.weight_ih_l0.T + gru.bias_ih_l0  # (N, S, 3H)
        h = torch.zeros(features.shape[0], hidden, dtype=features.dtype)
        for step in range(features.shape[1]):
            x_proj, h_proj = input_proj[:, step], h @ gru.weight_hh_l0.T + gru.bias_hh_l0
            reset = torch.sigmoid(x_proj[:, :hidden] + h_proj[:, :hidden])
            update = torch.sigmoid(x_proj[:, hidden:2 * hidden] + h_proj[:, hidden:2 * hidden])
            candidate = torch.tanh(x_proj[:, 2 * hidden:] + reset * h_proj[:, 2 * hidden:])
            h = candidate + update * (h - candidate)
        return h

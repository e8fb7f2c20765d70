"""The PRIMUS train step written plainly in PyTorch: the peer our JAX step is timed against.

    python -m benchmarks.torch_peer --batch-size 64 [--steps 10] [--device cpu|cuda] [--amp] [--record DIR]

It is the same model and objective as `primus_jax.train`'s step, written the way a careful
PyTorch user would write it (needs torch: `pip install -e ".[torch]"`):

- Encoder, channels first (B, 6, T): GroupNorm(2, 6) -> Conv1d(6, 32, k 10, dilation 2, no bias)
  -> MaxPool(3) -> Conv1d(32, 32, k 5, d 2) -> MaxPool(3) -> Conv1d(32, 32, k 5, d 2) ->
  AdaptiveAvgPool1d(32) -> GroupNorm(4, 32) -> torch's GRU (hidden 512, oneDNN on CPU, cuDNN on
  GPU) stepping over the 32 conv channels, each step's input the channel's 32 pooled bins; its
  last hidden state h (B, 512) feeds two linear heads, ssl and mmcl. 1,376,204 parameters.
- Step over a batch x (B, 6, T) with unit text and video targets t, v (B, 512):
  view1 = permute(scale(x)), where scale multiplies every time step by its own factor
  s[b, t] ~ N(1, 0.25^2) shared by the six channels, and permute cuts each sample at 4 distinct
  points in [1, T - 1] into 5 segments and concatenates them in a random order (one gather with
  per-sample indices); both views go through the encoder as one batch of 2B.
  Each sample's neighbour is the queue slot j* = argmax_j cos(v_b, Qv_j) over the filled slots
  (one (B, S) matmul); then, with NCE_tau(q, k) = CE(rows of S) + CE(columns of S),
  S = norm(q) norm(k)^T / tau:
      L = (1 - a) [NCE_mm(mmcl0, t) + NCE_mm(mmcl0, v) + NCE_mm(mmcl0, Qt_j*) + NCE_mm(mmcl0, Qv_j*)]
          + a [NCE_ss(ssl0, ssl1) + NCE_ss(ssl0, Qi_j*)],  a = 0.5,
  with tau_mm = exp(log_mm) and tau_ss = exp(log_ss) learnt (both start at 0.1). Adam at 2e-4
  updates the encoder and both log-temperatures; then (v, t, ssl0) enter the 8192-slot ring
  buffers Qv, Qt, Qi.
- `--amp` runs the encoder under bfloat16 autocast; the losses stay float32.

The last line printed is one JSON object with batch_size, device, amp, torch, threads, step_ms
and samples_per_s (B * steps / seconds over `--steps` steps after `--warmup-steps`).
`python -m benchmarks.train_step --torch-peer` runs it right after our step at the same B.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

if not __package__:  # run as a file (`python benchmarks/torch_peer.py`), as train_step runs a peer
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

WINDOW_LENGTH = 250
EMBEDDING_DIM = 512
QUEUE_SIZE = 8192
ALPHA = 0.5
LEARNING_RATE = 2e-4
INITIAL_TEMPERATURE = 0.1
SCALING_STD = 0.25
SEGMENTS = 5


class Encoder(nn.Module):
    """(B, 6, T) windows -> (ssl, mmcl) features, each (B, hidden)."""

    def __init__(self, conv_width: int = 32, hidden: int = 512, pooled_bins: int = 32):
        super().__init__()
        self.convs = nn.Sequential(
            nn.GroupNorm(2, 6),
            nn.Conv1d(6, conv_width, 10, dilation=2, bias=False), nn.MaxPool1d(3),
            nn.Conv1d(conv_width, conv_width, 5, dilation=2, bias=False), nn.MaxPool1d(3),
            nn.Conv1d(conv_width, conv_width, 5, dilation=2, bias=False), nn.AdaptiveAvgPool1d(pooled_bins),
            nn.GroupNorm(4, conv_width),
        )
        # batch_first over (B, channels, bins): the recurrence steps over the conv channels.
        self.gru = nn.GRU(input_size=pooled_bins, hidden_size=hidden, batch_first=True)
        self.ssl_head = nn.Linear(hidden, hidden)
        self.mmcl_head = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, last_hidden = self.gru(self.convs(x))
        h = last_hidden[0]
        return self.ssl_head(h), self.mmcl_head(h)


def info_nce(query: torch.Tensor, key: torch.Tensor, tau: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: weighted mean over rows of CE(S, diag) + the same over columns, S (B, B)."""
    logits = F.normalize(query.float(), dim=-1) @ F.normalize(key.float(), dim=-1).T / tau
    positives = logits.diagonal()
    rows = torch.logsumexp(logits, dim=1) - positives
    columns = torch.logsumexp(logits, dim=0) - positives
    total = weights.sum().clamp_min(1.0)
    return (rows * weights).sum() / total + (columns * weights).sum() / total


def scale_time_steps(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x[b, c, t] * s[b, t], s ~ N(1, 0.25^2): one factor per sample and time step, shared by the channels."""
    factors = 1.0 + SCALING_STD * torch.randn(x.shape[0], 1, x.shape[2], device=x.device, generator=generator)
    return x * factors


def segment_permutation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each sample's T steps cut at 4 distinct points in [1, T - 1] and its 5 segments reordered at random.

    Per sample: edges e = (0, c_1 .. c_4, T), a random order pi of the segments, output segment j
    of length L_j = e_{pi_j + 1} - e_{pi_j} starting at o_j = sum_{i<j} L_i, and output step t in
    segment j reads e_{pi_j} + t - o_j. All of it is batched tensor work, then one gather.
    """
    batch, channels, length = x.shape
    device = x.device
    scores = torch.rand(batch, length - 1, device=device, generator=generator)
    cuts = torch.sort(torch.topk(scores, SEGMENTS - 1, dim=1).indices + 1, dim=1).values
    edges = torch.cat([cuts.new_zeros(batch, 1), cuts, cuts.new_full((batch, 1), length)], dim=1)
    starts, lengths = edges[:, :-1], edges.diff(dim=1)
    order = torch.argsort(torch.rand(batch, SEGMENTS, device=device, generator=generator), dim=1)
    out_lengths = lengths.gather(1, order)
    out_starts = out_lengths.cumsum(1) - out_lengths
    positions = torch.arange(length, device=device)
    out_segment = (positions[None, :, None] >= out_starts[:, None, 1:]).sum(2)
    source = starts.gather(1, order).gather(1, out_segment) + positions[None, :] - out_starts.gather(1, out_segment)
    return x.gather(2, source[:, None, :].expand(batch, channels, length))


class Step:
    """One PRIMUS update on (imu (B, 6, T), text (B, D), video (B, D)); returns the loss (a tensor)."""

    def __init__(self, batch_size: int, device: str, amp: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.batch_size, self.device, self.amp = batch_size, device, amp
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.encoder = Encoder().to(device)
        self.log_tau = nn.Parameter(torch.full((2,), INITIAL_TEMPERATURE, device=device).log())  # (mm, ss)
        self.optimizer = torch.optim.Adam([*self.encoder.parameters(), self.log_tau], lr=LEARNING_RATE)
        self.queue = {name: torch.zeros(QUEUE_SIZE, EMBEDDING_DIM, device=device) for name in ("video", "text", "imu")}
        self.filled = torch.zeros(QUEUE_SIZE, dtype=torch.bool, device=device)
        self.position = 0

    def neighbours(self, video: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The queue rows of each sample's nearest filled slot by video cosine, and (B,) validity."""
        similarity = F.normalize(video, dim=-1) @ self.queue["video"].T
        index = similarity.masked_fill(~self.filled[None, :], float("-inf")).argmax(dim=1)
        valid = self.filled.any().expand(video.shape[0]).float()
        return {name: rows[index] for name, rows in self.queue.items()}, valid

    def enqueue(self, video: torch.Tensor, text: torch.Tensor, imu: torch.Tensor) -> None:
        rows = (torch.arange(self.batch_size, device=self.device) + self.position) % QUEUE_SIZE
        for name, values in (("video", F.normalize(video, dim=-1)), ("text", F.normalize(text, dim=-1)),
                             ("imu", F.normalize(imu.float(), dim=-1))):
            self.queue[name][rows] = values
        self.filled[rows] = True
        self.position = (self.position + self.batch_size) % QUEUE_SIZE

    def __call__(self, imu: torch.Tensor, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        b = self.batch_size
        view1 = segment_permutation(scale_time_steps(imu, self.generator), self.generator)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.amp):
            ssl, mmcl = self.encoder(torch.cat([imu, view1]))
        ssl0, ssl1, mmcl0 = ssl[:b], ssl[b:], mmcl[:b]
        tau_mm, tau_ss = self.log_tau.exp()
        every = torch.ones(b, device=self.device)
        neighbour, valid = self.neighbours(video)
        loss = ((1 - ALPHA) * (info_nce(mmcl0, text, tau_mm, every) + info_nce(mmcl0, video, tau_mm, every)
                               + info_nce(mmcl0, neighbour["text"], tau_mm, valid)
                               + info_nce(mmcl0, neighbour["video"], tau_mm, valid))
                + ALPHA * (info_nce(ssl0, ssl1, tau_ss, every) + info_nce(ssl0, neighbour["imu"], tau_ss, valid)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.enqueue(video, text, ssl0.detach())
        return loss.detach()


def synthetic_batch(batch_size: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gravity-on-z IMU noise (B, 6, T) and unit text and video targets (B, 512), as our benchmark uses."""
    generator = torch.Generator().manual_seed(seed)
    imu = torch.randn(batch_size, 6, WINDOW_LENGTH, generator=generator)
    imu[:, 2] += 9.81
    text = F.normalize(torch.randn(batch_size, EMBEDDING_DIM, generator=generator), dim=-1)
    video = F.normalize(torch.randn(batch_size, EMBEDDING_DIM, generator=generator), dim=-1)
    return imu.to(device), text.to(device), video.to(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the encoder")
    common.add_record_argument(parser)
    return parser


def measure(batch_size: int, steps: int, device: str = "cpu", amp: bool = False, warmup_steps: int = 3) -> dict:
    """Times `steps` updates after `warmup_steps`; the JSON record."""
    if batch_size < 1 or steps < 1 or warmup_steps < 0:
        raise ValueError(f"--batch-size and --steps must be positive, got {batch_size} and {steps}")
    step = Step(batch_size, device, amp)
    imu, text, video = synthetic_batch(batch_size, device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup_steps):
        step(imu, text, video)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(imu, text, video)
    final_loss = float(loss)
    synchronize()
    seconds = time.perf_counter() - start
    return {"benchmark": "torch_peer", "batch_size": batch_size, "steps": steps, "device": device, "amp": amp,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "final_loss": final_loss,
            "step_ms": round(1e3 * seconds / steps, 3), "samples_per_s": round(batch_size * steps / seconds, 1)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        result = measure(args.batch_size, args.steps, args.device, args.amp, args.warmup_steps)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True), flush=True)
    if args.record:
        common.record_result(args.record, "torch_peer", result, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

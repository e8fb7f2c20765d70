"""Numeric comparisons that hold on any machine: float32 tolerances scaled to the magnitudes.

Two differently compiled float32 programs (another batch size or padding, another jit boundary,
another fusion, AVX-512 on one CPU and AVX2 on the next) add the same terms in another order.
Each rounding is off by at most 2^-24 ~ 6e-8 of the running sum, so the difference between the
two results is a multiple of 6e-8 times the magnitude of the terms, not of the result: an output
near 0 computed from terms of size 1 differs by ~1e-7 x sqrt(number of roundings) in absolute
terms. A per-element relative tolerance (or a fixed absolute one like 1e-6) is therefore wrong
for small outputs, and the right bound is relative to the scale of the output, max |expected|.

Comparisons against numpy or torch also pin float32 matmuls (the `float32_matmuls` fixture of
conftest.py), since the backend default is TF32 on recent NVIDIA GPUs and bfloat16 on TPUs.
"""
from __future__ import annotations

import numpy as np


def assert_close_to_scale(got, expected, scale_rtol: float) -> None:
    """|got - expected| <= scale_rtol * max|expected| elementwise, with the shapes equal."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=scale_rtol * scale,
                               err_msg=f"tolerance {scale_rtol:g} x scale {scale:.3g}")

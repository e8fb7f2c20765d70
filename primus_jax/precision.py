"""Matmul precision of float32 dots and convolutions: the `model.matmul_precision` config field.

JAX leaves the precision of a float32 `dot_general` / `conv_general_dilated` whose `precision`
argument is None to the backend. `jax.default_matmul_precision(name)` sets it for everything
traced inside the context; `with_matmul_precision(fn, name)` wraps a function so that it is always
traced (and therefore compiled) under that setting, whatever the caller's context. Wrapping the
function before `jax.jit` makes the choice part of the compiled program, so train and eval steps,
`load_encoder` and evaluation get it without the model code knowing.

What the three names mean for float32 operands (bfloat16 operands are bfloat16 multiplies always):

    default   CPU: float32.  NVIDIA Ampere and later: TF32 (10-bit mantissa inputs, float32
              accumulation).  TPU: one bfloat16 pass (8-bit mantissa inputs).
    high      CPU: float32.  GPU: TF32 / bf16x3-like.  TPU: three bfloat16 passes (~float32 for
              most inputs).
    highest   float32 everywhere (TPU: six bfloat16 passes; GPU: true float32 FMA, ~7x slower
              than TF32 on an H200).
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax

MATMUL_PRECISIONS = ("default", "high", "highest")

F = TypeVar("F", bound=Callable)


def check_matmul_precision(name: str) -> str:
    """`name` if it is one of MATMUL_PRECISIONS, else ValueError naming the choices."""
    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"model.matmul_precision must be one of {MATMUL_PRECISIONS}, got {name!r}")
    return name


def with_matmul_precision(fn: F, name: str) -> F:
    """`fn` traced under `jax.default_matmul_precision(name)` (see the module docstring)."""
    check_matmul_precision(name)

    @functools.wraps(fn)
    def traced_with_precision(*args, **kwargs):
        with jax.default_matmul_precision(name):
            return fn(*args, **kwargs)

    return traced_with_precision

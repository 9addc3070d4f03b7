"""Shared handling of physical parameters: conversion, validation and batch broadcasting.

Every physics function in difflens accepts its parameters as Python floats, 0-d tensors, or tensors
of shape (B,), and positions ``x, y`` of any common shape S.  The result has shape S, or ``(B, *S)``
when any parameter carries a batch dimension.  This module is the one place where that contract is
implemented, so that every function reports bad input the same way.

Checks of tensor *values* (finite, in range) need the values on the host, which a compiled graph
(``torch.compile``) cannot branch on: inside one they are skipped (:func:`checking`), so a compiled
likelihood must be fed parameters that were validated outside it (e.g. by the Pyro priors).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch


def checking() -> bool:
    """True unless torch.compile is tracing: value checks run in eager code only."""
    return not torch.compiler.is_compiling()


def as_coords(x, y):
    """Return ``x, y`` as tensors of one common shape, checking they are finite.

    Python scalars and arrays become tensors of torch's default dtype; existing tensors keep their
    dtype and device (nothing is moved).
    """
    if not torch.is_tensor(x):
        x = torch.as_tensor(x, dtype=y.dtype if torch.is_tensor(y) else torch.get_default_dtype(),
                            device=y.device if torch.is_tensor(y) else None)
    if not torch.is_tensor(y):
        y = torch.as_tensor(y, dtype=x.dtype, device=x.device)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise TypeError("x and y must be floating point")
    if x.dtype != y.dtype:
        raise TypeError(f"x has dtype {x.dtype} but y has {y.dtype}")
    if checking() and not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y contain non-finite values (NaN or inf)")
    return x, y


def as_param(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """Convert one parameter to a 0-d or (B,) tensor with the dtype/device of ``like``.

    Raises
    ------
    ValueError
        If the value is not finite, or has more than one dimension.
    """
    if torch.is_tensor(value):
        if value.device != like.device:
            raise ValueError(f"parameter {name!r} is on {value.device} but the coordinates are "
                             f"on {like.device}; move them explicitly")
        t = value.to(dtype=like.dtype)
    else:
        try:
            t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"parameter {name!r} must be a number or tensor, got {value!r}") from exc
    if t.ndim > 1:
        raise ValueError(f"parameter {name!r} must be a scalar or have shape (B,), got shape "
                         f"{tuple(t.shape)}")
    if checking() and not _all_finite(t):
        raise ValueError(f"parameter {name!r} is not finite: {t.detach().cpu().tolist()}")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()``; a one-element tensor is read once as a Python float (a
    composite ``isfinite`` costs ~20 us of small ops on a scalar, ``item`` ~1 us)."""
    if t.numel() == 1:
        return math.isfinite(t.item())
    return bool(torch.isfinite(t).all())


def check_range(name: str, value: torch.Tensor, low=-math.inf, high=math.inf,
                low_inclusive=False, high_inclusive=False, hint: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` if any element lies outside the interval."""
    if not checking():
        return
    if value.numel() == 1:                     # one lens: compare on the host, no tensor ops
        v = value.item()
        if (v >= low if low_inclusive else v > low) and (v <= high if high_inclusive else v < high):
            return
    lo_ok = value >= low if low_inclusive else value > low
    hi_ok = value <= high if high_inclusive else value < high
    if not bool((lo_ok & hi_ok).all()):
        bad = value[~(lo_ok & hi_ok)].detach().cpu().tolist()
        lb = "[" if low_inclusive else "("
        hb = "]" if high_inclusive else ")"
        msg = f"parameter {name!r} must lie in {lb}{low}, {high}{hb}, got {bad}"
        raise ValueError(msg + (f"; {hint}" if hint else ""))


def broadcast_params(params: Mapping[str, torch.Tensor], spatial_ndim: int):
    """Reshape parameters so they broadcast against coordinates of ``spatial_ndim`` dimensions.

    Returns
    -------
    out : dict of str -> Tensor
        Each parameter with shape () (no batch) or (B, 1, ..., 1) (batched).
    batch : int or None
        The common batch size, or None when every parameter is a scalar.
    """
    sizes = {name: t.shape[0] for name, t in params.items() if t.ndim == 1}
    batch = None
    if sizes:
        distinct = set(sizes.values()) - {1}
        if len(distinct) > 1:
            raise ValueError(f"batched parameters disagree on the batch size: {sizes}")
        batch = distinct.pop() if distinct else 1
    out = {}
    for name, t in params.items():
        if batch is not None:
            t = t.expand(batch).reshape((batch,) + (1,) * spatial_ndim)
        out[name] = t
    return out, batch


def as_column(t: torch.Tensor, spatial_ndim: int) -> torch.Tensor:
    """Reshape a () or (B,) parameter to (B or 1, 1, ..., 1) against ``(B, *S)`` coordinates."""
    return t.reshape(-1, *([1] * spatial_ndim))

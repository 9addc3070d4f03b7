"""Writing result files so that a failure never leaves a half-written one behind.

Every file difflens writes (fits, tables, weights, checkpoints, result folders) goes through one of
these two context managers: the content is written to a temporary name first and moved into place
(an atomic rename on one file system) only when the block finishes without an error.
Checkpoints are saved with every tensor on the CPU (:func:`tensors_to`), so a run started on a GPU
resumes anywhere.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside ``path`` that replaces ``path`` if the block succeeds.

    Parameters
    ----------
    path : str or Path
        The final file; its folder is created if needed.
    suffix : str
        Appended to the name for the temporary file (``".tmp.npz"`` for ``numpy.savez``, which
        appends ``.npz`` itself).

    Examples
    --------
    >>> with atomic_path("table.json") as tmp:                       # doctest: +SKIP
    ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(out_dir):
    """Yield a temporary folder whose files are moved into ``out_dir`` only if the block
    succeeds, so that a failure leaves nothing half-written there.

    Examples
    --------
    >>> with atomic_directory("results") as tmp:                     # doctest: +SKIP
    ...     (tmp / "summary.json").write_text("{}")
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".difflens-", dir=out_dir.parent))
    try:
        yield tmp
        out_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            f.replace(out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tensors_to(obj, device):
    """``obj`` (nested dicts, lists, tuples of tensors and numbers) with every tensor detached and
    on ``device``: to the CPU for saving a checkpoint, back to the chains' device on loading."""
    if torch.is_tensor(obj):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: tensors_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_to(v, device) for v in obj)
    return obj

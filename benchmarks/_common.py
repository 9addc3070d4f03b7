"""Shared helpers for the benchmark scripts: timing medians and describing the machine."""
from __future__ import annotations

import json
import platform
import statistics
import time

import torch


def median_ms(fn, runs=20, warmup=3):
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def synchronised(fn, device):
    """``fn`` that waits for a GPU to finish, so wall times measure the work."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def header(device: torch.device) -> dict:
    import difflens

    info = dict(device=device_description(device), torch=torch.__version__,
                difflens=difflens.__version__, python=platform.python_version())
    print(json.dumps(info))
    return info

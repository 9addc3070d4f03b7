"""Direct conv2d vs FFT for PSF convolution of a 256x256 image (batch 1 and 64), by kernel size.

    python benchmarks/psf_convolution.py [--device cpu]

The result sets the ``method="auto"`` threshold of :func:`difflens.instrument.convolve`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, median_ms  # noqa: E402

from difflens.instrument import convolve  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    header(device)
    print(f"{'kernel':>7s} {'batch':>6s} {'direct ms':>10s} {'fft ms':>8s}")
    for batch in (1, 64):
        img = torch.rand(batch, 268, 268, device=device)
        for size in (5, 13, 21, 31, 51):
            k = torch.rand(size, size, device=device)
            d = median_ms(lambda: convolve(img, k, mode="valid", method="direct"), 10)
            f = median_ms(lambda: convolve(img, k, mode="valid", method="fft"), 10)
            print(f"{size:7d} {batch:6d} {d:10.2f} {f:8.2f}")


if __name__ == "__main__":
    main()

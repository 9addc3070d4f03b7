"""SPLE deflection alone on a 256x256 grid: interpolated table vs exact series, by axis ratio.

    python benchmarks/deflection.py [--device cpu] [--runs 20]

The series needs ~log(tol)/log(f) terms with f = (1 - q)/(1 + q), so its cost grows as q falls;
the table costs the same for every q.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, median_ms  # noqa: E402

from difflens.instrument import pixel_grid  # noqa: E402
from difflens.lensing import spl_deflection  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    header(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{'dtype':8s} {'q':>5s} {'method':7s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
    for dtype in (torch.float32, torch.float64):
        x, y = pixel_grid(256, 0.04, dtype=dtype, device=device)
        for q in (0.9, 0.5, 0.2, 0.1):
            for method in ("table", "series"):
                p = {k: torch.tensor(v, dtype=dtype, device=device, requires_grad=True)
                     for k, v in dict(r_ein=1.2, q=q, phi=0.5, gamma=2.1, x0=0.05,
                                      y0=-0.03).items()}

                def fwd():
                    with torch.no_grad():
                        spl_deflection(x, y, method=method, **p)
                    sync()

                def fwd_bwd():
                    ax, ay = spl_deflection(x, y, method=method, **p)
                    torch.autograd.grad((ax + ay).sum(), list(p.values()))
                    sync()

                print(f"{str(dtype)[6:]:8s} {q:5.2f} {method:7s} {median_ms(fwd, args.runs):11.2f} "
                      f"{median_ms(fwd_bwd, args.runs):11.2f}")


if __name__ == "__main__":
    main()

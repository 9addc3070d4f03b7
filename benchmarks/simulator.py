"""Time the simulator on the peer-benchmark workload (../shared/bench/peers.py).

256x256 pixels at 0.04", SPLE + external shear, elliptical Sersic source, 13x13 Gaussian PSF
(sigma 0.05"), Gaussian log-likelihood.  Reports median milliseconds for one forward image, for
value + gradient w.r.t. all 15 lens and source parameters, and per image in a batch of 64, in float32
and float64, for both SPLE methods.

    python benchmarks/simulator.py [--runs 20] [--batch 64] [--device cpu] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, median_ms  # noqa: E402

from difflens.instrument import add_noise, gaussian_log_likelihood, gaussian_psf  # noqa: E402
from difflens.simulate import Simulator  # noqa: E402
from difflens.sources import Sersic  # noqa: E402

LENS = dict(x0=0.05, y0=-0.03, r_ein=1.2, q=0.75, phi=0.5, gamma=2.1, g1=0.03, g2=-0.02)
SOURCE = dict(x0=0.10, y0=0.05, q=0.8, phi=1.0, n=1.5, r_e=0.25, amp=1.0)
LENS_EVAL = dict(x0=0.063, y0=-0.017, r_ein=1.22, q=0.73, phi=0.52, gamma=2.05, g1=0.035,
                 g2=-0.015)
SOURCE_EVAL = dict(x0=0.11, y0=0.04, q=0.78, phi=1.05, n=1.4, r_e=0.26, amp=1.05)


def run(dtype, method, runs, batch, device):
    psf = gaussian_psf(0.05, 0.04, size=13, dtype=dtype, device=device)
    sim = Simulator(npix=256, pixel_scale=0.04, psf=psf, deflection_method=method, dtype=dtype,
                    device=device)
    gen = torch.Generator(device=device).manual_seed(12345)
    data = add_noise(sim.image(LENS, Sersic(**SOURCE)), 0.1, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def params(values, n=None):
        return {k: torch.tensor(v, dtype=dtype, device=device).repeat(n) if n else
                torch.tensor(v, dtype=dtype, device=device) for k, v in values.items()}

    def forward():
        with torch.no_grad():
            sim.image(LENS_EVAL, Sersic(**SOURCE_EVAL))
        sync()

    def value_and_grad(n=None):
        lens = {k: v.requires_grad_() for k, v in params(LENS_EVAL, n).items()}
        src = {k: v.requires_grad_() for k, v in params(SOURCE_EVAL, n).items()}
        logl = gaussian_log_likelihood(sim.image(lens, Sersic(**src)), data, 0.1).sum()
        torch.autograd.grad(logl, [*lens.values(), *src.values()])
        sync()

    return dict(
        forward=median_ms(forward, runs),
        value_and_grad=median_ms(value_and_grad, runs),
        batch_per_image=median_ms(lambda: value_and_grad(batch), max(3, runs // 4)) / batch,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = header(device)
    rows = []
    print(f"{'method':8s} {'dtype':8s} {'forward ms':>11s} {'value+grad ms':>14s} "
          f"{'batch ' + str(args.batch) + ' ms/img':>18s}")
    for method in ("table", "series"):
        for dtype in (torch.float32, torch.float64):
            r = run(dtype, method, args.runs, args.batch, device)
            rows.append(dict(method=method, dtype=str(dtype).replace("torch.", ""), **r))
            print(f"{method:8s} {rows[-1]['dtype']:8s} {r['forward']:11.2f} "
                  f"{r['value_and_grad']:14.2f} {r['batch_per_image']:18.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(info, results=rows), indent=1))


if __name__ == "__main__":
    main()

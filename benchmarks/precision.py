"""Cost and accuracy of the lens model's potential + gradient: float64 / float32, eager / compiled.

The inner loop of HMC is one batched evaluation of the negative log posterior and its gradient.
Here it is timed on a real lens -- HST WFC3 lens 3 of docs/real_data.md (130 x 130 pixels at
0.04", pixel PSF, two Sersic lens-light components, the shipped VAE source, 83 parameters) when
``../shared/data`` is present, else a 128 x 128 mock with the VAE source -- for float64 and
float32, eager and ``compile=True`` (:func:`difflens.fitting.build_model`), at batches of 1, 4
and 8 parameter sets (chains).  float32's accuracy is measured at the same points against
float64: the largest |U32 - U64| (nats) and the relative error of the gradient.  The points
scatter (0.02 in Pyro's unconstrained coordinates) around an earlier fit of the same lens
(``--at``: its ``summary.json`` or folder, e.g. one written by examples/fit_real_lenses.py
``--radius theta_E``), else around the prior medians, where the fit is poor and |dU| larger.

    python benchmarks/precision.py [--shared ../shared/data] [--at DIR] [--runs 5]
                                   [--batches 1 4 8] [--device cpu] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, median_ms, synchronised  # noqa: E402

from difflens.datasets.mocks import simulate_mock  # noqa: E402
from difflens.datasets.observation import read_observation  # noqa: E402
from difflens.fitting import build_model, data_flux_scale, start_from_summary  # noqa: E402
from difflens.infer.hmc import FlatSites  # noqa: E402
from difflens.model import LensModel, Priors  # noqa: E402


def observation(shared: Path):
    d = shared / "lens_dolphin_hst" / "lens_system3"
    if d.is_dir():
        return "HST lens 3, F600LP", read_observation(
            d / "image_lens_system3_F600LP.h5", psf=d / "psf_lens_system3_F600LP.h5")
    return "mock, VAE source", simulate_mock(1, noise_sigma=0.05, npix=128, pixel_scale=0.04)


def points(model, batches, at=None, seed=0):
    """``{B: (B, D)}`` unconstrained float64 points near the fit ``at`` (default: the prior
    medians) in the layout of ``model``; every variant is evaluated at these same points."""
    values = {} if at is None else start_from_summary(model, at)
    start = FlatSites(model, init_strategy=init_to_value(values=values,
                                                         fallback=init_to_median)).start
    gen = torch.Generator().manual_seed(seed)
    return {b: start.double() + 0.02 * torch.randn(b, start.numel(), generator=gen,
                                                   dtype=torch.float64).to(start.device)
            for b in batches}


def value_and_grad(model, space, u, batch):
    pot = space.potential(LensModel.stack([model], repeat=batch))
    x = u.to(space.start.dtype).clone().requires_grad_(True)

    def call():
        val = pot(x)
        grad, = torch.autograd.grad(val.sum(), x)
        return val.detach().double(), grad.double()

    return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).parents[2] / "shared" / "data"))
    ap.add_argument("--at", default=None, metavar="DIR",
                    help="an earlier fit of the lens (summary.json or its folder) to scatter "
                         "the points around")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = header(device)
    name, obs = observation(Path(args.shared))
    lens_light = 2 if name.startswith("HST") else 0
    rows = []
    reference = {}
    scattered = None                # the points, made once by the first (float64) model
    print(f"{name}: {obs.shape[0]}x{obs.shape[1]} px")
    print(f"{'dtype':8s} {'compiled':8s} {'batch':>5s} {'ms':>8s} {'ms/chain':>8s} "
          f"{'max|dU|':>8s} {'grad rel':>8s}")
    for dtype in (torch.float64, torch.float32):
        for compiled in (False, True):
            priors = Priors.default("vae", lens_light=lens_light,
                                    flux_scale=data_flux_scale(obs)).with_theta_E()
            model = build_model(obs, source="vae", priors=priors, dtype=dtype, compile=compiled,
                                device=device)
            scattered = scattered or points(model, args.batches, args.at)
            space = FlatSites(model)                             # the layout, in this dtype
            for batch in args.batches:
                call = value_and_grad(model, space, scattered[batch], batch)
                ms = median_ms(synchronised(call, device), runs=args.runs, warmup=2)
                val, grad = call()
                row = dict(dtype=str(dtype).split(".")[1], compiled=compiled, batch=batch,
                           ms=round(ms, 2), ms_per_chain=round(ms / batch, 2))
                if dtype == torch.float64 and not compiled:
                    reference[batch] = (val, grad)
                else:
                    v64, g64 = reference[batch]
                    row["max_abs_dU"] = float((val - v64).abs().max())
                    row["grad_rel_err"] = float(((grad - g64).norm(dim=1)
                                                 / g64.norm(dim=1)).max())
                rows.append(row)
                print(f"{row['dtype']:8s} {str(compiled):8s} {batch:5d} {ms:8.1f} "
                      f"{ms / batch:8.1f} {row.get('max_abs_dU', 0.0):8.4f} "
                      f"{row.get('grad_rel_err', 0.0):8.1e}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(info, workload=name, at=args.at, rows=rows),
                                             indent=1))


if __name__ == "__main__":
    main()

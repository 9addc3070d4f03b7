"""Cost of one likelihood value + gradient of the full lens model vs image size and batch size.

The inner loop of every MAP step and every HMC leapfrog step is one batched evaluation of the
negative log posterior of a :class:`difflens.model.LensModel` and its gradient w.r.t. all
parameters (SPLE + shear + source; with the VAE source, 76 parameters per lens).  Here: a mock
with the shipped VAE source (or a Sersic source), Gaussian PSF 0.05", float64 and float32; median
milliseconds per call and per lens, for

* image sizes 64^2 .. 512^2 (field 10.24" throughout, batch 1), and
* batch sizes 1 .. 1024 at 128^2 and 256^2 (``LensModel.stack``: B lenses, one call), skipping
  batches whose autograd graph would exceed ``--max-gb`` (measured: ~1 kB per image pixel in
  float64 with the VAE source, half that in float32).

    python benchmarks/batch_scaling.py [--source vae] [--runs 5] [--device cpu] [--out FILE.json]
                                       [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, median_ms  # noqa: E402

from difflens.datasets.mocks import simulate_mock  # noqa: E402
from difflens.fitting import build_model  # noqa: E402
from difflens.infer.hmc import FlatSites  # noqa: E402
from difflens.model import LensModel  # noqa: E402


def potential_for(model, batch):
    space = FlatSites(model)
    flat = space.start
    pot = space.potential(LensModel.stack([model], repeat=batch))
    gen = torch.Generator(device=flat.device).manual_seed(0)
    u = flat + 0.01 * torch.randn(batch, flat.numel(), generator=gen, dtype=flat.dtype,
                                  device=flat.device)
    return pot, u


def time_call(model, batch, runs, device):
    pot, u = potential_for(model, batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def value_and_grad():
        x = u.detach().requires_grad_(True)
        torch.autograd.grad(pot(x).sum(), x)
        sync()

    return median_ms(value_and_grad, runs=runs, warmup=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=("vae", "sersic"), default="vae")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    ap.add_argument("--max-gb", type=float, default=10.0,
                    help="skip batches estimated to need more memory than this (GB)")
    ap.add_argument("--batch-npix", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    ap.add_argument("--plot", help="write a figure of both scalings here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = header(device)
    rows = []
    for dname in args.dtypes:
        dtype = getattr(torch, dname)

        def model_at(npix):
            obs = simulate_mock(1, npix=npix, pixel_scale=10.24 / npix, source=args.source)
            return build_model(obs, source=args.source, dtype=dtype, device=device)

        for npix in args.sizes:
            ms = time_call(model_at(npix), 1, args.runs, device)
            rows.append(dict(dtype=dname, npix=npix, batch=1, ms=ms, ms_per_lens=ms))
            print(json.dumps(rows[-1]), flush=True)
        for npix in args.batch_npix:
            model = model_at(npix)
            for batch in args.batches:
                if batch * npix ** 2 * dtype.itemsize * 125 > args.max_gb * 1e9:
                    print(f"{dname} {npix} batch {batch}: skipped (--max-gb)", flush=True)
                    continue
                try:
                    ms = time_call(model, batch, args.runs, device)
                except (RuntimeError, MemoryError) as err:      # out of memory
                    print(f"{dname} {npix} batch {batch}: {type(err).__name__}", flush=True)
                    break
                rows.append(dict(dtype=dname, npix=npix, batch=batch, ms=ms,
                                 ms_per_lens=ms / batch))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(info=info, source=args.source, rows=rows),
                                             indent=1))
    if args.plot:
        plot(rows, info, args.source, args.plot, args.batch_npix)


def plot(rows, info, source, path, batch_npix):
    """Two panels: ms per call vs image size (batch 1), ms per lens vs batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for dname in sorted({r["dtype"] for r in rows}):
        size = [r for r in rows if r["dtype"] == dname and r["batch"] == 1]
        seen = sorted({r["npix"]: r for r in size}.values(), key=lambda r: r["npix"])
        a.loglog([r["npix"] for r in seen], [r["ms"] for r in seen], "o-", label=dname)
        for npix in batch_npix:
            rb = [r for r in rows if r["dtype"] == dname and r["npix"] == npix]
            rb = sorted({r["batch"]: r for r in rb}.values(), key=lambda r: r["batch"])
            b.loglog([r["batch"] for r in rb], [r["ms_per_lens"] for r in rb], "o-",
                     label=f"{dname}, {npix}$^2$")
    a.set(xlabel="image side (pixels), field 10.24\"", ylabel="ms per value + gradient",
          title="one lens")
    b.set(xlabel="lenses in one call", ylabel="ms per lens", title="batched lenses")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"difflens {source} source, {info['device']}, torch {info['torch']}",
                 fontsize=10)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()

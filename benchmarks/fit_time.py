"""Wall time of complete lens fits with the VAE source: issue 8's fit targets, on any device.

One mock as in the paper's Sec. 5 (256x256 at 0.04", Gaussian PSF 0.05", noise 0.1, source a
decode of the shipped VAE, lens from the default priors with ``--seed``) is fitted with the
library defaults through the public API:

1. **MAP**: :func:`difflens.fitting.fit_lens` with ``samples=0`` -- restarts, the source read
   off the arcs, Adam to convergence (stops when the loss changes by < 1e-6 over 100 steps) and
   an L-BFGS polish.  Reported: wall time, reduced chi^2, log posterior, lens errors vs truth.
2. **Posterior**: :meth:`LensFit.sample` from that MAP, ``--warmup`` adaptation iterations and
   ``--samples`` draws per chain, all chains in one batched likelihood.  Reported: warm-up and
   sampling wall times separately (issue 8 counts "500 samples after warm-up"), the largest
   R-hat and smallest bulk ESS of the lens parameters, and ESS per second of sampling.
3. With ``--batch N``: the batched MAP of N such mocks (seeds ``seed .. seed+N-1``) with
   :func:`difflens.fitting.fit_lenses`, its wall time per lens and the fraction of fits with
   reduced chi^2 < 1.2.

    python benchmarks/fit_time.py                                 # CPU: MAP + 1 chain x 500
    python benchmarks/fit_time.py --device cuda --chains 4        # GPU: MAP + 4 chains x 500
    python benchmarks/fit_time.py --device cuda --batch 1000 --samples 0
    python benchmarks/fit_time.py --out benchmarks/fit_time_cpu.json

Issue 8's targets: CPU, MAP < 2 min and 500 draws after warm-up < 15 min; GPU, MAP < 10 s,
4 chains x 500 draws with R-hat < 1.01 in < 60 s, 1,000 lenses' MAP in < 10 min.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header  # noqa: E402

from difflens.datasets.mocks import simulate_mock  # noqa: E402
from difflens.fitting import fit_lens, fit_lenses  # noqa: E402
from difflens.simulate import LENS_PARAMS  # noqa: E402


def lens_errors(fit) -> dict:
    """MAP minus truth for each lens parameter (arcsec, radians, dimensionless)."""
    truth = fit.observation.truth
    return {k: round(float(fit.map.params[k]) - float(truth[k]), 5) for k in LENS_PARAMS}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--seed", type=int, default=0, help="mock and fit seed")
    ap.add_argument("--noise-sigma", type=float, default=0.1)
    ap.add_argument("--npix", type=int, default=256)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--chains", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--samples", type=int, default=500, help="draws per chain (0: MAP only)")
    ap.add_argument("--batch", type=int, default=0, help="also time the batched MAP of N mocks")
    ap.add_argument("--chunk", type=int, default=64, help="lenses per call in --batch")
    ap.add_argument("--finals", type=int, default=2,
                    help="--batch: best short runs per lens continued (fit_lenses' default 2)")
    ap.add_argument("--out", help="write the results here (JSON)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = header(device)
    dtype = getattr(torch, args.dtype)
    mock = dict(noise_sigma=args.noise_sigma, npix=args.npix, pixel_scale=10.24 / args.npix,
                psf_sigma=0.05, source="vae")
    result = dict(info=info, settings=vars(args))

    obs = simulate_mock(args.seed, **mock)
    t0 = time.perf_counter()
    fit = fit_lens(obs, restarts=args.restarts, seed=args.seed, dtype=dtype, device=device,
                   progress=False)
    result["map"] = dict(seconds=round(time.perf_counter() - t0, 1),
                         reduced_chi2=round(fit.map.reduced_chi2, 4),
                         log_posterior=round(fit.map.log_posterior, 1),
                         adam_steps=len(fit.map.loss_history), error=lens_errors(fit),
                         snr=round(float(obs.truth["snr"]), 1))
    print(json.dumps(dict(map=result["map"])), flush=True)

    if args.samples:
        fit = fit.sample(args.samples, warmup=args.warmup, chains=args.chains, seed=args.seed,
                         progress=True)
        post = fit.posterior
        rhat = [post.rhat[k] for k in LENS_PARAMS if np.isfinite(post.rhat[k])]
        ess = [post.ess[k] for k in LENS_PARAMS]
        summ = post.summary()
        result["posterior"] = dict(
            chains=args.chains, warmup=args.warmup, samples=args.samples,
            warmup_seconds=round(post.seconds["warmup"], 1),
            sampling_seconds=round(post.seconds["sampling"], 1),
            max_rhat=round(max(rhat), 4) if rhat else None, min_ess_bulk=round(min(ess), 1),
            ess_per_second=round(min(ess) / post.seconds["sampling"], 3),
            r_ein=dict(mean=round(summ["r_ein"]["mean"], 5), sd=round(summ["r_ein"]["sd"], 5),
                       truth=round(float(obs.truth["r_ein"]), 5)),
            gamma=dict(mean=round(summ["gamma"]["mean"], 4), sd=round(summ["gamma"]["sd"], 4),
                       truth=round(float(obs.truth["gamma"]), 4)))
        print(json.dumps(dict(posterior=result["posterior"])), flush=True)

    if args.batch:
        mocks = [simulate_mock(args.seed + i, **mock) for i in range(args.batch)]
        t0 = time.perf_counter()
        fits = fit_lenses(mocks, restarts=args.restarts, finals=args.finals, chunk=args.chunk,
                          seed=args.seed, dtype=dtype, device=device, progress=True)
        seconds = time.perf_counter() - t0
        chi2 = np.array([f.map.reduced_chi2 for f in fits])
        result["batch_map"] = dict(lenses=args.batch, finals=args.finals, seconds=round(seconds, 1),
                                   seconds_per_lens=round(seconds / args.batch, 2),
                                   fraction_chi2_below_1p2=round(float((chi2 < 1.2).mean()), 3))
        print(json.dumps(dict(batch_map=result["batch_map"])), flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

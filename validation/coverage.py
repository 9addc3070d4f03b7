"""Coverage study: are the posterior intervals calibrated over many mocks? (issue 7, part 2)

    python validation/coverage.py [--n 32] [--chunk 16] [--source sersic|vae|galaxy] [--out DIR]

Mocks: lens parameters from the default priors (``draw_lens(seed)``, seeds 0..n-1, r_ein kept in
[0.8, 2] arcsec), a source placed in the central third of the source plane, ``--npix`` pixels at
``--pixel-scale`` arcsec, Gaussian PSF and noise.  Each chunk of lenses is fitted together by
:func:`difflens.fitting.fit_lenses`: the batched MAP, then the HMC posterior of all lenses x chains
in one batch (:func:`difflens.infer.sample_posterior_batch`).

For every lens parameter it reports the fraction of truths inside the central 68% and 95%
posterior intervals, the mean and sd of the normalised error ``(posterior mean - truth) / sd``
(0 and 1 when calibrated), the median relative bias, and the failure rate (reduced chi^2 > 1.2).
``phi`` errors are wrapped to (-pi/2, pi/2].  Writes ``coverage.json`` and ``coverage.png``
(normalised errors per parameter against N(0, 1), and the interval coverages with their binomial
2-sigma band), and ``records.json`` (truth, MAP, posterior mean / sd of every lens).  Finished
chunks are saved under ``chunks/`` and skipped on a rerun (resume).

On the 2-core CPU the default is 32 Sersic-source mocks at 64x64 (0.12"/px).  ``--source
galaxy`` uses the real COSMOS galaxies the VAE never saw (denoised, rotated by 90 degrees per
pass through them) and fits them with the VAE source -- the honest test; with a GPU use
``--n 128 --chunk 64 --npix 256 --pixel-scale 0.04 --source galaxy --device cuda``.
``--source-interpolation cubic`` reads the fitted VAE stamp with the cubic B-spline
(:func:`difflens.fitting.fit_lenses`).

``--samples 0`` fits the MAP only and reports its errors instead (``bias.json``, ``bias.png``):
the median relative error of r_ein, theta_E, gamma and q over the mocks, which the CPU affords at
the paper's resolution, e.g. ``--n 28 --chunk 4 --npix 256 --pixel-scale 0.04 --psf-sigma 0.05
--noise-sigma 0.1 --source galaxy --samples 0`` (medium S/N, each held-out galaxy in 4 rotations).
"""
import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from difflens.datasets.mocks import simulate_mock  # noqa: E402
from difflens.fitting import fit_lenses  # noqa: E402

PARAMS = ("r_ein", "q", "phi", "gamma", "x0", "y0", "g1", "g2")


def wrap_phi(d):
    """Angle differences folded to (-pi/2, pi/2] (the ellipse has period pi)."""
    return (np.asarray(d) + math.pi / 2) % math.pi - math.pi / 2


def lens_record(obs, fit):
    """Truth, MAP, posterior mean / sd and the truth's posterior quantile for one lens."""
    post = fit.posterior
    rec = dict(seed=obs.truth["seed"], reduced_chi2=fit.map.reduced_chi2,
               log_posterior=fit.map.log_posterior, snr=obs.truth.get("snr"),
               galaxy=obs.truth.get("galaxy"), rhat=max(post.rhat[k] for k in PARAMS),
               params={})
    for k in PARAMS:
        draws = post.idata.posterior[k].values.reshape(-1)
        truth = obs.truth[k]
        if k == "phi":                       # put the truth on the branch of the draws
            truth = float(np.median(draws) + wrap_phi(truth - np.median(draws)))
        rec["params"][k] = dict(truth=obs.truth[k], map=fit.map.lens()[k],
                                mean=float(draws.mean()), sd=float(draws.std()),
                                quantile=float((draws < truth).mean()),
                                z=float((draws.mean() - truth) / draws.std()))
    return rec


def map_record(obs, fit):
    """Truth and MAP of one lens (``--samples 0``: the bias study, no posterior)."""
    lens = fit.map.lens()
    rec = dict(seed=obs.truth["seed"], reduced_chi2=fit.map.reduced_chi2,
               log_posterior=fit.map.log_posterior, snr=obs.truth.get("snr"),
               galaxy=obs.truth.get("galaxy"), params={})
    for k in PARAMS:
        rec["params"][k] = dict(truth=obs.truth[k], map=lens[k])
    rec["params"]["theta_E"] = dict(truth=math.sqrt(obs.truth["q"]) * obs.truth["r_ein"],
                                    map=math.sqrt(lens["q"]) * lens["r_ein"])
    return rec


def map_errors(records, k):
    """MAP minus truth of parameter ``k`` over the records (phi wrapped to (-pi/2, pi/2])."""
    err = np.array([r["params"][k]["map"] - r["params"][k]["truth"] for r in records])
    return wrap_phi(err) if k == "phi" else err


def relative_map_errors(records, k):
    """(MAP - truth) / |truth| of parameter ``k`` over the records."""
    return map_errors(records, k) / np.abs([r["params"][k]["truth"] for r in records])


def summarise_map(records):
    """Median relative error (signed and absolute) of the MAP of r_ein, theta_E, gamma, q, and
    the median absolute error of the others (phi wrapped; arcsec, radians, or shear)."""
    out = {}
    for k in PARAMS + ("theta_E",):
        if k in ("r_ein", "theta_E", "gamma", "q"):
            rel = relative_map_errors(records, k)
            out[k] = dict(median_rel=float(np.median(rel)), median_abs_rel=float(np.median(np.abs(rel))),
                          mean_rel=float(rel.mean()), sd_rel=float(rel.std()),
                          frac_abs_rel_below_1pc=float(np.mean(np.abs(rel) < 0.01)))
        else:
            err = map_errors(records, k)
            out[k] = dict(median=float(np.median(err)), median_abs=float(np.median(np.abs(err))))
    out["n"] = len(records)
    out["failure_rate"] = float(np.mean([r["reduced_chi2"] > 1.2 for r in records]))
    out["median_snr"] = (float(np.median([r["snr"] for r in records]))
                         if all(r["snr"] is not None for r in records) else None)
    return out


def plot_map(records, summary, path, title):
    """Relative MAP errors of r_ein, theta_E, gamma, q per lens, and the reduced chi^2."""
    keys = ("r_ein", "theta_E", "gamma", "q")
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6), constrained_layout=True)
    for ax, k in zip(axes, keys):
        rel = 100 * relative_map_errors(records, k)
        ax.hist(np.clip(rel, -10, 10), bins=np.linspace(-10, 10, 41))
        ax.axvspan(-1, 1, color="g", alpha=0.12)
        s = summary[k]
        ax.set_title(f"{k}: median {100 * s['median_rel']:+.2f}%, median |.| "
                     f"{100 * s['median_abs_rel']:.2f}%", fontsize=9)
        ax.set_xlabel("(MAP - truth) / truth  [%]", fontsize=8)
    ax = axes[4]
    ax.hist([r["reduced_chi2"] for r in records], bins=20)
    ax.axvline(1.2, color="r", lw=0.8)
    ax.set_title(f"reduced chi^2 (failures {summary['failure_rate']:.0%})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80)


def summarise(records):
    out = {}
    ok = [r for r in records if r["reduced_chi2"] <= 1.2]
    for k in PARAMS:
        u = np.array([r["params"][k]["quantile"] for r in records])
        z = np.array([r["params"][k]["z"] for r in records])
        rel = np.array([(r["params"][k]["mean"] - r["params"][k]["truth"])
                        / abs(r["params"][k]["truth"]) for r in records
                        if k in ("r_ein", "gamma", "q")]) if k in ("r_ein", "gamma", "q") else None
        out[k] = dict(cover68=float(np.mean(np.abs(u - 0.5) < 0.34)),
                      cover95=float(np.mean(np.abs(u - 0.5) < 0.475)),
                      z_mean=float(z.mean()), z_sd=float(z.std()),
                      median_abs_rel_bias=(float(np.median(np.abs(rel))) if rel is not None
                                           else None),
                      cover95_chi2_ok=float(np.mean([abs(r["params"][k]["quantile"] - 0.5) < 0.475
                                                     for r in ok])) if ok else None)
    out["n"] = len(records)
    out["failure_rate"] = float(np.mean([r["reduced_chi2"] > 1.2 for r in records]))
    out["max_rhat"] = float(max(r["rhat"] for r in records))
    return out


def plot(records, summary, path, title):
    fig, axes = plt.subplots(2, 5, figsize=(17, 6.5), constrained_layout=True)
    grid = np.linspace(-4, 4, 200)
    for ax, k in zip(axes.flat, PARAMS):
        z = np.clip([r["params"][k]["z"] for r in records], -4, 4)
        ax.hist(z, bins=np.linspace(-4, 4, 17), density=True, alpha=0.6)
        ax.plot(grid, np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), "k-", lw=1)
        s = summary[k]
        ax.set_title(f"{k}: 68% {s['cover68']:.2f}, 95% {s['cover95']:.2f}", fontsize=9)
        ax.set_xlabel("(posterior mean - truth) / sd", fontsize=8)
    ax = axes.flat[8]
    n = summary["n"]
    x = np.arange(len(PARAMS))
    for p, key, c in ((0.68, "cover68", "C0"), (0.95, "cover95", "C1")):
        ax.plot(x, [summary[k][key] for k in PARAMS], "o", color=c, label=f"{p:.0%}")
        band = 2 * math.sqrt(p * (1 - p) / n)
        ax.axhspan(p - band, p + band, color=c, alpha=0.15)
        ax.axhline(p, color=c, lw=0.8)
    ax.set_xticks(x, PARAMS, rotation=45, fontsize=8)
    lowest = min(summary[k][key] for k in PARAMS for key in ("cover68", "cover95"))
    ax.set_ylim(min(0.3, lowest - 0.05), 1.02)
    ax.set_title(f"interval coverage, {n} lenses (2-sigma band)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes.flat[9]
    ax.hist([r["reduced_chi2"] for r in records], bins=20)
    ax.axvline(1.2, color="r", lw=0.8)
    ax.set_title(f"reduced chi^2 (failures {summary['failure_rate']:.0%})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="number of mocks (seeds 0..n-1)")
    ap.add_argument("--first", type=int, default=0,
                    help="skip the chunks that end before seed FIRST (split a study over "
                         "processes sharing --out, at a multiple of --chunk; a run with --first 0 "
                         "then collects every finished chunk)")
    ap.add_argument("--chunk", type=int, default=16, help="lenses fitted and sampled together")
    ap.add_argument("--source", choices=("sersic", "vae", "galaxy"), default="sersic",
                    help="mock sources: a Sersic stamp, VAE decodes, or the held-out real "
                         "COSMOS galaxies (needs --cosmos-root); fitted with --fit-source")
    ap.add_argument("--fit-source", choices=("sersic", "vae"), default=None,
                    help="source model of the fits (default: the mock's; vae for galaxy)")
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    ap.add_argument("--apodise", action="store_true",
                    help="taper the real galaxies to zero at their stamp edge (no square cut)")
    ap.add_argument("--npix", type=int, default=64)
    ap.add_argument("--pixel-scale", type=float, default=0.12)
    ap.add_argument("--psf-sigma", type=float, default=0.12)
    ap.add_argument("--noise-sigma", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--no-source-start", action="store_true",
                    help="VAE fits: no extra MAP start from the source encoded off the arcs (the "
                         "batched MAP before 2026-11-24; section 3 of docs/validation.md)")
    ap.add_argument("--finals", type=int, default=2,
                    help="best short runs per lens continued to convergence (1: the batched MAP "
                         "before 2026-11-24)")
    ap.add_argument("--source-correction", type=float, default=None, metavar="SIGMA",
                    help="fit the VAE source with a pixelated correction of this prior sd "
                         "(fraction of the source flux scale, 64x64 grid; "
                         "fit_lenses(source_correction=))")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--sampler", choices=("hmc", "laplace"), default="hmc",
                    help="posterior: HMC, or samples x chains independent draws of the Laplace "
                         "approximation at each MAP (minutes instead of hours at 256x256)")
    ap.add_argument("--samples", type=int, default=200,
                    help="HMC draws per chain; 0: MAP only, a bias study (bias.json, bias.png)")
    ap.add_argument("--source-interpolation", choices=("bilinear", "cubic"), default="bilinear",
                    help="how the fitted VAE stamp is read between its pixels (fit_lenses)")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda: where every lens and chain of a chunk is fitted")
    ap.add_argument("--out", default="validation/output/coverage")
    args = ap.parse_args(argv)
    fit_source = args.fit_source or ("vae" if args.source == "galaxy" else args.source)
    source_name = args.source + (" (apodised)" if args.apodise and args.source == "galaxy" else "")
    fit_label = fit_source + (f" + correction {args.source_correction}"
                              if args.source_correction is not None else "")
    galaxies = None
    if args.source == "galaxy":
        from difflens.datasets.mocks import held_out_galaxies

        galaxies, ident = held_out_galaxies(args.cosmos_root, apodise=args.apodise)
        print(f"{len(galaxies)} held-out galaxies: {', '.join(ident)}", flush=True)
    out = Path(args.out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = []
    for start in range(0, args.n, args.chunk):
        seeds = list(range(start, min(args.n, start + args.chunk)))
        if seeds[-1] < args.first:
            continue
        done = out / "chunks" / f"{seeds[0]:04d}-{seeds[-1]:04d}.json"
        if done.exists():
            records += json.loads(done.read_text())
            print(f"lenses {seeds[0]}-{seeds[-1]}: done before, loaded", flush=True)
            continue
        mocks = [simulate_mock(s, noise_sigma=args.noise_sigma, npix=args.npix,
                               pixel_scale=args.pixel_scale, psf_sigma=args.psf_sigma,
                               source=args.source, galaxies=galaxies) for s in seeds]
        for s, m in zip(seeds, mocks):
            m.truth["seed"] = s
        fits = fit_lenses(mocks, source=fit_source, steps=args.steps, restarts=args.restarts,
                          encode_source=not args.no_source_start, finals=args.finals,
                          samples=args.samples, warmup=args.warmup, chains=args.chains,
                          sampler=args.sampler, source_correction=args.source_correction,
                          source_interpolation=args.source_interpolation, device=args.device,
                          seed=seeds[0])
        record = lens_record if args.samples > 0 else map_record
        chunk = [record(m, f) for m, f in zip(mocks, fits)]
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(chunk, indent=1))
        tmp.replace(done)                                   # never a half-written chunk
        records += chunk
        print(f"lenses {seeds[0]}-{seeds[-1]}: {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "records.json").write_text(json.dumps(records, indent=1))     # every lens, one file
    if args.samples == 0:
        summary = summarise_map(records)
        summary.update(settings=vars(args), seconds=time.perf_counter() - t0)
        (out / "bias.json").write_text(json.dumps(summary, indent=1))
        plot_map(records, summary, out / "bias.png",
                 f"MAP errors of {summary['n']} mocks, {source_name} source (fit: {fit_label}), "
                 f"{args.npix}x{args.npix} at {args.pixel_scale}\", noise {args.noise_sigma}, "
                 f"median S/N {summary['median_snr']:.0f}")
        print(json.dumps({k: summary[k] for k in PARAMS + ("theta_E",)}, indent=1))
        print(f"failure rate {summary['failure_rate']:.2f}, {summary['seconds']:.0f} s")
        return
    summary = summarise(records)
    summary["settings"] = vars(args)
    summary["seconds"] = time.perf_counter() - t0
    (out / "coverage.json").write_text(json.dumps(summary, indent=1))
    sampled = (f"{args.chains} chains x {args.samples} draws" if args.sampler == "hmc" else
               f"Laplace approximation, {args.chains * args.samples} draws")
    title = (f"{summary['n']} mocks, {source_name} source (fit: {fit_label}), "
             f"{args.npix}x{args.npix} at "
             f"{args.pixel_scale}\", noise {args.noise_sigma}; {sampled}")
    plot(records, summary, out / "coverage.png", title)
    print(json.dumps({k: summary[k] for k in PARAMS}, indent=1))
    print(f"failure rate {summary['failure_rate']:.2f}, max R-hat {summary['max_rhat']:.3f}, "
          f"{summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()

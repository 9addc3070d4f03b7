"""One lens at the paper's three noise levels: S/N, MAP, posterior widths (paper Sec. 5, Table 1).

    python examples/compare_noise_levels.py [--seed 1] [--samples 150] [--galaxy 110283] [--out DIR]

The same mock (lens from the default priors, 256x256 at 0.04", PSF 0.05") observed with noise
sigma 0.333, 0.1 and 0.0333 (low / medium / high S/N), each fitted with MAP and HMC (VAE source).
The mock's source is a VAE decode, or with ``--galaxy IDENT`` one of the real COSMOS galaxies the
VAE never saw (denoised; ``--cosmos-root``), as in the paper's Sec. 5.
Writes ``noise_levels.png`` (observations and the marginal posteriors of r_ein, gamma, phi, q per
level, truths marked), ``noise_levels.json`` (S/N, MAP, posterior mean/sd, R-hat, bias per
level) and per level ``<level>/fit.png`` (the paper's Figs. 6-7 panel) and ``<level>/corner.png``
(Figs. 8-9).  The paper reports statistical errors shrinking from ~3% to below 1% with S/N.
A level whose ``<level>/summary.json`` and ``posterior.nc`` already exist is read back instead of
refitted (the run resumes after an interruption; ``--refit`` forces new fits), and ``--levels``
fits only some levels.  A level interrupted while sampling resumes its chains from
``<level>.hmc-checkpoint.pt`` (the MAP is recomputed, identically, from the same seed).
"""
import argparse
import json
import time
from pathlib import Path

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from difflens.datasets.mocks import NOISE_LEVELS, held_out_galaxies, simulate_mock  # noqa: E402
from difflens.fitting import fit_lens  # noqa: E402

SHOWN = ("r_ein", "gamma", "phi", "q")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=150, help="HMC draws per chain (0: MAP only)")
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--galaxy", default=None,
                    help="identifier of a held-out COSMOS galaxy as the source (e.g. 110283)")
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    ap.add_argument("--out", default="examples/output/noise_levels")
    ap.add_argument("--levels", nargs="+", choices=list(NOISE_LEVELS), default=list(NOISE_LEVELS),
                    help="noise levels to fit (the figure shows every level found under --out)")
    ap.add_argument("--refit", action="store_true", help="refit levels already saved under --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mock = dict(source="vae")
    if args.galaxy is not None:
        images, ident = held_out_galaxies(args.cosmos_root)
        pick = [i for i, name in enumerate(ident) if name.split(":")[-1] == str(args.galaxy)]
        if not pick:
            raise SystemExit(f"galaxy {args.galaxy} is not among the held-out ones: "
                             + ", ".join(n.split(":")[-1] for n in ident))
        mock = dict(source="galaxy", galaxies=images[pick])
    results, shown = {}, {}
    for level, sigma in NOISE_LEVELS.items():
        obs = simulate_mock(args.seed, noise_sigma=sigma, **mock)
        saved = out / level
        done = (saved / "summary.json").exists() and (
            args.samples == 0 or (saved / "posterior.nc").exists())
        if level in args.levels and (args.refit or not done):
            t0 = time.perf_counter()
            checkpoint = out / f"{level}.hmc-checkpoint.pt" if args.samples > 0 else None
            if args.refit and checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
            fit = fit_lens(obs, source="vae", steps=args.steps, samples=args.samples,
                           warmup=args.warmup, chains=args.chains, seed=args.seed,
                           checkpoint=checkpoint)
            fit.save(saved)
            minutes = (time.perf_counter() - t0) / 60
        elif done:
            minutes = None                                      # read back from an earlier run
        else:
            continue
        s = json.loads((saved / "summary.json").read_text())
        draws = None
        if "posterior" in s:
            posterior = az.from_netcdf(str(saved / "posterior.nc")).posterior
            draws = {k: posterior[k].values.reshape(-1) for k in SHOWN}
        results[level] = dict(noise_sigma=sigma, snr=obs.truth["snr"],
                              reduced_chi2=s["reduced_chi2"], minutes=minutes,
                              **{k: dict(truth=obs.truth[k], map=s["map"][k],
                                         **({m: s["posterior"][k][m] for m in
                                             ("mean", "sd", "r_hat", "ess_bulk")}
                                            if "posterior" in s else {}))
                                 for k in SHOWN})
        for k in SHOWN:
            r = results[level][k]
            est = r.get("mean", r["map"])
            r["error"] = est - r["truth"]                        # estimate - truth
            r["bias_percent"] = 100 * r["error"] / abs(r["truth"]) if k != "phi" else None
        shown[level] = (obs, s, draws)
        print(f"{level:6s} sigma {sigma:.4f}  S/N {obs.truth['snr']:6.0f}  "
              f"chi2_nu {s['reduced_chi2']:.3f}  " + "  ".join(
                  f"{k} {s['map'][k]:.4f}" + (f"+-{s['posterior'][k]['sd']:.4f}"
                                              if "posterior" in s else "") for k in SHOWN),
              flush=True)
    (out / "noise_levels.json").write_text(json.dumps(results, indent=1))

    fig, axes = plt.subplots(2, 4, figsize=(15, 7), constrained_layout=True)
    for ax, (level, (obs, _, _)) in zip(axes[0], shown.items()):
        ax.imshow(obs.image, origin="lower", cmap="magma")
        ax.set_title(f"{level}: sigma {NOISE_LEVELS[level]}, S/N {obs.truth['snr']:.0f}")
        ax.axis("off")
    for ax in axes[0][len(shown):]:                   # levels not fitted (yet)
        ax.axis("off")
    for ax, k in zip(axes[1], SHOWN):
        for level, (obs, s, draws) in shown.items():
            if draws is not None:
                ax.hist(draws[k], bins=30, density=True, histtype="step", label=level)
            else:
                ax.axvline(s["map"][k], ls=":", label=f"{level} MAP")
        ax.axvline(obs.truth[k], color="k", lw=1.5, label="truth")
        ax.set_xlabel(k)
    axes[1, 0].legend(fontsize=8)
    fig.savefig(out / "noise_levels.png", dpi=90)
    print(f"wrote {out}/noise_levels.png, noise_levels.json")


if __name__ == "__main__":
    main()

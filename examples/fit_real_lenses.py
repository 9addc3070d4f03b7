"""Fit real lenses with lens light: two HST WFC3 lenses and the JWST COSMOS-Web ring.

    python examples/fit_real_lenses.py [--only NAME] [--source vae|sersic] [--samples 150]
                                       [--shared ../shared/data] [--out examples/output/real_lenses]

The data are not shipped with difflens (see ``../shared/data/*/PROVENANCE.md``): the HST lenses are
lenstronomy-style HDF5 files of the dolphin example data (noise map from background rms and the
exposure map), the JWST ring is PyAutoLens FITS (noise map, PSF, extra-galaxy mask), cut out around
the lens.  Each lens is fitted with Sersic lens-light components centred on the mass (two unless
``--lens-light`` says otherwise), the SPLE + shear mass and the chosen source (default: the
shipped VAE), first MAP (data-driven initialiser, restarts; saved at once) and then HMC of mass
and source with the lens light held at its MAP.
For each lens the script writes ``summary.json``, ``fit.png`` (data, model, normalised residual,
source), ``corner.png``, ``trace.png`` (every chain's draws), ``posterior.nc`` and the COOLEST
model (``coolest.json`` + FITS files, pixel frame) under ``--out/NAME`` and prints reduced chi^2
and r_ein / theta_E with posterior sd.
The HMC state is checkpointed to ``--out/NAME.hmc-checkpoint.pt``, and the MAP the chains
started from beside it (``.map.pt``, read instead of searched again on a rerun, so float32 and
compiled runs resume too): rerun the same command to resume an interrupted run, or with a
larger ``--samples`` to extend chains that have not converged (the draws are those of one
longer run), or with a smaller one (at least the draws the checkpoint holds) to end an
interrupted run early with the draws it has.
With ``--modes`` (a JSON list of overrides of the MAP naming other basins of the posterior) the
chains also jump between the basins' modes (``LensFit.sample(modes=)``), or with
``--importance N`` the posterior is importance-sampled over them instead (``LensFit.sample_modes``).
With ``--tempering K`` each chain is a ladder of K chains at rising temperatures that exchange
positions (parallel tempering, ``LensFit.sample(tempering=)``).

Coordinates are the pixel frame (x along columns, y along rows, arcsec from the cutout centre), not
RA/Dec: position angles are mirrored with respect to the sky for these images.
"""
import argparse
import json
import time
from pathlib import Path

import arviz as az
import numpy as np
import pyro.distributions as dist
import torch

from difflens.datasets.observation import read_observation
from difflens.fitting import data_flux_scale, fit_lens
from difflens.model import Priors, TruncatedNormal

HERE = Path(__file__).resolve().parent


def dolphin(system, band, shared):
    d = shared / "lens_dolphin_hst" / f"lens_system{system}"
    return read_observation(d / f"image_lens_system{system}_{band}.h5",
                            psf=d / f"psf_lens_system{system}_{band}.h5")


def cosmosweb(band, shared, size):
    d = shared / "lens_cosmosweb_ring_jwst" / band
    pixel_scale = json.loads((d / "info.json").read_text())["pixel_scale"]
    obs = read_observation(d / "data.fits", noise_map=d / "noise_map.fits", psf=d / "psf.fits",
                           exclude=d / "mask_extra_galaxies.fits", pixel_scale=pixel_scale)
    return obs.cutout(size)


# other objects in the cutouts, (x, y) and radius in arcsec of the pixel frame, left out of the
# likelihood with --mask-neighbours (the JWST ring comes with its own mask file, used always)
NEIGHBOURS = {
    "hst_system3_F600LP": [((2.18, -0.70), 0.45),   # an extended galaxy beyond the arc
                           ((-2.22, 1.94), 0.30)],  # a compact one
}

LENSES = {
    "hst_system1_F390W": lambda s: dolphin(1, "F390W", s),
    "hst_system3_F600LP": lambda s: dolphin(3, "F600LP", s),
    "jwst_cosmosweb_ring_F150W": lambda s: cosmosweb("F150W", s, 141),
}


def _ladder(text):
    """``--tempering``: a number of levels K, or comma-separated inverse temperatures."""
    return [float(b) for b in text.split(",")] if "," in text else int(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(LENSES), action="append")
    ap.add_argument("--source", choices=("vae", "sersic"), default="vae")
    ap.add_argument("--lens-light", type=int, default=2, help="Sersic lens-light components")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--restarts", type=int, default=6)
    ap.add_argument("--finals", type=lambda t: t if t == "all" else int(t), default=1,
                    help="MAP: continue the best N short runs (or 'all') to convergence, keep "
                         "the best")
    ap.add_argument("--no-source-start", action="store_true",
                    help="MAP: no extra run from the source read off the arcs (VAE encoder); "
                         "reproduces runs made before 2026-11-23 (session 16)")
    ap.add_argument("--samples", type=int, default=150, help="HMC draws per chain (0: MAP only)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gamma-max", type=float, default=None,
                    help="upper edge of the slope prior (default: the library's, 2.8; the "
                         "deflection table covers gamma 1-3)")
    ap.add_argument("--gamma-prior", type=float, nargs=2, default=None, metavar=("MEAN", "SD"),
                    help="a Gaussian slope prior (truncated to the default range) in place of "
                         "the library's N(2.0, 0.25), e.g. the SLACS population 2.08 0.16 "
                         "(Auger et al. 2010) for a lens whose single arc leaves the slope open")
    ap.add_argument("--gamma-fixed", type=float, default=None, metavar="GAMMA",
                    help="hold the slope fixed, e.g. 2.0: the singular isothermal ellipsoid "
                         "(SIE) + shear that dolphin and most lens surveys fit where one arc "
                         "cannot constrain the slope")
    ap.add_argument("--radius", choices=("r_ein", "theta_E"), default="r_ein",
                    help="Einstein radius sampled: the major-axis r_ein or lenstronomy's "
                         "theta_E = sqrt(q) r_ein, which the arcs pin (Priors.with_theta_E)")
    ap.add_argument("--hold", action="append", default=[],
                    help="a site held at its MAP while sampling (repeatable), e.g. src_s")
    ap.add_argument("--marginalise-amplitudes", action="store_true",
                    help="integrate source and lens-light amplitudes out analytically "
                         "(Priors.with_amplitudes_marginalised) instead of sampling them")
    ap.add_argument("--source-correction", type=float, default=None, metavar="SIGMA",
                    help="give the VAE source a pixelated correction with this prior sd (a "
                         "fraction of the source flux scale, e.g. 0.1; "
                         "Priors.with_source_correction)")
    ap.add_argument("--free-light-centres", type=float, default=None, metavar="SD",
                    help="give each lens-light component its own centre, Normal(cutout "
                         "centre, SD) in arcsec, instead of tying it to the mass centre")
    ap.add_argument("--mask-neighbours", action="store_true",
                    help="leave the other objects listed in NEIGHBOURS out of the likelihood")
    ap.add_argument("--per-chain-metric", action="store_true",
                    help="every HMC chain adapts its own metric (LensFit.sample)")
    ap.add_argument("--init-from", default=None,
                    help="output folder of an earlier run: each lens's MAP starts from its "
                         "summary.json there (the other restarts still run)")
    ap.add_argument("--pilot", default=None, metavar="DIR",
                    help="output folder of an earlier sampled run of the same settings: each "
                         "lens's posterior.nc there whitens HMC and starts its chains "
                         "(LensFit.sample(pilot=)); use another --out")
    ap.add_argument("--pilot-flow", action="store_true",
                    help="with --pilot: fit a normalising flow to the pilot's draws and sample "
                         "in its latent space (LensFit.sample(pilot_flow=True))")
    ap.add_argument("--source-interpolation", choices=("bilinear", "cubic"),
                    default="bilinear",
                    help="how the VAE stamp is read between pixels (fit_lens("
                         "source_interpolation=)); cubic lets HMC take longer steps")
    ap.add_argument("--modes", default=None, metavar="JSON",
                    help="the posterior's other basins, a JSON list of overrides of the MAP's "
                         "values, e.g. '[{\"q\": 0.6, \"r_ein\": 1.65}]': each is fitted to "
                         "its own MAP and HMC adds mode-jumping moves between all of them "
                         "(LensFit.sample(modes=)), which weigh basins chains cross too rarely")
    ap.add_argument("--tempering", type=_ladder, default=None, metavar="K|B0,B1,...",
                    help="parallel tempering: each of --chains becomes a ladder of K chains at "
                         "rising temperatures exchanging positions (LensFit.sample("
                         "tempering=K); K times the cost), or give the inverse temperatures, "
                         "e.g. 1,0.8,0.64,0.51; the posterior keeps the coldest")
    ap.add_argument("--importance", type=int, default=None, metavar="N",
                    help="with --modes: instead of HMC, N importance-sampling draws from "
                         "Laplace approximations at the modes (LensFit.sample_modes; its PSIS "
                         "pareto_k says whether to trust them)")
    ap.add_argument("--umbrella", default=None, metavar="LO:HI:K",
                    help="instead of plain HMC, umbrella sampling along q (or "
                         "--umbrella-coordinate): K windows centred from LO to HI, "
                         "--umbrella-chains chains each (--samples, --warmup per chain), "
                         "reweighted by MBAR (LensFit.sample_umbrella); for the slow ridge of "
                         "lens 3.  Combines with --pilot")
    ap.add_argument("--umbrella-kappa", type=float, default=None, metavar="KAPPA",
                    help="with --umbrella: the restraint's stiffness (1/coordinate^2; default "
                         "1/spacing^2)")
    ap.add_argument("--umbrella-coordinate", default="q", metavar="SITE",
                    help="with --umbrella: the coordinate the windows cut, q (default) or a "
                         "scalar sampled site such as src_s, the source stamp's size (arcsec)")
    ap.add_argument("--umbrella-chains", type=int, default=1, metavar="N",
                    help="with --umbrella: chains per window (default 1); with N >= 2 each "
                         "window's R-hat compares its own chains")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda: where the MAP and the chains run (fit_lens(device=))")
    ap.add_argument("--float32", action="store_true",
                    help="compute in float32 instead of float64 (fit_lens(dtype=)): half the "
                         "time and memory; the log posterior of HST lens 3 moves by <= 0.013 nats")
    ap.add_argument("--compile", action="store_true",
                    help="run the simulator as one torch.compile-d graph (fit_lens(compile=); "
                         "needs a C compiler; pays with --float32: ~3x faster than float64 "
                         "eager on lens 3)")
    ap.add_argument("--shared", default=str(HERE.parents[1] / "shared" / "data"))
    ap.add_argument("--out", default=str(HERE / "output" / "real_lenses"))
    args = ap.parse_args(argv)
    if args.gamma_prior is not None and not args.gamma_prior[1] > 0:
        ap.error(f"--gamma-prior: the sd must be > 0, got {args.gamma_prior[1]}")
    if args.gamma_fixed is not None and (args.gamma_prior is not None
                                         or args.gamma_max is not None):
        ap.error("--gamma-fixed holds the slope: it cannot be combined with --gamma-prior or "
                 "--gamma-max")
    if args.free_light_centres is not None and not args.free_light_centres > 0:
        ap.error(f"--free-light-centres: the sd must be > 0, got {args.free_light_centres}")
    if args.gamma_fixed is not None and not 1.0 < args.gamma_fixed < 3.0:
        ap.error(f"--gamma-fixed must lie inside the deflection table's range (1, 3), got "
                 f"{args.gamma_fixed}")
    if args.pilot_flow and not args.pilot:
        ap.error("--pilot-flow needs --pilot")
    starts = None
    if args.modes is not None:
        try:
            starts = json.loads(args.modes)
        except json.JSONDecodeError as err:
            ap.error(f"--modes is not JSON: {err}")
        if not isinstance(starts, list) or not all(isinstance(m, dict) for m in starts):
            ap.error("--modes must be a JSON list of objects, e.g. '[{\"q\": 0.85}]'")
    if args.importance is not None and (starts is None or args.importance < 2):
        ap.error("--importance needs --modes and N >= 2 draws")
    windows = None                  # umbrella centres along q or --umbrella-coordinate
    if args.umbrella is not None:
        try:
            lo, hi, k = args.umbrella.split(":")
            windows = np.linspace(float(lo), float(hi), int(k))
        except ValueError:
            ap.error(f"--umbrella takes LO:HI:K, e.g. 0.4:0.85:10, got {args.umbrella!r}")
        if not (int(k) >= 2 and float(hi) > float(lo)):
            ap.error(f"--umbrella needs K >= 2 windows and HI > LO, got {args.umbrella!r}")
        if args.modes is not None or args.pilot_flow or args.per_chain_metric:
            ap.error("--umbrella takes no --modes, --pilot-flow or --per-chain-metric (every "
                     "window adapts its own metric)")
        if args.umbrella_chains < 1:
            ap.error(f"--umbrella-chains must be >= 1, got {args.umbrella_chains}")
    elif (args.umbrella_kappa is not None or args.umbrella_coordinate != "q"
          or args.umbrella_chains != 1):
        ap.error("--umbrella-kappa, --umbrella-coordinate and --umbrella-chains need --umbrella")
    shared = Path(args.shared)
    if not shared.exists():
        raise SystemExit(f"data folder {shared} not found (pass --shared)")
    results = {}
    for name in args.only or LENSES:
        t0 = time.perf_counter()
        obs = LENSES[name](shared)
        if args.mask_neighbours and name in NEIGHBOURS:
            centres, radii = zip(*NEIGHBOURS[name])
            obs = obs.excluding_discs(centres, radii)
            print(f"masked {len(centres)} neighbours: {int((~obs.mask).sum())} pixels")
        print(f"\n== {name}: {obs.shape[0]}x{obs.shape[1]} px at {obs.pixel_scale:.3f}\"/px")
        pilot = None
        if args.pilot and args.samples > 0:
            # read into memory now: saving the MAP below may replace that very folder
            nc = Path(args.pilot) / name / "posterior.nc"
            if not nc.is_file():
                raise SystemExit(f"--pilot: {nc} not found")
            pilot = az.from_dict(posterior={k: v.values for k, v in
                                            az.from_netcdf(str(nc)).posterior.items()})
        priors = Priors.default(args.source, lens_light=args.lens_light,
                                flux_scale=data_flux_scale(obs))
        g = priors.lens["gamma"]            # the default slope prior, other centre/width/edge
        mean, sd = args.gamma_prior or (g.loc, g.scale)
        high = g.high if args.gamma_max is None else args.gamma_max
        priors.lens["gamma"] = (TruncatedNormal(mean, sd, g.low, high)
                                if args.gamma_fixed is None else args.gamma_fixed)
        if args.free_light_centres is not None:
            for component in priors.lens_light:
                for k in ("x0", "y0"):
                    component[k] = dist.Normal(torch.tensor(0.0, dtype=torch.float64),
                                               args.free_light_centres)
        if args.radius == "theta_E":
            priors = priors.with_theta_E()
        if args.marginalise_amplitudes:
            priors = priors.with_amplitudes_marginalised()
        if args.source_correction is not None:
            priors = priors.with_source_correction(args.source_correction)
        # MAP first, saved at once (a long sampling run that is interrupted keeps the MAP); a
        # rerun reads the MAP kept beside the HMC checkpoint instead of searching again
        checkpoint = Path(args.out) / f"{name}.hmc-checkpoint.pt"
        fit = fit_lens(obs, source=args.source, priors=priors, steps=args.steps,
                       restarts=args.restarts, finals=args.finals,
                       encode_source=not args.no_source_start, samples=0, seed=args.seed,
                       source_interpolation=args.source_interpolation, device=args.device,
                       dtype=torch.float32 if args.float32 else torch.float64,
                       compile=args.compile,
                       init=Path(args.init_from) / name if args.init_from else None,
                       checkpoint=checkpoint if args.samples > 0 else None)
        out = fit.save(Path(args.out) / name, coolest=True)
        print(fit.table(), flush=True)
        if args.importance:
            # the same conditioning as the HMC below: lens light held at its MAP
            fit = fit.sample_modes(starts, args.importance, sample_lens_light=False,
                                   hold=args.hold, seed=args.seed)
            out = fit.save(Path(args.out) / name, coolest=True)
            print(json.dumps(fit.modes.summary(), indent=1))
        elif windows is not None and args.samples > 0:
            # lens light held at its MAP, as for plain HMC below
            fit = fit.sample_umbrella(windows, args.samples, kappa=args.umbrella_kappa,
                                      coordinate=args.umbrella_coordinate,
                                      chains_per_window=args.umbrella_chains,
                                      warmup=args.warmup, pilot=pilot, sample_lens_light=False,
                                      hold=args.hold, seed=args.seed,
                                      checkpoint=checkpoint)
            out = fit.save(Path(args.out) / name, coolest=True)
            print(json.dumps(fit.umbrella.summary(), indent=1))
        elif args.samples > 0:
            # lens light held at its MAP (see fit_lens(sample_lens_light=...)): with it free,
            # HMC crawls (steps ~0.02) where a Sersic index presses against its prior bound
            # the sampler's state is kept beside the results: rerunning the same command resumes
            # an interrupted run, from the MAP kept beside its checkpoint
            fit = fit.sample(args.samples, warmup=args.warmup, chains=args.chains,
                             sample_lens_light=False, hold=args.hold, seed=args.seed,
                             per_chain_metric=args.per_chain_metric, pilot=pilot,
                             pilot_flow=args.pilot_flow, modes=starts or (),
                             tempering=args.tempering, checkpoint=checkpoint)
            out = fit.save(Path(args.out) / name, coolest=True)
        s = fit.summary()
        line = {"reduced_chi2": round(s["reduced_chi2"], 3),
                "r_ein_map": round(s["map"]["r_ein"], 4),
                "theta_E_map": round(s["map_lenstronomy"]["theta_E"], 4),
                "minutes": round((time.perf_counter() - t0) / 60, 1)}
        if "posterior" in s:
            for k in ("r_ein", "theta_E", "gamma", "q"):
                p = s["posterior"][k]
                line[k] = f"{p['mean']:.4f} +- {p['sd']:.4f} (R-hat {p['r_hat']:.3f})"
        results[name] = line
        print(fit.table())
        print(json.dumps(line, indent=1), f"\nwrote {out}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

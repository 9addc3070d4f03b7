"""Is the truth the posterior mode?  Fit mocks starting from their true lens (issue 7, section 3).

    python validation/from_truth.py --source galaxy --seeds 0 7 11 16 18 [--apodise]
        [--source-correction 0.1 [--correction-pixels 64] [--correction-smoothing 1]
         [--evidence] [--maximise-evidence] [--blind] [--laplace]]

Each mock is the one ``validation/coverage.py`` fits for that seed (256x256 at 0.04", PSF
0.05", noise 0.1 unless told otherwise).  Two stages:

1. **The best source at the true lens**: the lens held at its true parameters
   (``LensModel.with_fixed``), the source alone fitted -- placement, latent and amplitude, from
   the true placement and the source read off the arcs through the true lens
   (``fit_map(encode_source=True, restarts=1)``).  Its log posterior is that of the full model at
   that point: the best the source model can do with the right lens.
2. **Released**: every parameter free, ``fit_map(init=stage 1, restarts=1,
   encode_source=False)``: the fit can only leave the truth if the posterior prefers another
   lens.

Compare with the study's MAP for the same seed (``records.json``): if the study's log posterior
exceeds stage 1's by many nats, the posterior mode itself is away from the truth (e.g. a source
model that cannot draw the galaxy), and stage 2 shows where it goes; a higher stage-2 value than
the study's means the study's search missed.  With ``--source-correction SIGMA`` the fitted
source is the VAE stamp plus a pixelated correction (``build_model(source_correction=)``).
Prints one JSON line per seed: the log posterior of both stages, stage 2's reduced chi^2 and its
relative errors (%) of r_ein, gamma, q and
theta_E = sqrt(q) r_ein.

With ``--evidence`` (needs ``--source-correction``) each line also carries the correction
integrated out at stage 2's mode (:func:`difflens.infer.evidence.correction_evidence`): the log
evidence, the number of correction values the data constrain, and the evidence at other
``sigma``.  ``--blind`` adds, per seed, the MAP of ``validation/coverage.py``'s blind search
(lenses fitted in pairs of consecutive seeds, seeded by the first, as ``coverage.py --chunk 2``)
with the same numbers, so the two modes can be compared by their evidence.

With ``--maximise-evidence`` (needs ``--source-correction``) each mode is then moved to the
nearest maximum of the evidence (:func:`difflens.infer.evidence.maximise_evidence`, the
correction integrated out), and the record carries its errors, evidence and wall time under
``"evidence_max"`` (with ``--laplace`` also the Laplace posterior there): is the lens that
maximises the evidence nearer the truth than the joint mode?  ``--evidence-hold src_s`` holds
such sites at the joint mode during that search.  ``--save DIR`` keeps every mode's site
values (``DIR/seed<N>.pt``, with the mock's and the corrections' settings); ``--start-from
DIR`` takes the joint mode from such a file, where DIR has one, instead of rerunning stages
1-2 (which are reproducible on one machine, not bit for bit across machines).

With ``--evidence-frame`` that search integrates out a different correction, built at each
joint mode: a grid fixed on the source plane over the joint mode's stamp (centre
``src_x0, src_y0``, half-width ``src_s``, then held; ``PixelCorrection(frame=)``), with the
prior among ``--evidence-regularisation`` (default gradient and curvature, Suyu et al. 2006) and
the sd among ``--evidence-sigmas`` of highest evidence at the joint mode; the record's
``"evidence_max"`` carries the choice (``"correction"``) and the evidence at each sd at the
maximum.  The stamp's placement then no longer sets the correction's resolution (section 3f's
bias).  ``--evidence-frame-scales`` adds the grid's half-width (in units of the stamp's) to
the choice; ``--evidence-pixel-source`` switches the VAE stamp off for the search (amplitude
held at 1e-9, placement held), leaving a purely pixelated source on the source plane, the
semi-linear inversion of Suyu et al. (2006).

With ``--laplace`` each mode also gets its Laplace posterior
(:func:`difflens.infer.sample_laplace`, 2,000 draws; with a correction, the correction
integrated out of the Gaussian): per lens parameter (r_ein, gamma, q, phi, g1, g2, theta_E) the
posterior mean and sd, the truth's normalised error ``(mean - truth) / sd`` and whether the
central 68% and 95% intervals hold the truth -- the coverage question of issue 7 at these modes.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from difflens.datasets.mocks import held_out_galaxies, simulate_mock
from difflens.fitting import build_model, fit_lenses
from difflens.infer.evidence import correction_evidence, maximise_evidence
from difflens.infer import fit_map, sample_laplace
from difflens.infer.map import summarise_map
from difflens.model import q_phi_to_ellipticity, unwrap_angle
from difflens.sources.correction import PixelCorrection


LENS_SITES = ("r_ein", "e1", "e2", "gamma", "x0", "y0", "g1", "g2")
SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
COVERED = ("r_ein", "gamma", "q", "phi", "g1", "g2", "theta_E")


def truth_start(truth):
    """The mock's true lens and source placement as site values for ``fit_lens(init=)``."""
    e1, e2 = q_phi_to_ellipticity(torch.tensor(truth["q"]), torch.tensor(truth["phi"]))
    values = {k: truth[k] for k in ("r_ein", "gamma", "x0", "y0", "g1", "g2", "src_x0", "src_y0",
                                    "src_s")}
    values.update(e1=float(e1), e2=float(e2))
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


def fit_from_truth(model, truth):
    """The two stages of the module doc on ``model`` (a VAE-source LensModel of the mock with
    ``truth``): return stage 1's log posterior and stage 2's MAPResult."""
    start = truth_start(truth)
    lens_sites = {k: float(start[k]) for k in LENS_SITES}
    held = fit_map(model.with_fixed(lens_sites), init=start, restarts=1, seed=0, progress=False)
    at_truth = {**held.sample_sites(), **{k: model.tensor(v) for k, v in lens_sites.items()}}
    stage1 = summarise_map(model, at_truth).log_posterior
    free = fit_map(model, init=at_truth, restarts=1, encode_source=False, seed=0, progress=False)
    return stage1, free


def relative_errors(lens, truth):
    """Relative errors (%) of r_ein, gamma, q and theta_E = sqrt(q) r_ein, rounded to 0.01."""
    err = {k: round(100 * (lens[k] - truth[k]) / truth[k], 2) for k in ("r_ein", "gamma", "q")}
    err["theta_E"] = round(100 * (math.sqrt(lens["q"]) * lens["r_ein"]
                                  / (math.sqrt(truth["q"]) * truth["r_ein"]) - 1), 2)
    return err


def evidence_record(model, values):
    """The correction integrated out at site ``values``: JSON-ready numbers."""
    ev = correction_evidence(model, values, sigmas=SIGMAS)
    return dict(log_evidence=round(ev.log_evidence, 1), n_constrained=round(ev.n_constrained, 1),
                evidence_by_sigma={str(k): round(v, 1) for k, v in ev.by_sigma.items()},
                src_amp=round(float(values["src_amp"]), 3))


def evidence_max_record(model, values, truth, max_eval, laplace=False, seed=0, hold=()):
    """The nearest maximum of the evidence from site ``values``: JSON-ready numbers (with the
    Laplace posterior there when ``laplace``) and the site values of the maximum.  The scalar
    sites in ``hold`` keep their values from ``values`` (``LensModel.with_fixed``)."""
    if hold:
        model = model.with_fixed({k: float(values[k]) for k in hold})
        values = {k: v for k, v in values.items() if k not in hold}
    best = maximise_evidence(model, values, max_eval=max_eval, progress=False)
    lens = summarise_map(model, best.values).lens()
    record = dict(error_percent=relative_errors(lens, truth),
                  log_evidence=round(best.log_evidence, 1),
                  gain=round(best.log_evidence - best.history[0], 1),
                  evaluations=len(best.history), restarts=best.restarts,
                  seconds=round(best.seconds, 1), lens={k: round(v, 5) for k, v in lens.items()})
    held = model.fixed_values()
    if hold:
        record["held"] = {k: round(float(v), 5) for k, v in held.items()}
    if laplace:
        # centred on the maximum (sample_laplace's Newton step heads for the joint mode; until
        # 2026-12-04 it was taken, so the 3f/3g records' Laplace sits one step toward it)
        record["laplace"] = laplace_record(model, best.values, truth, seed, newton_step=False)
    return record, {**best.values, **{k: model.tensor(v) for k, v in held.items()}}


PIXEL_ONLY = {"src_amp": 1e-9}          # --evidence-pixel-source: the VAE stamp switched off


def frame_model(obs, values, regularisations, sigmas, pixels, scales=(1.0,), hold=()):
    """A model of ``obs`` whose correction is fixed on the source plane (``pixels`` x
    ``pixels``) centred on the stamp of site ``values``, with half-width a scale (among
    ``scales``) times the stamp's, and the regularisation and sd of highest evidence at
    ``values`` among ``regularisations`` and ``sigmas`` (the scalar sites ``hold`` held at
    ``values``); and its JSON-ready settings (with the evidence of each choice, nats)."""
    table, best = {}, None
    for scale in scales:
        frame = (round(float(values["src_x0"]), 5), round(float(values["src_y0"]), 5),
                 round(scale * float(values["src_s"]), 5))
        for reg in regularisations:
            corr = PixelCorrection(sigmas[0], pixels, regularisation=reg, frame=frame)
            model = build_model(obs, source="vae", source_correction=corr)
            model = model.with_fixed({k: float(values[k]) for k in hold}) if hold else model
            ev = correction_evidence(model, values, sigmas=sigmas)
            table[f"{reg} x{scale:g}"] = {str(k): round(v, 1) for k, v in ev.by_sigma.items()}
            for sigma, value in ev.by_sigma.items():
                if best is None or value > best[0]:
                    best = (value, reg, sigma, frame)
    corr = PixelCorrection(best[2], pixels, regularisation=best[1], frame=best[3])
    return (build_model(obs, source="vae", source_correction=corr),
            dict(frame=list(best[3]), regularisation=best[1], sigma=best[2], pixels=pixels,
                 evidence_at_joint_mode=table))


def laplace_record(model, values, truth, seed=0, newton_step=True):
    """The Laplace posterior at site ``values`` against ``truth``: JSON-ready numbers per lens
    parameter (mean, sd, normalised error, truth inside the central 68% / 95% intervals).
    ``newton_step=False`` keeps it centred on ``values``: at an evidence maximum, where the
    Newton step of :func:`sample_laplace` would move it toward the joint mode."""
    post = sample_laplace(model, values, num_samples=2000, seed=seed,
                          newton_step=newton_step).idata.posterior
    out = {}
    for k in COVERED:
        x = post[k].values.ravel()
        if k == "theta_E":
            t = math.sqrt(truth["q"]) * truth["r_ein"]
        elif k == "phi":           # the truth on the posterior's branch (period pi)
            t = float(unwrap_angle(torch.tensor(truth["phi"]), float(np.median(x))))
        else:
            t = truth[k]
        lo95, lo68, hi68, hi95 = np.quantile(x, [0.025, 0.16, 0.84, 0.975])
        out[k] = dict(mean=round(float(x.mean()), 5), sd=round(float(x.std()), 5),
                      z=round(float((x.mean() - t) / x.std()), 2),
                      in68=bool(lo68 <= t <= hi68), in95=bool(lo95 <= t <= hi95))
    return out


def blind_fits(mocks, seeds, correction):
    """coverage.py's blind MAP of each mock (pairs of consecutive seeds, seeded by the first)."""
    fits = {}
    for i in range(0, len(seeds), 2):
        pair = list(zip(seeds, mocks))[i:i + 2]
        out = fit_lenses([m for _, m in pair], source="vae", steps=1000, restarts=4,
                         encode_source=True, finals=2, samples=0, source_correction=correction,
                         seed=pair[0][0], progress=False)
        fits.update({s: f for (s, _), f in zip(pair, out)})
    return fits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--source", choices=("vae", "galaxy"), default="galaxy")
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    ap.add_argument("--apodise", action="store_true",
                    help="taper the real galaxies to zero at their stamp edge (as coverage.py)")
    ap.add_argument("--source-correction", type=float, default=None, metavar="SIGMA",
                    help="fit with a pixelated correction of the VAE source (prior sd, a "
                         "fraction of the source flux scale)")
    ap.add_argument("--correction-pixels", type=int, default=64, metavar="N")
    ap.add_argument("--correction-smoothing", type=float, default=0.0, metavar="S",
                    help="Gaussian correlation of the correction, sd in grid pixels")
    ap.add_argument("--npix", type=int, default=256)
    ap.add_argument("--pixel-scale", type=float, default=0.04)
    ap.add_argument("--psf-sigma", type=float, default=0.05)
    ap.add_argument("--noise-sigma", type=float, default=0.1)
    ap.add_argument("--evidence", action="store_true",
                    help="also integrate the correction out at the mode (its evidence)")
    ap.add_argument("--blind", action="store_true",
                    help="also fit each mock blind, as coverage.py --chunk 2")
    ap.add_argument("--maximise-evidence", action="store_true",
                    help="also move each mode to the nearest maximum of the evidence")
    ap.add_argument("--evidence-evals", type=int, default=200, metavar="N",
                    help="most evaluations of the evidence in maximise_evidence (default 200)")
    ap.add_argument("--evidence-hold", nargs="+", default=(), metavar="SITE",
                    help="scalar sites held at the joint mode while maximising the evidence "
                         "(e.g. src_s)")
    ap.add_argument("--evidence-frame", action="store_true",
                    help="maximise the evidence of a correction fixed on the source plane over "
                         "the joint mode's stamp (regularisation and sd chosen by the evidence)")
    ap.add_argument("--evidence-regularisation", nargs="+", default=("gradient", "curvature"),
                    choices=("identity", "gradient", "curvature"), metavar="R",
                    help="priors of the --evidence-frame grid to choose among")
    ap.add_argument("--evidence-sigmas", type=float, nargs="+",
                    default=(0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2), metavar="SIGMA",
                    help="sds of the --evidence-frame grid to choose among")
    ap.add_argument("--evidence-frame-scales", type=float, nargs="+", default=(1.0,),
                    metavar="F", help="half-widths of the --evidence-frame grid to choose "
                                      "among, in units of the joint mode's stamp half-width")
    ap.add_argument("--evidence-pixel-source", action="store_true",
                    help="with --evidence-frame: switch the VAE stamp off (its amplitude held "
                         "at 1e-9), so the source is the regularised grid alone")
    ap.add_argument("--start-from", metavar="DIR",
                    help="take each joint mode from DIR/seed<N>.pt (a --save of an earlier "
                         "run), where it exists, instead of stages 1-2")
    ap.add_argument("--save", metavar="DIR",
                    help="write each mode's site values to DIR/seed<N>.pt (torch.save)")
    ap.add_argument("--laplace", action="store_true",
                    help="also the Laplace posterior at each mode (coverage of the truth)")
    args = ap.parse_args(argv)
    if (args.evidence or args.maximise_evidence) and args.source_correction is None:
        ap.error("--evidence and --maximise-evidence need --source-correction")
    if args.evidence_frame and not args.maximise_evidence:
        ap.error("--evidence-frame needs --maximise-evidence")
    if args.evidence_pixel_source and not args.evidence_frame:
        ap.error("--evidence-pixel-source needs --evidence-frame")
    if args.evidence_frame and args.blind:
        ap.error("--evidence-frame is for the joint modes from the truth, not --blind")
    galaxies = (held_out_galaxies(args.cosmos_root, apodise=args.apodise)[0]
                if args.source == "galaxy" else None)
    correction = (PixelCorrection(args.source_correction, args.correction_pixels,
                                  smoothing=args.correction_smoothing)
                  if args.source_correction is not None else None)
    mocks = [simulate_mock(seed, noise_sigma=args.noise_sigma, npix=args.npix,
                           pixel_scale=args.pixel_scale, psf_sigma=args.psf_sigma,
                           source=args.source, galaxies=galaxies) for seed in args.seeds]
    blind = blind_fits(mocks, args.seeds, correction) if args.blind else {}
    # what rebuilds each mock and model from a --save file (validation/evidence_terms.py)
    settings = dict(source=args.source, apodise=args.apodise, npix=args.npix,
                    pixel_scale=args.pixel_scale, psf_sigma=args.psf_sigma,
                    noise_sigma=args.noise_sigma,
                    correction=None if correction is None else dict(
                        sigma=correction.sigma, pixels=correction.pixels,
                        smoothing=correction.smoothing))
    for seed, obs in zip(args.seeds, mocks):
        t = obs.truth
        model = build_model(obs, source="vae", source_correction=correction)
        if args.start_from and (Path(args.start_from) / f"seed{seed}.pt").exists():
            stage1 = None                      # not rerun
            free = summarise_map(model, torch.load(Path(args.start_from) / f"seed{seed}.pt")
                                 ["released"])
        else:
            stage1, free = fit_from_truth(model, t)
        record = dict(seed=seed,
                      log_posterior_source_at_truth=None if stage1 is None else round(stage1, 1),
                      log_posterior_released=round(free.log_posterior, 1),
                      reduced_chi2=round(free.reduced_chi2, 4),
                      error_percent=relative_errors(free.lens(), t))
        if args.evidence:
            record.update(evidence_record(model, free.sample_sites()))
        saved = {"released": free.sample_sites(), "settings": settings}
        if args.maximise_evidence and args.evidence_frame:
            start, hold = free.sample_sites(), tuple(args.evidence_hold)
            if args.evidence_pixel_source:     # the VAE off: its placement has no effect
                start = {**start, **{k: torch.tensor(v, dtype=torch.float64)
                                    for k, v in PIXEL_ONLY.items()}}
                hold = tuple(dict.fromkeys(hold + (*PIXEL_ONLY, "src_x0", "src_y0", "src_s")))
            framed, chosen = frame_model(obs, start, args.evidence_regularisation,
                                         args.evidence_sigmas, args.correction_pixels,
                                         args.evidence_frame_scales, hold)
            record["evidence_max"], saved["evidence_max"] = evidence_max_record(
                framed, start, t, args.evidence_evals, args.laplace, seed, hold)
            held = framed.with_fixed({k: float(start[k]) for k in hold}) if hold else framed
            ev = correction_evidence(held, saved["evidence_max"], sigmas=args.evidence_sigmas)
            chosen["evidence_at_maximum"] = {str(k): round(v, 1) for k, v in ev.by_sigma.items()}
            chosen["n_constrained"] = round(ev.n_constrained, 1)
            record["evidence_max"]["correction"] = chosen
            saved["evidence_correction"] = {k: chosen[k] for k in
                                            ("frame", "regularisation", "sigma", "pixels")}
        elif args.maximise_evidence:
            record["evidence_max"], saved["evidence_max"] = evidence_max_record(
                model, free.sample_sites(), t, args.evidence_evals, args.laplace, seed,
                args.evidence_hold)
        if args.laplace:
            record["laplace"] = laplace_record(model, free.sample_sites(), t, seed)
        if seed in blind:
            fit = blind[seed]
            record["blind"] = dict(log_posterior=round(fit.map.log_posterior, 1),
                                   error_percent=relative_errors(fit.map.lens(), t))
            if args.evidence:
                record["blind"].update(evidence_record(model, fit.map.sample_sites()))
            saved["blind"] = fit.map.sample_sites()
            if args.maximise_evidence:
                record["blind"]["evidence_max"], saved["blind_evidence_max"] = \
                    evidence_max_record(model, fit.map.sample_sites(), t, args.evidence_evals,
                                        args.laplace, seed, args.evidence_hold)
            if args.laplace:
                record["blind"]["laplace"] = laplace_record(model, fit.map.sample_sites(), t, seed)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save(saved, Path(args.save) / f"seed{seed}.pt")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

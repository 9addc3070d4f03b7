"""Where the evidence gained by the search on the marginal comes from (issue 7, section 3f).

    python validation/evidence_terms.py DIR --seeds 0 1 2 3 [--source-correction 0.1]

Reads the site values that ``validation/from_truth.py --maximise-evidence --save DIR`` kept
for each seed (the joint mode ``released`` and the evidence maximum ``evidence_max``), rebuilds
the same mock and model from the settings saved with them (files saved before 2026-12-04
carry none: then ``from_truth.py``'s defaults, an apodised held-out galaxy, 256 x 256 at 0.04",
PSF 0.05", noise 0.1, and the correction of ``--source-correction`` on 64 x 64, with a note on
stderr) and prints one JSON line per seed with, at both points, the terms of the log evidence
(:func:`difflens.infer.evidence.correction_evidence`; at the maximum with the correction that
search integrated out, e.g. one fixed on the source plane, ``from_truth.py --evidence-frame``):

    log p(d, theta) = log p(d, theta, w*) + n^2/2 log 2 pi - 1/2 log det A,

the joint log posterior at the correction's posterior mean ``w*`` (the fit and every prior),
the Occam factor ``-1/2 log det A``, the number of correction values the data constrain, and
the source stamp's half-width ``src_s`` (arcsec), which sets the size of the correction's
pixels on the sky.

With ``--at-truth`` it adds the same terms at the true lens (every other site, the correction's
settings included, at the evidence maximum): if the evidence there is lower than at the maximum,
the evidence itself prefers the lens it found, and the error is the model's, not the search's.
With ``--truth-frame`` (for a ``--evidence-frame`` search) it adds both, the maximum and the
truth, with the grid moved onto the mock source's own stamp (centre and half-width of the
truth): whether the frame the search chose decides which lens wins.
With ``--line`` (issue 7, section 3g) it adds the exact evidence on the line from the truth to
the maximum, ``theta(t) = theta_true + t (theta_max - theta_true)`` (every other site at the
maximum), for each prior sd of ``--line-sigmas`` (the searched correction's regularisation and
grid), with ``t_peak``, the vertex of the parabola through the best ``t`` and its neighbours
(``t = 0`` the truth, ``t = 1`` the maximum; null where the best is at an end).  If ``t_peak``
fell toward 0 as the sd grows, a weaker source prior would leave the lens nearer the truth.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from difflens.datasets.mocks import held_out_galaxies, simulate_mock
from difflens.fitting import build_model
from difflens.infer.evidence import correction_evidence
from difflens.infer.map import summarise_map
from difflens.sources.correction import PixelCorrection


DEFAULTS = dict(source="galaxy", apodise=True, npix=256, pixel_scale=0.04, psf_sigma=0.05,
                noise_sigma=0.1)


def terms(model, values):
    """The evidence's terms at site ``values``: JSON-ready numbers."""
    values = {k: model.tensor(v) for k, v in values.items()}
    ev = correction_evidence(model, values)
    joint = summarise_map(model, dict(values, src_correction=ev.w_mean))
    return dict(log_evidence=round(ev.log_evidence, 1),
                log_posterior_at_w_star=round(joint.log_posterior, 1),
                occam=round(-0.5 * ev.log_det, 1), n_constrained=round(ev.n_constrained, 1),
                reduced_chi2=round(joint.reduced_chi2, 4),
                src_s=round(float(values["src_s"]), 4) if "src_s" in values else None)


def parabola_peak(ts, values):
    """The vertex of the parabola through the best of ``values`` and its two neighbours (``ts``
    ascending, equally spaced); None if the best is at an end."""
    i = max(range(len(values)), key=values.__getitem__)
    if i in (0, len(values) - 1):
        return None
    y0, y1, y2 = values[i - 1:i + 2]
    curvature = y0 - 2 * y1 + y2
    if curvature >= 0:
        return None
    return ts[i] + 0.5 * (ts[i + 1] - ts[i]) * (y0 - y2) / curvature


def evidence_line(model, at_max, truth, ts, sigmas):
    """The evidence (nats) at ``theta(t)`` for each ``t`` in ``ts`` and each sd in ``sigmas``,
    with ``t_peak`` per sd: JSON-ready (see the module doc)."""
    curves = {s: [] for s in sigmas}
    for t in ts:
        values = {k: model.tensor(v) for k, v in at_max.items()}
        for k in model.lens_sites:
            values[k] = model.tensor(truth[k] + t * (float(at_max[k]) - truth[k]))
        ev = correction_evidence(model, values, sigmas=sigmas)
        for s in sigmas:
            curves[s].append(round(ev.by_sigma[s], 1))
    return dict(t=list(ts), by_sigma={str(s): dict(log_evidence=v, t_peak=None if (
        p := parabola_peak(ts, v)) is None else round(p, 2)) for s, v in curves.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saved", help="the --save DIR of from_truth.py")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    ap.add_argument("--at-truth", action="store_true",
                    help="also the terms at the true lens (the rest at the evidence maximum)")
    ap.add_argument("--truth-frame", action="store_true",
                    help="also both points with the correction's grid on the true source "
                         "stamp (files of from_truth.py --evidence-frame)")
    ap.add_argument("--line", action="store_true",
                    help="also the evidence on the line from the truth to the maximum")
    ap.add_argument("--line-steps", type=float, nargs="+", default=(-0.5, 0.0, 0.5, 1.0, 1.5),
                    metavar="T", help="positions t on that line (0: truth, 1: maximum), "
                                      "equally spaced")
    ap.add_argument("--line-sigmas", type=float, nargs="+",
                    default=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0), metavar="SIGMA",
                    help="prior sds of the correction on that line (fractions of its flux)")
    ap.add_argument("--source-correction", type=float, default=0.1, metavar="SIGMA",
                    help="the joint modes' correction sd, for files saved without settings")
    args = ap.parse_args(argv)
    galaxies = {}
    for seed in args.seeds:
        saved = torch.load(Path(args.saved) / f"seed{seed}.pt")
        settings = saved.get("settings")
        if settings is None:
            print(f"seed {seed}: no settings saved; assuming from_truth.py's defaults",
                  file=sys.stderr)
            settings = dict(DEFAULTS, correction=dict(sigma=args.source_correction, pixels=64,
                                                      smoothing=0.0))
        key = (settings["source"], settings["apodise"])
        if settings["source"] == "galaxy" and key not in galaxies:
            galaxies[key] = held_out_galaxies(args.cosmos_root, apodise=settings["apodise"])[0]
        obs = simulate_mock(seed, noise_sigma=settings["noise_sigma"], npix=settings["npix"],
                            pixel_scale=settings["pixel_scale"], psf_sigma=settings["psf_sigma"],
                            source=settings["source"], galaxies=galaxies.get(key))
        model = build_model(obs, source="vae",
                            source_correction=PixelCorrection(**settings["correction"]))
        searched = model
        if "evidence_correction" in saved:             # from_truth.py --evidence-frame
            searched = build_model(obs, source="vae", source_correction=PixelCorrection(
                **saved["evidence_correction"]))
        # sites held during the search (--evidence-hold) keep their joint-mode values
        at_max = {**saved["released"], **saved["evidence_max"]}
        row = dict(seed=seed, released=terms(model, saved["released"]),
                   evidence_max=terms(searched, at_max))
        true_lens = {k: float(obs.truth[k]) for k in searched.lens_sites}
        at_truth = {**at_max, **true_lens}
        if args.at_truth:
            row["at_truth"] = terms(searched, at_truth)
        if args.truth_frame:
            if "evidence_correction" not in saved:
                ap.error(f"--truth-frame: seed {seed} was not searched with --evidence-frame")
            frame = tuple(float(obs.truth[k]) for k in ("src_x0", "src_y0", "src_s"))
            on_truth = build_model(obs, source="vae", source_correction=PixelCorrection(
                **{**saved["evidence_correction"], "frame": frame}))
            row["truth_frame"] = dict(frame=[round(v, 5) for v in frame],
                                      evidence_max=terms(on_truth, at_max),
                                      at_truth=terms(on_truth, at_truth))
        if args.line:
            row["line"] = evidence_line(searched, at_max, true_lens, sorted(args.line_steps),
                                        tuple(args.line_sigmas))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

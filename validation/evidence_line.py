"""Does the source prior's strength set the lens?  The evidence on the line from the truth to
the evidence maximum, for each correction sd (issue 7, section 3g).

    python validation/evidence_line.py DIR --seeds 0 2 [--steps -0.5 0 0.5 1 1.5]
        [--sigmas 0.02 0.05 0.1 0.2 0.5 1]

Reads what ``validation/from_truth.py --maximise-evidence --evidence-frame --save DIR`` kept
for each seed (the evidence maximum and the correction it integrated out), rebuilds the mock
and that model, and evaluates the exact evidence
(:func:`difflens.infer.evidence.correction_evidence`) at the lenses

    theta(t) = theta_true + t (theta_max - theta_true),

every other site at the maximum, for each prior sd ``sigma`` of the correction (a fraction of
its flux scale; the regularisation and frame as chosen).  It prints one JSON line per seed:
for each ``sigma`` the evidence at each ``t`` (nats) and ``t_peak``, the vertex of the
parabola through the best ``t`` and its neighbours (``t = 0`` is the truth, ``t = 1`` the
maximum found; null where the best ``t`` is at an end of the line).  If ``t_peak`` falls
toward 0 as ``sigma`` grows, the bias of the lens is the regularisation's: a weaker prior on
the source leaves the lens nearer the truth.
"""
import argparse
import json
from pathlib import Path

import torch

from difflens.datasets.mocks import held_out_galaxies, simulate_mock
from difflens.fitting import build_model
from difflens.infer.evidence import correction_evidence
from difflens.sources.correction import PixelCorrection


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saved", help="the --save DIR of from_truth.py --evidence-frame")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--steps", type=float, nargs="+", default=(-0.5, 0.0, 0.5, 1.0, 1.5),
                    help="positions t on the line (0: truth, 1: evidence maximum), ascending "
                         "and equally spaced")
    ap.add_argument("--sigmas", type=float, nargs="+", default=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                    help="prior sds of the correction (fractions of its flux scale)")
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    args = ap.parse_args(argv)
    ts = sorted(args.steps)
    galaxies = {}
    for seed in args.seeds:
        saved = torch.load(Path(args.saved) / f"seed{seed}.pt")
        if "evidence_correction" not in saved:
            ap.error(f"{args.saved}/seed{seed}.pt has no evidence_correction: it needs a "
                     "from_truth.py --evidence-frame --save")
        settings = saved["settings"]
        key = (settings["source"], settings["apodise"])
        if settings["source"] == "galaxy" and key not in galaxies:
            galaxies[key] = held_out_galaxies(args.cosmos_root, apodise=settings["apodise"])[0]
        obs = simulate_mock(seed, noise_sigma=settings["noise_sigma"], npix=settings["npix"],
                            pixel_scale=settings["pixel_scale"], psf_sigma=settings["psf_sigma"],
                            source=settings["source"], galaxies=galaxies.get(key))
        chosen = saved["evidence_correction"]
        model = build_model(obs, source="vae", source_correction=PixelCorrection(
            **{**chosen, "sigma": args.sigmas[0]}))
        at_max = {**saved["released"], **saved["evidence_max"]}
        lens = model.lens_sites
        curves = {str(s): [] for s in args.sigmas}
        for t in ts:
            values = {k: model.tensor(v) for k, v in at_max.items()}
            for k in lens:
                truth = float(obs.truth[k])
                values[k] = model.tensor(truth + t * (float(at_max[k]) - truth))
            ev = correction_evidence(model, values, sigmas=args.sigmas)
            for s in args.sigmas:
                curves[str(s)].append(round(ev.by_sigma[s], 1))
        print(json.dumps(dict(
            seed=seed, regularisation=chosen["regularisation"], frame=chosen["frame"],
            chosen_sigma=chosen["sigma"], t=ts,
            by_sigma={s: dict(log_evidence=v, t_peak=None if (p := parabola_peak(ts, v)) is None
                              else round(p, 2)) for s, v in curves.items()})), flush=True)


if __name__ == "__main__":
    main()

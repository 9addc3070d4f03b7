"""Where the evidence gained by the search on the marginal comes from (issue 7, section 3f).

    python validation/evidence_terms.py DIR --seeds 0 1 2 3 [--source-correction 0.1]

Reads the site values that ``validation/from_truth.py --maximise-evidence --save DIR`` kept
for each seed (the joint mode ``released`` and the evidence maximum ``evidence_max``), rebuilds
the same mock and model (apodised held-out galaxy, 256 x 256 at 0.04", PSF 0.05", noise 0.1,
the correction on 64 x 64) and prints one JSON line per seed with, at both points, the terms
of the log evidence (:func:`difflens.infer.evidence.correction_evidence`):

    log p(d, theta) = log p(d, theta, w*) + n^2/2 log 2 pi - 1/2 log det A,

the joint log posterior at the correction's posterior mean ``w*`` (the fit and every prior),
the Occam factor ``-1/2 log det A``, the number of correction values the data constrain, and
the source stamp's half-width ``src_s`` (arcsec), which sets the size of the correction's
pixels on the sky.
"""
import argparse
import json
from pathlib import Path

import torch

from difflens.datasets.mocks import held_out_galaxies, simulate_mock
from difflens.fitting import build_model
from difflens.infer.evidence import correction_evidence
from difflens.infer.map import summarise_map
from difflens.sources.correction import PixelCorrection


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saved", help="the --save DIR of from_truth.py")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    ap.add_argument("--source-correction", type=float, default=0.1, metavar="SIGMA")
    args = ap.parse_args(argv)
    galaxies = held_out_galaxies(args.cosmos_root, apodise=True)[0]
    correction = PixelCorrection(args.source_correction, 64)
    for seed in args.seeds:
        saved = torch.load(Path(args.saved) / f"seed{seed}.pt")
        obs = simulate_mock(seed, noise_sigma=0.1, npix=256, pixel_scale=0.04, psf_sigma=0.05,
                            source="galaxy", galaxies=galaxies)
        model = build_model(obs, source="vae", source_correction=correction)
        # sites held during the search (--evidence-hold) keep their joint-mode values
        at_max = {**saved["released"], **saved["evidence_max"]}
        print(json.dumps(dict(seed=seed, released=terms(model, saved["released"]),
                              evidence_max=terms(model, at_max))), flush=True)


if __name__ == "__main__":
    main()

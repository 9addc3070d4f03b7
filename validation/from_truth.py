"""Is the truth the posterior mode?  Fit mocks starting from their true lens (issue 7, section 3).

    python validation/from_truth.py --source galaxy --seeds 0 7 11 16 18

Each mock is the one ``validation/coverage.py`` fits for that seed (256x256 at 0.04", PSF
0.05", noise 0.1 unless told otherwise).  The MAP search starts at the true lens parameters and
true source placement (``fit_lens(init=truth, restarts=1, encode_source=False)``), so it can only
move away from the truth if the posterior prefers another lens.  Compare its log posterior with
the study's MAP for the same seed (``records.json``): a higher value here means the search
missed; the same or lower, with the truth left behind, means the model's mode itself is off
(e.g. a source model that cannot draw the galaxy).  Prints one JSON line per seed: reduced
chi^2, log posterior and the relative errors (%) of r_ein, gamma, q and theta_E = sqrt(q) r_ein.
"""
import argparse
import json
import math

import torch

from difflens.datasets.mocks import held_out_galaxies, simulate_mock
from difflens.fitting import fit_lens
from difflens.model import q_phi_to_ellipticity


def truth_start(truth):
    """The mock's true lens and source placement as site values for ``fit_lens(init=)``."""
    e1, e2 = q_phi_to_ellipticity(torch.tensor(truth["q"]), torch.tensor(truth["phi"]))
    values = {k: truth[k] for k in ("r_ein", "gamma", "x0", "y0", "g1", "g2", "src_x0", "src_y0",
                                    "src_s")}
    values.update(e1=float(e1), e2=float(e2))
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--source", choices=("vae", "galaxy"), default="galaxy")
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    ap.add_argument("--apodise", action="store_true",
                    help="taper the real galaxies to zero at their stamp edge (as coverage.py)")
    ap.add_argument("--npix", type=int, default=256)
    ap.add_argument("--pixel-scale", type=float, default=0.04)
    ap.add_argument("--psf-sigma", type=float, default=0.05)
    ap.add_argument("--noise-sigma", type=float, default=0.1)
    args = ap.parse_args(argv)
    galaxies = held_out_galaxies(args.cosmos_root, apodise=args.apodise)[0] if args.source == "galaxy" else None
    for seed in args.seeds:
        obs = simulate_mock(seed, noise_sigma=args.noise_sigma, npix=args.npix,
                            pixel_scale=args.pixel_scale, psf_sigma=args.psf_sigma,
                            source=args.source, galaxies=galaxies)
        t = obs.truth
        fit = fit_lens(obs, source="vae", init=truth_start(t), restarts=1,
                       encode_source=False, seed=0, progress=False)
        lens = fit.map.lens()
        err = {k: round(100 * (lens[k] - t[k]) / t[k], 2) for k in ("r_ein", "gamma", "q")}
        err["theta_E"] = round(100 * (math.sqrt(lens["q"]) * lens["r_ein"]
                                      / (math.sqrt(t["q"]) * t["r_ein"]) - 1), 2)
        print(json.dumps(dict(seed=seed, reduced_chi2=round(fit.map.reduced_chi2, 4),
                              log_posterior=round(fit.map.log_posterior, 1),
                              error_percent=err)), flush=True)


if __name__ == "__main__":
    main()

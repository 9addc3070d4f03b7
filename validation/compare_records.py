"""Two runs of ``coverage.py`` on the same seeds, lens by lens (issue 7).

    python validation/compare_records.py validation/results/laplace_medium_galaxy.json \
        validation/results/apod_medium_galaxy.json [--names square apodised]

Both files are ``records.json`` of ``validation/coverage.py`` (MAP-only or sampled).  The mocks of
one seed share the lens and the noise, so differences between the runs are paired: prints, per
seed, the MAP's relative errors (%) of r_ein, theta_E = sqrt(q) r_ein, gamma and q, the reduced
chi^2 of each run and the difference of their log posteriors (b - a: positive where run b found
the higher mode of the same posterior -- when both fitted the same mock with the same model),
then the median |error| of each run over the seeds they share.
"""
import argparse
import json
import math

import numpy as np

KEYS = ("r_ein", "theta_E", "gamma", "q")


def map_errors(record):
    """Relative MAP errors (%) of one record: r_ein, theta_E, gamma, q."""
    p = record["params"]
    out = {k: 100 * (p[k]["map"] / p[k]["truth"] - 1) for k in ("r_ein", "gamma", "q")}
    theta = p["r_ein"]["map"] * math.sqrt(p["q"]["map"])
    truth = p["r_ein"]["truth"] * math.sqrt(p["q"]["truth"])
    out["theta_E"] = 100 * (theta / truth - 1)
    return out


def compare(a, b):
    """Paired errors of the seeds in both record lists -> (rows, medians).

    ``rows``: (seed, galaxy, errors of a, errors of b, chi2 a, chi2 b, log posterior b - a);
    ``medians``: for each run, median |error| (%) per key over those seeds.

    Examples
    --------
    >>> rec = lambda s, r: dict(seed=s, galaxy=0, reduced_chi2=1.0, log_posterior=0.0, params=dict(
    ...     r_ein=dict(truth=1.0, map=r), gamma=dict(truth=2.0, map=2.0), q=dict(truth=1.0, map=1.0)))
    >>> rows, med = compare([rec(0, 1.02), rec(1, 0.99)], [rec(1, 1.0)])
    >>> [row[0] for row in rows], round(med[0]["r_ein"], 6), med[1]["r_ein"]
    ([1], 1.0, 0.0)
    """
    by_seed = {r["seed"]: r for r in b}
    rows = [(r["seed"], r.get("galaxy"), map_errors(r), map_errors(by_seed[r["seed"]]),
             r["reduced_chi2"], by_seed[r["seed"]]["reduced_chi2"],
             by_seed[r["seed"]]["log_posterior"] - r["log_posterior"])
            for r in sorted(a, key=lambda r: r["seed"]) if r["seed"] in by_seed]
    medians = [{k: float(np.median([abs(row[i][k]) for row in rows])) for k in KEYS}
               for i in (2, 3)]
    return rows, medians


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--names", nargs=2, default=("a", "b"))
    args = ap.parse_args(argv)
    a, b = (json.load(open(path)) for path in (args.a, args.b))
    rows, medians = compare(a, b)
    if not rows:
        raise SystemExit("the two record files share no seed")
    na, nb = args.names
    print(f"{'seed':>4} {'gal':>3}  " + "  ".join(f"{k + ' ' + n:>16}" for k in KEYS
                                                     for n in (na, nb)) + f"  chi2 {na}/{nb}  dlogP")
    for seed, gal, ea, eb, ca, cb, dlp in rows:
        print(f"{seed:>4} {gal if gal is not None else '-':>3}  "
              + "  ".join(f"{e[k]:>16.2f}" for k in KEYS for e in (ea, eb))
              + f"  {ca:.3f}/{cb:.3f}  {dlp:+.1f}")
    print(f"median |error| % over {len(rows)} seeds:")
    for name, med in zip((na, nb), medians):
        print(f"  {name:>10}: " + ", ".join(f"{k} {med[k]:.2f}" for k in KEYS))


if __name__ == "__main__":
    main()

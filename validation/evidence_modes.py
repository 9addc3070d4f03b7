"""The joint mode next to the truth against the evidence maximum reached from it (issue 7).

    python validation/evidence_modes.py validation/results/evidence_max_seeds0-7.jsonl \
        [--out docs/figures/evidence_max_errors.png]

Reads the JSON lines of ``validation/from_truth.py --maximise-evidence``: per seed, the relative
errors (%) of r_ein, gamma and theta_E = sqrt(q) r_ein at the joint MAP released from the truth
and at the maximum of the evidence (the correction integrated out) that
:func:`difflens.infer.evidence.maximise_evidence` reached from it, with the evidence gained.
Prints the table, the median |error| and the median signed error of each, and draws one panel
per parameter (the error at both points, lens by lens).  Records made with ``--laplace`` also
give the coverage of the truth by the Laplace posterior (the correction integrated out) at both
points: per lens parameter, how many truths lie inside the central 68% and 95% intervals, and
the median |z| (posterior mean minus truth over the posterior sd).
"""
import argparse
import json

import numpy as np

KEYS = ("r_ein", "gamma", "theta_E")
COVERED = ("r_ein", "gamma", "q", "phi", "g1", "g2", "theta_E")


def pairs(records):
    """(seed, errors at the joint mode, errors at the evidence maximum, gain) per record that
    has both; errors as dicts over :data:`KEYS`.

    Examples
    --------
    >>> r = dict(seed=3, error_percent=dict(r_ein=1.0, gamma=-2.0, theta_E=0.5),
    ...          evidence_max=dict(error_percent=dict(r_ein=0.5, gamma=1.0, theta_E=0.1),
    ...                            gain=12.0))
    >>> [(seed, best["gamma"], gain) for seed, _, best, gain in pairs([r, dict(seed=4)])]
    [(3, 1.0, 12.0)]
    """
    out = []
    for r in records:
        if "evidence_max" not in r:
            continue
        joint = {k: r["error_percent"][k] for k in KEYS}
        best = {k: r["evidence_max"]["error_percent"][k] for k in KEYS}
        out.append((r["seed"], joint, best, r["evidence_max"]["gain"]))
    return sorted(out, key=lambda p: p[0])


def medians(rows, signed=False):
    """Median |error| (%) per key at the joint mode and at the evidence maximum; with
    ``signed`` the median of the signed errors (the systematic part).

    Examples
    --------
    >>> e = lambda x: dict(r_ein=x, gamma=-x, theta_E=x / 2)
    >>> rows = [(0, e(1.0), e(3.0), 1.0), (1, e(-2.0), e(0.0), 1.0), (2, e(4.0), e(1.0), 1.0)]
    >>> medians(rows)
    ({'r_ein': 2.0, 'gamma': 2.0, 'theta_E': 1.0}, {'r_ein': 1.0, 'gamma': 1.0, 'theta_E': 0.5})
    >>> medians(rows, signed=True)[0]
    {'r_ein': 1.0, 'gamma': -1.0, 'theta_E': 0.5}
    """
    size = (lambda x: x) if signed else abs
    return tuple({k: float(np.median([size(row[i][k]) for row in rows])) for k in KEYS}
                 for i in (1, 2))


def coverage(records):
    """Laplace coverage at the joint mode (``record["laplace"]``) and at the evidence maximum
    (``record["evidence_max"]["laplace"]``): ``{point: {parameter: (n inside 68%, n inside
    95%, n, median |z|)}}`` over the records that have it.

    Examples
    --------
    >>> lap = lambda z: {k: dict(z=z, in68=abs(z) < 1, in95=abs(z) < 2) for k in COVERED}
    >>> rs = [dict(laplace=lap(0.5), evidence_max=dict(laplace=lap(3.0))),
    ...       dict(laplace=lap(-1.5)), dict(seed=2)]
    >>> out = coverage(rs)
    >>> out["joint mode"]["gamma"], out["evidence maximum"]["r_ein"]
    ((1, 2, 2, 1.0), (0, 0, 1, 3.0))
    """
    points = {"joint mode": lambda r: r.get("laplace"),
              "evidence maximum": lambda r: r.get("evidence_max", {}).get("laplace")}
    out = {}
    for point, get in points.items():
        found = [get(r) for r in records if get(r)]
        if found:
            out[point] = {k: (sum(f[k]["in68"] for f in found), sum(f[k]["in95"] for f in found),
                              len(found), float(np.median([abs(f[k]["z"]) for f in found])))
                          for k in COVERED}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", help="JSON-lines files of from_truth.py")
    ap.add_argument("--out", help="write the figure here (PNG)")
    args = ap.parse_args(argv)
    records = [json.loads(line) for path in args.records for line in open(path) if line.strip()]
    rows = pairs(records)
    if not rows:
        ap.error("no record with an 'evidence_max' entry (from_truth.py --maximise-evidence)")
    print("seed | joint: r_ein / gamma / theta_E (%) | evidence max: r_ein / gamma / theta_E (%)"
          " | evidence gained (nats)")
    for seed, joint, best, gain in rows:
        print(f"{seed} | " + " / ".join(f"{joint[k]:+.2f}" for k in KEYS) + " | "
              + " / ".join(f"{best[k]:+.2f}" for k in KEYS) + f" | {gain:.1f}")
    at_joint, at_best = medians(rows)
    print("median |error| | " + " / ".join(f"{at_joint[k]:.2f}" for k in KEYS) + " | "
          + " / ".join(f"{at_best[k]:.2f}" for k in KEYS))
    signed = medians(rows, signed=True)
    print("median error | " + " / ".join(f"{signed[0][k]:+.2f}" for k in KEYS) + " | "
          + " / ".join(f"{signed[1][k]:+.2f}" for k in KEYS))
    for point, table in coverage(records).items():
        print(f"Laplace coverage at the {point} (inside 68% / 95% of n; median |z|): "
              + ", ".join(f"{k} {a}/{b} of {n} ({z:.1f})" for k, (a, b, n, z) in table.items()))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.6), sharey=False)
        x = np.arange(len(rows))
        for ax, k in zip(axes, KEYS):
            a = [row[1][k] for row in rows]
            b = [row[2][k] for row in rows]
            for xi, ai, bi in zip(x, a, b):
                ax.annotate("", xy=(xi, bi), xytext=(xi, ai),
                            arrowprops=dict(arrowstyle="->", color="0.6"))
            ax.plot(x, a, "o", color="C0", label="joint MAP (w maximised)")
            ax.plot(x, b, "s", color="C3", label="evidence maximum (w integrated out)")
            ax.axhspan(-1, 1, color="0.9", zorder=0)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(x, [str(row[0]) for row in rows])
            ax.set_xlabel("mock seed")
            ax.set_ylabel(f"{k} error (%)")
            ax.set_title(f"{k}: median |error| {at_joint[k]:.2f}% -> {at_best[k]:.2f}%, "
                         f"signed {signed[0][k]:+.2f}% -> {signed[1][k]:+.2f}%", fontsize=8)
        axes[0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

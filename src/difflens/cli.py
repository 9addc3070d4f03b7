"""Command line: ``difflens <command>`` (also ``python -m difflens``).

Thin by design: parse arguments, call the public API, write files.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_lens_figure(args):
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    from .plots import plot_lens_system
    from .simulate import Simulator
    from .sources import Sersic

    sim = Simulator(npix=args.npix, pixel_scale=args.pixel_scale, psf_sigma=args.psf_sigma)
    lens = dict(r_ein=args.r_ein, q=args.q, phi=args.phi, gamma=args.gamma, x0=0.0, y0=0.0,
                g1=args.g1, g2=args.g2)
    source = Sersic(amp=1.0, r_e=0.25, n=1.5, q=0.8, phi=1.0, x0=0.1, y0=0.05)
    fig = plot_lens_system(sim, lens, source, source_extent=1.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lens-figure", help="plot a lensed Sersic source with critical curves")
    p.add_argument("--out", default="lens_system.png")
    p.add_argument("--npix", type=int, default=256)
    p.add_argument("--pixel-scale", type=float, default=0.04, help="arcsec per pixel")
    p.add_argument("--psf-sigma", type=float, default=0.05, help="arcsec")
    for name, default in (("r-ein", 1.2), ("q", 0.75), ("phi", 0.5), ("gamma", 2.1),
                          ("g1", 0.03), ("g2", -0.02)):
        p.add_argument(f"--{name}", type=float, default=default)
    p.set_defaults(func=_cmd_lens_figure)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"difflens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Simulate a lensed Sersic source and draw the critical curves and caustics.

    python examples/simulate_lens.py [--out examples/output/lens_system.png]

Lens: SPLE (r_ein = 1.2", q = 0.75, phi = 0.5 rad, gamma = 2.1) + external shear
(g1 = 0.03, g2 = -0.02); source: elliptical Sersic near the caustic; 256 x 256 pixels at 0.04",
Gaussian PSF of 0.05", noise sigma 0.1 (the paper's medium S/N).
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from difflens.instrument import add_noise, signal_to_noise  # noqa: E402
from difflens.plots import plot_lens_system  # noqa: E402
from difflens.simulate import Simulator  # noqa: E402
from difflens.sources import Sersic  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/output/lens_system.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    sim = Simulator(npix=256, pixel_scale=0.04, psf_sigma=0.05)
    lens = dict(r_ein=1.2, q=0.75, phi=0.5, gamma=2.1, x0=0.05, y0=-0.03, g1=0.03, g2=-0.02)
    source = Sersic(amp=1.0, r_e=0.25, n=1.5, q=0.8, phi=1.0, x0=0.1, y0=0.05)
    observed = add_noise(sim.image(lens, source), 0.1,
                         generator=torch.Generator().manual_seed(args.seed))
    print(f"S/N (eqs. 24-25) at noise sigma 0.1: {float(signal_to_noise(observed, 0.1, 0.04)):.0f}")
    fig = plot_lens_system(sim, lens, source, source_extent=1.0,
                           title="SPLE + shear lensing a Sersic source")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

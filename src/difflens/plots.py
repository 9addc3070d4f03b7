"""Figures: a lens system at a glance (source + caustics, image + critical curves)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .instrument import pixel_grid
from .lensing import critical_curves_and_caustics, magnification
from .simulate import deflection


def plot_lens_system(sim, lens: dict, source, *, source_extent=None, image_extent=None,
                     title=None):
    """Three panels: the source with caustics, the noiseless lensed image with critical curves,
    and the log-magnification map.

    Parameters
    ----------
    sim : difflens.simulate.Simulator
        Defines the image grid and PSF.
    lens : dict
        One lens (floats or 0-d tensors), see :data:`difflens.simulate.LENS_PARAMS`.
    source : callable
        A source, e.g. :class:`difflens.sources.Sersic`.
    source_extent : float, optional
        Half-width of the source-plane panel, arcsec (default: half the field).
    image_extent : float, optional
        Half-width of the image-plane panels, arcsec (default: 2 r_ein, at most the field).

    Returns
    -------
    matplotlib.figure.Figure
    """
    dtype = sim.x.dtype
    field = sim.extent[1]

    def one_lens(x, y):
        return deflection(x, y, lens, method=sim.deflection_method)

    crit, caus = critical_curves_and_caustics(one_lens, extent=field, n=400, dtype=dtype)
    half = source_extent or field / 2
    zoom = image_extent or min(field, 2.0 * float(lens["r_ein"]))
    sx, sy = pixel_grid(256, 2 * half / 256, dtype=dtype)
    with torch.no_grad():
        src_img = source(sx[None], sy[None])[0]
        img = sim.image(lens, source)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
    im = axes[0].imshow(src_img.cpu().numpy(), origin="lower", extent=(-half, half, -half, half),
                        cmap="magma")
    for c in caus:
        axes[0].plot(c[:, 0], c[:, 1], color="cyan", lw=1)
    axes[0].set(xlim=(-half, half), ylim=(-half, half), title="source plane + caustics",
                xlabel=r"$\beta_x$ [arcsec]", ylabel=r"$\beta_y$ [arcsec]")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    im = axes[1].imshow(img.cpu().numpy(), origin="lower", extent=sim.extent, cmap="magma")
    for c in crit:
        axes[1].plot(c[:, 0], c[:, 1], color="cyan", lw=1)
    axes[1].set(xlim=(-zoom, zoom), ylim=(-zoom, zoom),
                title="lensed image (PSF) + critical curves", xlabel=r"$\theta_x$ [arcsec]",
                ylabel=r"$\theta_y$ [arcsec]")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    gx, gy = pixel_grid(200, 2 * zoom / 200, dtype=dtype)
    mu = magnification(one_lens, gx, gy).abs().clamp_min(1e-3).log10()
    im = axes[2].imshow(mu.cpu().numpy(), origin="lower", extent=(-zoom, zoom, -zoom, zoom),
                        cmap="viridis",
                        vmin=-1, vmax=2)
    axes[2].set(xlim=(-zoom, zoom), ylim=(-zoom, zoom), title=r"$\log_{10}|\mu|$",
                xlabel=r"$\theta_x$ [arcsec]")
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig

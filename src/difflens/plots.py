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

    Examples
    --------
    >>> from difflens.simulate import Simulator
    >>> from difflens.sources import Sersic
    >>> lens = dict(r_ein=1.2, q=0.75, phi=0.5, gamma=2.1, x0=0.0, y0=0.0, g1=0.03, g2=-0.02)
    >>> source = Sersic(amp=1.0, r_e=0.2, n=1.0)
    >>> fig = plot_lens_system(Simulator(npix=64, pixel_scale=0.08), lens, source)
    >>> len(fig.axes) >= 3
    True
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


def plot_fit(observation, result, *, true_source=None, title=None):
    """The paper's Fig. 6 panel: observed, model, normalised residual, true and fitted source,
    source residual (normalised by 10% of the true source maximum, as in the paper).  With lens
    light, the data and the model with the fitted lens light subtracted are shown too.

    Parameters
    ----------
    observation : difflens.datasets.observation.Observation
    result : difflens.infer.MAPResult
    true_source : ndarray (64, 64), optional
        True source stamp times its amplitude, on the same stamp grid as the fit (mocks).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_fit(obs, fit.map)                            # doctest: +SKIP
    >>> fig.savefig("fit.png")                                  # doctest: +SKIP
    """
    import numpy as np

    data = observation.image
    model = result.model_image.cpu().numpy()
    vmax = max(np.nanmax(data), model.max())
    ny, nx = observation.shape
    ext = (-nx * observation.pixel_scale / 2, nx * observation.pixel_scale / 2,
           -ny * observation.pixel_scale / 2, ny * observation.pixel_scale / 2)
    light = dict(vmin=0, vmax=vmax, cmap="magma")
    panels = [(data, "observed", light), (model, "model", light)]
    if getattr(result, "lens_light_image", None) is not None:
        # real data: show the arcs, i.e. data and model with the fitted lens light subtracted
        lens_light = result.lens_light_image.cpu().numpy()
        arcs = dict(vmin=0, vmax=max(np.nanmax(model - lens_light), 1e-30), cmap="magma")
        panels += [(data - lens_light, "data - lens light", arcs),
                   (model - lens_light, "lensed source model", arcs)]
    panels += [(result.normalised_residuals.cpu().numpy(),
               rf"(data - model) / $\sigma$, $\chi^2_\nu$ = {result.reduced_chi2:.3f}",
               dict(vmin=-4, vmax=4, cmap="coolwarm"))]
    fitted = result.source_image.cpu().numpy() if result.source_image is not None else None
    if true_source is not None and fitted is not None:
        src = dict(vmin=0, vmax=max(true_source.max(), fitted.max()), cmap="magma")
        panels += [(true_source, "true source", src), (fitted, "fitted source", src),
                   ((true_source - fitted) / (0.1 * true_source.max()),
                    "source residual / 10% of max", dict(vmin=-2, vmax=2, cmap="coolwarm"))]
    elif fitted is not None:
        panels.append((fitted, "fitted source (stamp)", dict(cmap="magma")))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4),
                             constrained_layout=True)
    for ax, (img, label, kw) in zip(axes, panels):
        im = ax.imshow(img, origin="lower", extent=ext if img.shape == data.shape else None, **kw)
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.75)
    if title:
        fig.suptitle(title)
    return fig


def plot_corner(posterior, names=("r_ein", "q", "phi", "gamma"), truths=None):
    """Corner plot of posterior samples (the paper's Figs. 8-9) with truths marked.

    Parameters
    ----------
    posterior : difflens.infer.Posterior
    names : parameters to show; those held fixed in the fit (every draw equal, e.g. ``gamma``
        of an SIE fit) are left out, since they have no distribution to draw
    truths : dict, optional
        True values by name.

    Examples
    --------
    >>> fig = plot_corner(fit.posterior, truths=obs.truth)      # doctest: +SKIP
    >>> fig.savefig("corner.png")                               # doctest: +SKIP
    """
    import corner
    import numpy as np

    draws = {k: posterior.idata.posterior[k].values.reshape(-1) for k in names}
    names = [k for k in names if np.ptp(draws[k]) > 0]
    if not names:
        raise ValueError("plot_corner: every parameter asked for was held fixed (no spread "
                         "in the draws); nothing to plot")
    samples = np.stack([draws[k] for k in names], axis=1)
    labels = {"r_ein": r"$r_{\rm Ein}$ ['']", "q": "$q$", "phi": r"$\phi$ [rad]",
              "gamma": r"$\gamma$", "x0": "$x_0$ ['']", "y0": "$y_0$ ['']", "g1": r"$g_1$",
              "g2": r"$g_2$"}
    t = [truths.get(k) for k in names] if truths else None
    # density contours need a few hundred draws; short (demo) chains get points only
    return corner.corner(samples, labels=[labels.get(k, k) for k in names], truths=t,
                         quantiles=[0.16, 0.5, 0.84], show_titles=True, title_fmt=".4f",
                         plot_contours=len(samples) >= 300, plot_density=len(samples) >= 300)


def plot_trace(posterior, names=("theta_E", "r_ein", "q", "phi", "gamma", "g1", "g2")):
    """Trace of every chain, one row per parameter, with R-hat and bulk ESS in the titles.

    The picture of mixing that R-hat summarises: chains that wander slowly, or sit in different
    places, show it at a glance.  Left: each chain's draws against iteration (one colour per
    chain).  Right: each chain's histogram; converged chains draw the same one.

    Parameters
    ----------
    posterior : difflens.infer.Posterior
    names : parameters to show (arcsec for ``theta_E``, ``r_ein``; radians for ``phi``); those
        absent from the draws or held fixed (no spread) are left out.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_trace(fit.posterior)                          # doctest: +SKIP
    >>> fig.savefig("trace.png")                                 # doctest: +SKIP
    """
    import arviz as az
    import numpy as np

    draws = posterior.idata.posterior
    names = [k for k in names if k in draws and np.ptp(draws[k].values) > 0]
    if not names:
        raise ValueError("plot_trace: none of the parameters asked for was sampled (absent, "
                         "or held fixed with no spread in the draws)")
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 1.7 * len(names) + 0.6),
                             gridspec_kw=dict(width_ratios=(4, 1)), squeeze=False,
                             constrained_layout=True)
    for (left, right), k in zip(axes, names):
        x = draws[k].values                                        # (chains, draws)
        bins = np.linspace(x.min(), x.max(), 31)
        for c, chain in enumerate(x):
            left.plot(chain, lw=0.5, color=f"C{c % 10}")
            right.hist(chain, bins=bins, histtype="step", color=f"C{c % 10}",
                       orientation="horizontal")
        # the sampler's diagnostics where it computed them (lens parameters), else here
        if k in posterior.rhat:
            rhat, ess = posterior.rhat[k], posterior.ess[k]
        else:
            rhat, ess = (float(az.rhat(x)) if x.shape[0] > 1 else None), float(az.ess(x))
        rhat = "n/a (one chain)" if x.shape[0] == 1 else f"{rhat:.3f}"
        left.set_title(f"{k}: mean {x.mean():.4g} +- {x.std():.2g}, R-hat {rhat}, "
                       f"bulk ESS {ess:.0f} of {x.size}", fontsize=9, loc="left")
        left.set_xlim(0, x.shape[1] - 1)
        right.set_yticks([])
    axes[-1, 0].set_xlabel("draw (after warm-up)")
    return fig


def plot_umbrella_profile(umbrella, quantity="theta_E", bins=30):
    """Umbrella sampling at a glance: the posterior's profile along the restrained coordinate
    and how ``quantity`` varies along it.

    Left: ``-log p(xi)`` (nats) from the MBAR-weighted draws, with each window's centre and its
    chain's mean.  Right: ``quantity`` (arcsec for ``theta_E``) against the coordinate, every
    window's draws in its own colour: where the posterior's weight along the coordinate moves
    the quantity's mean.

    Parameters
    ----------
    umbrella : difflens.infer.umbrella.Umbrella
    quantity : str
        A parameter in the windows' draws.
    bins : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    import numpy as np

    centre, energy = umbrella.profile(bins)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(centre, energy, "k.-")
    for c, m in zip(umbrella.centres, [umbrella.xi[umbrella.window == j].mean()
                                       for j in range(len(umbrella.centres))]):
        a.axvline(c, color="0.85", lw=0.8, zorder=0)
        a.plot(m, 0, "v", color="C1", ms=5)
    a.set_xlabel(umbrella.coordinate)
    a.set_ylabel(f"-log p({umbrella.coordinate}) [nats]")
    a.set_title("posterior profile (MBAR); triangles: window means")
    y = umbrella.windows.idata.posterior[quantity].values
    for c in range(umbrella.xi.shape[0]):
        b.plot(umbrella.xi[c], y[c], ".", ms=1.5, alpha=0.4, color=f"C{umbrella.window[c] % 10}")
    b.set_xlabel(umbrella.coordinate)
    b.set_ylabel(quantity)
    w = np.exp(umbrella.log_weights)
    b.set_title(f"{quantity}: weighted mean {np.sum(w * y):.4f} +- {umbrella.theta_E_se:.4f} (se)"
                if quantity == "theta_E" else quantity)
    fig.tight_layout()
    return fig

"""Starting points for MAP fits, read off the data.

A lens fit started blindly from prior draws rarely finds the right basin: the source can explain
light anywhere only if the Einstein radius and centre are roughly right.  Two cases:

* **Lens light already subtracted** (mocks, the paper's setting): the light-weighted centroid of
  the significant pixels estimates the lens centre and their light-weighted mean distance from it
  the Einstein radius (exact for a ring around a round lens) -- :func:`initial_guess`.
* **Lens light present** (real data): first the lens-light Sersic components alone are fitted to
  the image (:func:`fit_lens_light`, refitted without the arcs it finds), their centre becomes the
  lens centre, and the Einstein radius is the significance-weighted median radius of what the
  light model leaves behind (the arcs), ignoring the core where the light model is least exact --
  :func:`initialise`.  The joint fit then starts from both.
"""
from __future__ import annotations

import math

import torch

from ..instrument import convolve, pixel_grid
from ..model import LensModel, ellipticity_to_q_phi, q_phi_to_ellipticity
from ..sources import Sersic


def _grid(model: LensModel):
    sim, data = model.simulator, model.data
    return pixel_grid(sim.npix, sim.pixel_scale, dtype=data.dtype, device=data.device)


def _used(model: LensModel):
    data = model.data
    return model.mask if model.mask is not None else torch.ones_like(data, dtype=torch.bool)


def initial_guess(model: LensModel, threshold=3.0, data=None) -> dict:
    """Lens centre and Einstein radius from significant pixels (lens light absent).

    The light-weighted centroid of pixels brighter than ``threshold`` sigma estimates (x0, y0); their
    light-weighted mean distance from it estimates r_ein, their median brightness the source
    amplitude.  ``data`` replaces the model's data (e.g. with lens light subtracted).  Returns site
    values in arcsec and image units ({} if nothing is significant).

    Examples
    --------
    >>> guess = initial_guess(model)        # {'x0', 'y0', 'r_ein', 'src_amp'}   # doctest: +SKIP
    """
    data = model.data if data is None else data
    w = torch.where((data > threshold * model.noise_sigma) & _used(model), data,
                    torch.zeros_like(data))
    if float(w.sum()) <= 0:
        return {}
    x, y = _grid(model)
    total = w.sum()
    cx, cy = (w * x).sum() / total, (w * y).sum() / total
    radius = (w * torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)).sum() / total
    return dict(x0=cx, y0=cy, r_ein=radius, src_amp=data[w > 0].median())


def _peak_position(model: LensModel):
    """Brightest pixel of the PSF-smoothed image among unmasked pixels within the central half of
    the field (lenses sit near the centre of a cutout; bright neighbours further out are ignored)."""
    sim, data = model.simulator, model.data
    x, y = _grid(model)
    smooth = convolve(torch.where(_used(model), data, torch.zeros_like(data)), sim.psf)
    half = 0.25 * min(sim.npix) * sim.pixel_scale
    central = (x.abs() <= half) & (y.abs() <= half) & _used(model)
    i = int(torch.argmax(torch.where(central, smooth, torch.full_like(smooth, -torch.inf))))
    return float(x.reshape(-1)[i]), float(y.reshape(-1)[i])


def fit_lens_light(model: LensModel, steps=300, lbfgs_steps=100, lr=0.05, clip=3.0,
                   robust_scale=5.0):
    """Fit only the lens-light Sersic components to the data (unmasked pixels).

    The loss is robust (Cauchy, ``sum log(1 + (r / robust_scale)^2)`` over normalised residuals
    ``r``), so pixels the light cannot explain -- arcs, neighbours -- do not drag the profile.

    All components share one centre, started at the light peak; component i starts with half-light
    radius ``0.5 * 3**i`` arcsec, n = 4 for the first and 1 for the others, nearly round.  Adam then
    L-BFGS in unconstrained variables (log amplitude, log r_e, logistic n in (0.5, 8), ellipticity
    components).  The fit is done twice: the second time without the pixels the first left more
    than ``clip`` sigma too bright outside the core -- the lensed arcs, which would otherwise
    inflate the light profile.

    Returns
    -------
    values : dict
        ``light{i}_*`` site values and the centre as ``x0, y0`` (arcsec).
    image : Tensor (ny, nx)
        The PSF-convolved lens-light model.

    Examples
    --------
    >>> light = fit_lens_light(build_model(obs, lens_light=2))   # doctest: +SKIP
    """
    n_comp = len(model.priors.lens_light)
    if n_comp == 0:
        raise ValueError("the model has no lens-light components")
    sim, data, sigma = model.simulator, model.data, model.noise_sigma
    x, y = _grid(model)
    cx0, cy0 = _peak_position(model)
    r = torch.sqrt((x - cx0) ** 2 + (y - cy0) ** 2)
    used = _used(model)
    t = lambda v: torch.tensor(float(v), dtype=data.dtype, requires_grad=True)  # noqa: E731
    centre = [t(cx0), t(cy0)]
    comps = []
    for i in range(n_comp):
        r_e, n = 0.5 * 3.0 ** i, 4.0 if i == 0 else 1.0
        ring = used & (torch.abs(r - r_e) < max(sim.pixel_scale, 0.1 * r_e))
        level = float(data[ring].median()) if bool(ring.any()) else float(data.max()) * 0.1
        amp = max(level, 1e-3 * float(data.abs().max())) / n_comp
        comps.append(dict(log_amp=t(math.log(amp)), log_re=t(math.log(r_e)),
                          n_raw=t(math.log(n - 0.5) - math.log(8.0 - n)),
                          e1=t(0.05), e2=t(0.02)))  # off 0, where |e| has no gradient
    params = centre + [v for c in comps for v in c.values()]

    def physical(c):
        q, phi = ellipticity_to_q_phi(c["e1"], c["e2"])
        return dict(amp=c["log_amp"].exp(), r_e=c["log_re"].exp(),
                    n=0.5 + 7.5 * torch.sigmoid(c["n_raw"]), q=q, phi=phi)

    def render():
        lights = [Sersic(x0=centre[0], y0=centre[1], **physical(c)) for c in comps]
        return sim.image(None, None, lights)

    inner = max(3 * sim.pixel_scale, 0.15)
    for _ in range(2):
        def loss_fn():
            resid = torch.where(used, (data - render()) / sigma, torch.zeros_like(data))
            # Cauchy loss: pixels the light cannot explain (arcs, neighbours) count little
            return torch.log1p((resid / robust_scale) ** 2).sum()

        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        if lbfgs_steps:
            lbfgs = torch.optim.LBFGS(params, max_iter=lbfgs_steps, line_search_fn="strong_wolfe")

            def closure():
                lbfgs.zero_grad()
                value = loss_fn()
                value.backward()
                return value

            lbfgs.step(closure)
        with torch.no_grad():
            arcs = ((data - render()) / sigma > clip) & (r > inner)
        used = used & ~arcs
    values = dict(x0=centre[0].detach(), y0=centre[1].detach())
    with torch.no_grad():
        for i, c in enumerate(comps):
            p = physical(c)
            e1, e2 = q_phi_to_ellipticity(p["q"], p["phi"])
            values.update({f"light{i}_amp": p["amp"], f"light{i}_r_e": p["r_e"],
                           f"light{i}_n": p["n"], f"light{i}_e1": e1, f"light{i}_e2": e2})
        image = render()
    return values, image


def arc_radius(model: LensModel, residual, centre, threshold=3.0, inner=None):
    """Einstein-radius estimate from the arcs: the significance-weighted median distance from
    ``centre`` (arcsec) of pixels whose ``residual`` exceeds ``threshold`` sigma, outside ``inner``
    arcsec (default: 3 pixels or 0.15", the larger) where a lens-light model is least exact.

    Returns (radius, median residual of those pixels), or None if fewer than 5 pixels qualify.

    Examples
    --------
    >>> radius, median_residual = arc_radius(model, residual, centre=(0.0, 0.0))   # doctest: +SKIP
    """
    sim = model.simulator
    inner = max(3 * sim.pixel_scale, 0.15) if inner is None else inner
    x, y = _grid(model)
    r = torch.sqrt((x - float(centre[0])) ** 2 + (y - float(centre[1])) ** 2)
    signif = residual / model.noise_sigma
    pick = (signif > threshold) & _used(model) & (r > inner)
    if int(pick.sum()) < 5:
        return None
    rs, ws = r[pick], signif[pick]
    order = torch.argsort(rs)
    cum = torch.cumsum(ws[order], 0)
    return rs[order][int(torch.searchsorted(cum, 0.5 * cum[-1]))], residual[pick].median()


def initialise(model: LensModel, threshold=3.0) -> dict:
    """Data-driven starting values for :func:`difflens.infer.fit_map` (see the module docstring).

    Returns
    -------
    dict
        ``x0, y0, r_ein`` (arcsec) and ``src_amp`` (the arcs' typical brightness, image units) when
        they can be read off, and with lens light the fitted ``light{i}_*`` values; {} when
        nothing in the image is significant.

    Examples
    --------
    >>> from difflens.fitting import build_model
    >>> from difflens.datasets.mocks import simulate_mock
    >>> obs = simulate_mock(3, noise_sigma=0.05, npix=96, pixel_scale=0.08, source="sersic")
    >>> start = initialise(build_model(obs, source="sersic"))
    >>> bool(abs(float(start["r_ein"]) - obs.truth["r_ein"]) < 0.3 * obs.truth["r_ein"])
    True
    """
    if not model.priors.lens_light:
        return initial_guess(model, threshold)
    values, light = fit_lens_light(model)
    centre = (values["x0"], values["y0"])
    arcs = arc_radius(model, model.data - light, centre, threshold)
    if arcs is None:      # no arcs found: a typical galaxy-scale radius and brightness
        arcs = (torch.tensor(1.0, dtype=model.data.dtype), 10 * model.noise_sigma.mean())
    values["r_ein"], values["src_amp"] = arcs
    return values

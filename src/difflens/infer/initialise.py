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

Once a lens is roughly right, the source can be read off the data too
(:func:`source_from_arcs`): every pixel is mapped back to the source plane through the lens
equation, beta = theta - alpha(theta) (eq. 1), and its lens-light-subtracted brightness averaged
into a stamp there; the VAE encoder turns that stamp into a latent start -- amortised
initialisation (paper Sec. 6).
"""
from __future__ import annotations

import math

import pyro
import torch

from ..instrument import convolve, pixel_grid
from ..model import LensModel, ellipticity_to_q_phi, q_phi_to_ellipticity
from ..simulate import Simulator, ray_trace
from ..sources import PixelSource, Sersic


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
                   robust_scale=5.0, starts=((0.5, 4.0), (0.05, 1.0), (1.0, 4.0), (0.5, 1.0))):
    """Fit only the lens-light Sersic components to the data (unmasked pixels).

    The loss is robust (Cauchy, ``sum log(1 + (r / robust_scale)^2)`` over normalised residuals
    ``r``), so pixels the light cannot explain -- arcs, neighbours -- do not drag the profile.

    All components share one centre, started at the light peak; the first component starts at
    each ``(r_e, n)`` of ``starts`` in turn (arcsec, Sersic index), component i > 0 with
    half-light radius ``0.5 * 3**i`` arcsec and n = 1, all nearly round.  Adam then L-BFGS in
    unconstrained variables (log amplitude, log r_e, logistic n in (0.5, 8), ellipticity
    components); an L-BFGS stage that ends worse than it began, or
    whose line search overflows (JWST ring: amplitude -> inf), is undone.  The fit is done
    twice: the second time without the pixels the first left more than ``clip`` sigma too
    bright outside the core -- the lensed arcs, which would otherwise inflate the light
    profile.  Of the starts, the fit with the lowest robust loss over all unmasked pixels is
    kept, its components ordered by half-light radius (component 0 the most compact, as the
    priors of :func:`difflens.model.lens_light_priors` expect).  It runs in float64 whatever
    the model's dtype, on an eager float64 copy of the grid and PSF (a few seconds per start).

    Several starts because one is not reliable: the optimisation is chaotic.  On HST lens 3 of
    docs/real_data_studies.md a 1e-9 change of the noise map (float32 rounding) moved a single start
    from a compact core (n 0.7, r_e 0.055", loss 540.0) to n 7.9, r_e 0.31" (loss 549.5) or
    further, and which starts reach the core changes with such rounding; the joint float32
    MAPs that started from the worse prefits (sessions 14-15) ended ~250 nats below the
    float64 ones.  Of the four default starts three reached the core in each precision.

    Parameters
    ----------
    model : LensModel
        With at least one lens-light component.
    steps, lbfgs_steps : int
        Adam and L-BFGS iterations of each pass.
    lr : float
        Adam's learning rate.
    clip : float
        Residual, in sigma, above which a pixel counts as arc in the second pass.
    robust_scale : float
        Scale of the Cauchy loss, in sigma.
    starts : sequence of (float, float)
        Starting half-light radius (arcsec) and Sersic index of the first component.

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
    if len(model.priors.lens_light) == 0:
        raise ValueError("the model has no lens-light components")
    if not starts:
        raise ValueError("fit_lens_light needs at least one start (r_e, n)")
    f64 = dict(dtype=torch.float64, device=model.data.device)
    model_sim = model.simulator
    sim = Simulator(model_sim.npix, model_sim.pixel_scale, psf=model_sim.psf.to(**f64),
                    supersample=model_sim.supersample, deflection_method="series",
                    **f64)                                   # lens light only: no deflections
    data = model.data.to(**f64)
    sigma = torch.as_tensor(model.noise_sigma).to(**f64)
    used = _used(model)
    peak = _peak_position(model)
    best = None
    for start in starts:
        values, image = _fit_lens_light_from(sim, data, sigma, used, peak,
                                             len(model.priors.lens_light), start, steps,
                                             lbfgs_steps, lr, clip, robust_scale)
        resid = torch.where(used, (data - image) / sigma, torch.zeros_like(data))
        loss = float(torch.log1p((resid / robust_scale) ** 2).sum())
        if best is None or loss < best[0]:
            best = (loss, values, image)
    values = _by_size(best[1], len(model.priors.lens_light))
    dtype = model.data.dtype                      # back to the model's precision
    return {k: v.to(dtype) for k, v in values.items()}, best[2].to(dtype)


def _by_size(values, n_comp):
    """``light{i}_*`` values renumbered by half-light radius, the most compact first (the same
    light: the components are summed)."""
    order = sorted(range(n_comp), key=lambda i: float(values[f"light{i}_r_e"]))
    out = {k: v for k, v in values.items() if not k.startswith("light")}
    for new, old in enumerate(order):
        out.update({f"light{new}_{k}": values[f"light{old}_{k}"]
                    for k in ("amp", "r_e", "n", "e1", "e2")})
    return out


def _fit_lens_light_from(sim, data, sigma, used, peak, n_comp, start, steps, lbfgs_steps, lr,
                         clip, robust_scale):
    """One start of :func:`fit_lens_light` on ``sim``'s grid: the first of ``n_comp``
    components at ``start = (r_e, n)``, the centre at ``peak`` (x, y)."""
    x, y = pixel_grid(sim.npix, sim.pixel_scale, dtype=data.dtype, device=data.device)
    cx0, cy0 = peak
    r = torch.sqrt((x - cx0) ** 2 + (y - cy0) ** 2)
    t = lambda v: torch.tensor(float(v), dtype=data.dtype, device=data.device,  # noqa: E731
                                requires_grad=True)
    centre = [t(cx0), t(cy0)]
    comps = []
    for i in range(n_comp):
        r_e, n = start if i == 0 else (0.5 * 3.0 ** i, 1.0)
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
        lights = [Sersic(x0=centre[0], y0=centre[1], label=f"lens light {i}", **physical(c))
                  for i, c in enumerate(comps)]
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
            with torch.no_grad():
                before, kept = float(loss_fn()), [p.detach().clone() for p in params]
            lbfgs = torch.optim.LBFGS(params, max_iter=lbfgs_steps, line_search_fn="strong_wolfe")

            def closure():
                lbfgs.zero_grad()
                value = loss_fn()
                value.backward()
                return value

            try:
                lbfgs.step(closure)
                with torch.no_grad():
                    after = float(loss_fn())
            except ValueError:       # a trial step overflowed (amplitude exp(log_amp) = inf)
                after = math.inf
            with torch.no_grad():
                if not after <= before:                # worse, or not finite: undo it
                    for p, k in zip(params, kept):
                        p.copy_(k)
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
    return _weighted_median(r[pick], signif[pick]), residual[pick].median()


def _weighted_median(values, weights):
    """The value below which half the (positive) weight lies."""
    order = torch.argsort(values)
    cum = torch.cumsum(weights[order], 0)
    return values[order][int(torch.searchsorted(cum, 0.5 * cum[-1]))]


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
        arcs = (model.tensor(1.0), 10 * model.noise_sigma.mean())
    values["r_ein"], values["src_amp"] = arcs
    return values


def stamp_half_light_radius(stamp):
    """Radius enclosing half the light of a stamp, in units of its half-width (pixel centres at
    u = -1 + (2j + 1) / W, the :func:`difflens.sources.image.sample_image` convention; negative
    pixels count as zero).

    Examples
    --------
    >>> import torch
    >>> r = stamp_half_light_radius(torch.ones(256, 256))   # uniform: pi r^2 / 4 = 1/2
    >>> round(r, 2), round((2 / 3.141592653589793) ** 0.5, 2)
    (0.8, 0.8)
    """
    h, w = stamp.shape[-2:]
    v = -1 + (2 * torch.arange(h, dtype=stamp.dtype, device=stamp.device) + 1) / h
    u = -1 + (2 * torch.arange(w, dtype=stamp.dtype, device=stamp.device) + 1) / w
    r = torch.sqrt(v[:, None] ** 2 + u[None, :] ** 2)
    return float(_weighted_median(r.reshape(-1), stamp.clamp(min=0).reshape(-1)))


def back_project(model: LensModel, values: dict, centre, half_width, size=64, residual=None):
    """The data mapped back to the source plane: a ``size`` x ``size`` stamp spanning
    ``centre`` +- ``half_width`` arcsec (row i along +y, column j along +x).

    Every unmasked pixel's source-plane position beta = theta - alpha(theta) (eq. 1) is computed
    for the lens in ``values`` (site values; others drawn from the prior); each stamp pixel holds
    the inverse-variance weighted mean of the ``residual`` (default: data minus the lens-light
    model at ``values``) of the image pixels landing in it, 0 where none does.  Surface brightness
    is conserved by lensing, so for the right lens this is the source, blurred by the PSF (not
    deconvolved) and sampled where the arcs are.

    Returns
    -------
    stamp : Tensor (size, size), image units
    hits : Tensor (size, size), number of image pixels in each stamp pixel

    Examples
    --------
    >>> stamp, hits = back_project(model, result.sample_sites(), (0.0, 0.0), 1.0)     # doctest: +SKIP
    """
    with torch.no_grad():
        lens = pyro.poutine.condition(model._profiles, data=values)()[0]
        if residual is None:
            light = model.lens_light_image(values)
            residual = model.data - light if light is not None else model.data
        x, y = _grid(model)
        sim = model.simulator
        bx, by = ray_trace(x, y, lens, method=sim.deflection_method, table=sim.table)
        return _binned(model, bx, by, residual, centre, half_width, size)


def _binned(model: LensModel, bx, by, residual, centre, half_width, size):
    """:func:`back_project` for source-plane positions ``bx, by`` (ny, nx) already traced."""
    data = model.data
    step = 2.0 * float(half_width) / size
    j = torch.floor((bx - (float(centre[0]) - float(half_width))) / step).long()
    i = torch.floor((by - (float(centre[1]) - float(half_width))) / step).long()
    keep = _used(model) & (i >= 0) & (i < size) & (j >= 0) & (j < size)
    w = (1.0 / model.noise_sigma ** 2).expand_as(data)[keep]
    index = (i * size + j)[keep]
    flux = torch.zeros(size * size, dtype=data.dtype, device=data.device)
    weight = torch.zeros_like(flux)
    hits = torch.zeros_like(flux)
    flux.index_add_(0, index, w * residual[keep])
    weight.index_add_(0, index, w)
    hits.index_add_(0, index, torch.ones_like(w))
    stamp = torch.where(weight > 0, flux / weight.clamp(min=1e-300), torch.zeros_like(flux))
    return stamp.reshape(size, size), hits.reshape(size, size)


def best_amplitude(model: LensModel, unit, target):
    """The amplitude ``a`` minimising chi^2 of ``target - a * unit`` over the unmasked pixels:
    ``a = sum w t u / sum w u^2`` with ``w = 1 / sigma^2`` (exact: the image is linear in a
    profile's amplitude)."""
    w = 1.0 / model.noise_sigma ** 2
    if model.mask is not None:
        w = w * model.mask
    return (w * target * unit).sum() / (w * unit * unit).sum()


def source_from_arcs(model: LensModel, values: dict, threshold=3.0,
                     widths=(0.7, 1.0, 1.4, 2.0, 2.8, 4.0)) -> dict:
    """Source placement and latent read off the data for the lens in ``values``.

    The significant pixels (> ``threshold`` sigma above the lens light, unmasked) between half
    and twice the Einstein radius from the lens centre -- the arcs, not neighbouring galaxies --
    are mapped to the source plane (eq. 1).  Their light-weighted median position is the source
    centre ``src_x0, src_y0`` (arcsec).  Their light-weighted median distance from it, divided by
    the half-light radius of the latent prior's mean galaxy in its stamp
    (:func:`stamp_half_light_radius`), is a first half-width; since the faint outskirts are not
    significant it is low, so each multiple in ``widths`` of it is tried: the data are
    back-projected onto a stamp of that half-width (:func:`back_project`), normalised to a peak
    of 1 as the VAE's training stamps are, and encoded (encoder mean; the latent prior's mean
    when the model's VAE has no encoder), and the half-width whose decoded source, lensed and
    with its amplitude solved by weighted least squares, leaves the smallest chi^2 is kept.

    Returns
    -------
    dict
        ``src_x0, src_y0, src_s`` (arcsec), ``src_amp`` (image units) and ``z`` (with a zero
        ``src_correction`` where the model has one); {} for a Sersic source or when fewer than
        5 pixels are significant.

    Examples
    --------
    >>> start = source_from_arcs(model, result.sample_sites())          # doctest: +SKIP
    """
    if model.source_kind != "vae":
        return {}
    data, sigma, vae, sim = model.data, model.noise_sigma, model.vae, model.simulator
    with torch.no_grad():
        lens = pyro.poutine.condition(model._profiles, data=values)()[0]
        light = model.lens_light_image(values)
        residual = data - light if light is not None else data
        x, y = _grid(model)
        beta_x, beta_y = ray_trace(x, y, lens, method=sim.deflection_method, table=sim.table)
        radius = torch.sqrt((x - lens["x0"]) ** 2 + (y - lens["y0"]) ** 2)
        theta_e = lens["r_ein"] * torch.sqrt(lens["q"])
        pick = ((residual / sigma > threshold) & _used(model)
                & (radius > 0.5 * theta_e) & (radius < 2.0 * theta_e))
        if int(pick.sum()) < 5:
            return {}
        bx, by, w = beta_x[pick], beta_y[pick], residual[pick]
        cx, cy = _weighted_median(bx, w), _weighted_median(by, w)
        spread = _weighted_median(torch.sqrt((bx - cx) ** 2 + (by - cy) ** 2), w)
        mean_galaxy = vae.decode(model.z_prior.mean[None])[0]
        first = float(spread) / stamp_half_light_radius(mean_galaxy)
        best = None
        for half_width in (first * f for f in widths):
            stamp, _ = _binned(model, beta_x, beta_y, residual, (cx, cy), half_width,
                               mean_galaxy.shape[-1])
            peak = stamp.max()
            if float(peak) <= 0:
                continue
            z = model.z_prior.mean.clone()
            if vae.encoder is not None:
                z = vae.encode((stamp / peak).to(mean_galaxy.dtype)[None])[0][0].to(z.dtype)
            unit = sim.image(lens, PixelSource(vae.decode(z), x0=cx, y0=cy, s=half_width,
                                               amp=1.0))
            amp = best_amplitude(model, unit, residual)
            chi2 = float((((residual - amp * unit) / sigma) ** 2)[_used(model)].sum())
            if float(amp) > 0 and (best is None or chi2 < best[0]):
                best = (chi2, dict(src_x0=cx, src_y0=cy, z=z, src_amp=amp,
                                   src_s=model.tensor(half_width)))
    # a pixel correction of the source (if any) starts at zero: the stamp is the encoded decode
    return {**model.latent_start(), **best[1]} if best else {}

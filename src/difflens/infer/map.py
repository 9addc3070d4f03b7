"""Maximum a posteriori fit with Adam (paper Sec. 5.2), with restarts from prior draws.

The posterior is maximised over all sampled sites, laid out as one flat vector in Pyro's
unconstrained space (:class:`difflens.infer.hmc.FlatSites`; the potential is the negative log
posterior of the parameters, without the Jacobian of that map, so its minimum is the MAP).
Several starting points are rows of one batch: each Adam step is one batched likelihood call (on a
GPU they cost about as much as one).  Schedule: ``restarts`` short runs of
``restart_steps``, each from the lens centre and Einstein radius read off the image
(:func:`difflens.infer.initialise.initialise`, after a lens-light-only fit when there is lens
light; jittered) with the other parameters drawn from the prior and the source
latent at its prior mean (with a flexible source, blind prior draws rarely find the right basin).
With a VAE source one more short run starts from the best restart's lens with the source read off
the data (the arcs mapped back to the source plane and encoded,
:func:`difflens.infer.initialise.source_from_arcs`).  The best of these (the best ``finals``,
as one batch) is continued for up to ``steps`` Adam steps with a learning rate decaying
geometrically from ``lr`` to ``lr * lr_final_fraction``; it stops early once the loss improves by
less than ``tol`` (relative) over ``window`` steps.  Adam's fixed-size steps only approach the
optimum, so the result is polished with L-BFGS (strong Wolfe line search), which is kept only if it
improves the posterior.

A model whose VAE source carries a pixelated correction (:meth:`difflens.model.Priors.
with_source_correction`) is searched the same way, the correction starting at zero in every run.
The correction removes the source-model bias of the mode next to the true lens but makes distant
modes as probable: on 16 validation mocks this search missed that mode on 8 and ended in a
higher, distant one on most of the rest; searching on the VAE source alone first, then switching
the correction on, did worse (docs/validation.md, section 3c).  Start such fits near the lens
(``init``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch

from ..model import LensModel
from ..simulate import LENS_PARAMS
from .initialise import best_amplitude, initialise, source_from_arcs


@dataclass
class MAPResult:
    """Outcome of :func:`fit_map`.

    Attributes
    ----------
    params : dict of str -> Tensor
        Every sampled site (lens ``r_ein, e1, e2, gamma, x0, y0, g1, g2``, or ``theta_E`` in
        place of ``r_ein``; source ``src_*`` and ``z``) plus the derived ``q`` and ``phi``
        (radians) and, where theta_E is sampled, ``r_ein`` (arcsec), at the MAP.
    loss_history : ndarray
        Negative log posterior (up to a constant) per step of the final run.
    model_image : Tensor (ny, nx)
    normalised_residuals : Tensor (ny, nx)
        ``(data - model) / sigma`` (0 where masked).
    source_image : Tensor (64, 64) or None
        The decoded VAE stamp ``amp * d(z)`` at the MAP (VAE sources; with its pixelated
        correction where the model has one).
    lens_light_image : Tensor (ny, nx) or None
        The PSF-convolved lens light at the MAP (models with lens light).
    reduced_chi2 : float
        ``chi^2 / (N_pix - N_params)`` over unmasked pixels (a source correction's pixels,
        held by their prior, are not counted in N_params).
    log_posterior : float
    restart_losses : list of float
        Loss of each restart after its short run.
    seconds : float
        Wall time of the whole fit (restarts included; for :func:`fit_map_batch` that of the
        batch, shared by its lenses).

    Examples
    --------
    >>> result = fit_map(model)                                             # doctest: +SKIP
    >>> result.lens(), result.reduced_chi2, result.normalised_residuals.std()   # doctest: +SKIP
    """

    params: dict
    loss_history: np.ndarray
    model_image: torch.Tensor
    normalised_residuals: torch.Tensor
    source_image: torch.Tensor | None
    reduced_chi2: float
    log_posterior: float
    restart_losses: list = field(default_factory=list)
    fixed: tuple = ()
    lens_light_image: torch.Tensor | None = None
    derived: tuple = ("q", "phi")
    seconds: float = float("nan")

    def lens(self) -> dict:
        """The eight lens parameters as floats (method.md conventions)."""
        return {k: float(self.params[k]) for k in LENS_PARAMS}

    def sample_sites(self) -> dict:
        """Only the sampled sites (for ``init_to_value``)."""
        return {k: v for k, v in self.params.items() if k not in self.derived + self.fixed}


def _restart_values(model: LensModel, guess: dict, generator: torch.Generator,
                    jitter=True) -> dict:
    """A restart point: lens centre (0.15") and Einstein radius (~25%; the arc radius, so r_ein
    or theta_E, whichever is sampled) jittered around the data guess,
    the source centre at the lens centre, lens-light values as guessed; all other sites start
    from prior draws.  Without ``jitter``: the guess itself with a nearly round lens, slope 2,
    no shear and the source behind the lens centre -- the configuration of an Einstein ring,
    which the arcs of most lenses are pieces of."""
    if not guess:
        return {}
    dtype = model.simulator.x.dtype
    n = (lambda: float(torch.randn((), generator=generator, dtype=dtype,
                                           device=generator.device))) if jitter else \
        (lambda: 0.0)  # noqa: E731
    out = {k: v for k, v in guess.items() if k.startswith("light")}
    radius = guess["r_ein"] * math.exp(0.25 * n())
    out.update(x0=guess["x0"] + 0.15 * n(), y0=guess["y0"] + 0.15 * n(), r_ein=radius,
               theta_E=radius)
    if "src_amp" in guess:
        out["src_amp"] = guess["src_amp"] * math.exp(0.5 * n())
    if not jitter:
        # e = 0 exactly is a cusp of q(e1, e2) with zero gradient: start just off it
        out.update(e1=0.03, e2=0.01, gamma=2.0, g1=0.001, g2=0.001)
        if model.source_kind == "sersic":
            out.update(src_r_e=0.2, src_n=1.0, src_e1=0.03, src_e2=0.01)
    priors, sites = model.all_priors(), model.site_names()
    if "src_x0" in priors:
        out.update(src_x0=guess["x0"], src_y0=guess["y0"])
    return {k: _inside(priors[k], model.tensor(v)) for k, v in out.items() if k in sites}


def _support_bounds(prior):
    """(lower, upper) bound of a prior's support, -inf / inf where it has none."""
    support = getattr(prior, "support", None)
    return (float(getattr(support, "lower_bound", -math.inf)),
            float(getattr(support, "upper_bound", math.inf)))


def _inside(prior, value, margin=1e-3):
    """``value`` moved into the interior of ``prior``'s support (a start on its boundary has
    log density -inf): clipped to [low + margin w, high - margin w], w the interval width (or 1)."""
    lo, hi = _support_bounds(prior)
    width = hi - lo if math.isfinite(hi - lo) else 1.0
    if not (math.isfinite(lo) or math.isfinite(hi)):
        return value
    return value.clamp(lo + margin * width if math.isfinite(lo) else None,
                       hi - margin * width if math.isfinite(hi) else None)


def _complete(model: LensModel, values: dict) -> dict:
    """``values`` plus prior draws for every other sampled site, with the source amplitude set to
    its best-fitting value: the predicted image is ``L + amp S`` (L the lens light), linear in the
    amplitude, so ``amp = sum w (d - L) S / sum w S^2`` (w = unmasked / sigma^2) is exact and
    spares the optimiser a search over orders of magnitude in brightness."""
    with torch.no_grad():
        tr = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace()
        full = {name: site["value"].detach() for name, site in tr.nodes.items()
                if site["type"] == "sample" and not site["is_observed"]}
        full.update({k: v for k, v in values.items() if k not in full})
        if "src_amp" not in full:
            return full
        one = torch.ones_like(torch.as_tensor(full["src_amp"]))

        def image(amp):
            cond = pyro.poutine.condition(model, data={**full, "src_amp": amp})
            return pyro.poutine.trace(cond).get_trace().nodes["model_image"]["value"]

        unit = image(2 * one) - image(one)
        rest = image(one) - unit
        amp = best_amplitude(model, unit, model.data - rest)
        lo, hi = _support_bounds(model.all_priors()["src_amp"])
        if torch.isfinite(amp) and max(lo, 0.0) < float(amp) < hi:
            full["src_amp"] = amp.to(one.dtype)
    return full


def fit_map(model: LensModel, *, steps=400, lr=0.03, lr_final_fraction=0.02, restarts=4,
            restart_steps=150, tol=1e-6, window=100, polish_steps=500, init=None,
            data_guess=True, encode_source=True, finals=1, seed=0, progress=True) -> MAPResult:
    """Fit the MAP of ``model``.

    Parameters
    ----------
    model : LensModel
    steps : int
        Maximum Adam steps of the final run; the learning rate decays over them from ``lr`` to
        ``lr * lr_final_fraction``, so they set the schedule (the paper used ~1e4 at a fixed
        rate).  The defaults (150 restart steps, 400 steps, <= 625 L-BFGS evaluations) were
        chosen on 256x256 VAE mocks: the log posterior ends as high as with 2000 Adam steps,
        in 90 s instead of 210 s on a 2-core CPU (``benchmarks/RESULTS.md``).
    lr : float
        Initial learning rate (unconstrained space).
    restarts : int
        Number of prior draws tried for ``restart_steps`` each; 1 with ``init`` given means no
        restarts.
    polish_steps : int
        Maximum L-BFGS iterations after Adam (at most 1.25x as many evaluations; 0 to skip).
    data_guess : bool
        Start restarts near the lens centre and Einstein radius read off the image, after a
        lens-light-only fit when the model has lens light (:func:`difflens.infer.initialise.
        initialise`), jittered; otherwise every restart is a prior draw.
    init : dict, optional
        Site values to start from (e.g. truths, or a previous fit); used as the first restart.
    encode_source : bool
        With a VAE source, one more short run after the restarts: the data mapped back through
        the best restart's lens onto a source stamp, encoded by the VAE encoder for the latent,
        with the source centre and size read off the back-projected arcs
        (:func:`difflens.infer.initialise.source_from_arcs`).
    finals : int or "all"
        How many of the best short runs are continued with Adam (rows of one batch, each to its
        own convergence); the one with the highest log posterior after Adam is polished and
        returned.  On rugged posteriors (real lenses with a VAE source) the short runs' order is
        a weak predictor of where the full run ends: on a 256x256 mock the one restart of 8 that
        reached the true basin ranked last of the good ones after 150 steps and first after
        Adam (``benchmarks/RESULTS.md``).  ``"all"`` continues every short run (restarts and
        the encoded-source run): nearly free on a GPU, where rows of a batch cost about one,
        ~2.5x the final Adam time per 5 rows on a CPU.
    seed : int
        Makes the fit reproducible.

    Returns
    -------
    MAPResult

    Examples
    --------
    >>> from difflens.fitting import build_model
    >>> from difflens.datasets.mocks import simulate_mock
    >>> model = build_model(simulate_mock(3, npix=96, pixel_scale=0.08, source="sersic"),
    ...                     source="sersic")
    >>> result = fit_map(model, steps=800, restarts=2)          # doctest: +SKIP
    >>> result.lens()["r_ein"], result.reduced_chi2             # doctest: +SKIP
    """
    _check_finals(finals)
    if steps < 1 or restarts < 1 or restart_steps < 1:
        raise ValueError("steps, restarts and restart_steps must be >= 1")
    from .hmc import FlatSites

    clock = time.perf_counter()
    model.check_site_names(init or {}, "init")
    latent_init = model.latent_start()
    pyro.set_rng_seed(seed)      # prior draws for the restarts: the same whatever ran before
    guess = initialise(model) if data_guess else {}
    gen = torch.Generator(device="cpu").manual_seed(seed)     # restart jitter, on the host
    # with lens light, the restarts search mass and source with the light held at its initial
    # fit: the arcs then drive the search, not the light profile
    priors = model.all_priors()
    light = {k: _inside(priors[k], model.tensor(v)) for k, v in guess.items()
             if k.startswith("light") and k in model.site_names()}
    searched = pyro.poutine.condition(model, data=light) if light else model
    search_space = FlatSites(searched, dtype=model.dtype)
    search = _map_objective(search_space, searched)

    def short_runs(starts, desc):
        """Adam runs of ``restart_steps`` from each start (rows of one batch) -> (loss, values)."""
        u0 = torch.stack([search_space.flatten(_complete(model, v)) for v in starts])
        history, u, _ = _adam_rows(search, u0, restart_steps, lr, 0.5, 0.0, window, len(starts),
                                progress, desc)
        losses = np.nanmean(history[-20:], axis=0)
        return [(float(loss), {**light, **_row_values(search_space, row)})
                for loss, row in zip(losses, u)]

    starts = []
    for r in range(restarts):
        values = dict(latent_init)
        if r == 0 and init is not None:
            values.update(init)
        else:
            values.update(_restart_values(model, guess, gen, jitter=r > 0))
        starts.append(values)
    runs = short_runs(starts, f"MAP {restarts} restart{'s' if restarts > 1 else ''}")
    best = min(runs, key=lambda run: run[0])
    start = source_from_arcs(model, best[1]) if encode_source else {}
    if start:
        sites = model.site_names()
        start = {k: _inside(priors[k], v) if k in priors else v for k, v in start.items()
                 if k in sites}
        runs += short_runs([{**best[1], **start}], "MAP from the encoded source")
    restart_losses = [loss for loss, _ in runs]

    # the best ``finals`` short runs continued to convergence, as rows of one batch
    space = FlatSites(model)
    objective = _map_objective(space, model)
    chosen = sorted(runs, key=lambda run: run[0])[:None if finals == "all" else finals]
    u0 = torch.stack([space.flatten(values) for _, values in chosen])
    history, u, end = _adam_rows(objective, u0, steps, lr, lr_final_fraction, tol, window,
                                 len(chosen), progress, "MAP")
    # the polish continues only the best of them (Adam leaves each within a few nats of its
    # optimum; L-BFGS on a sum of rows would share one line search between them)
    i = int(torch.argmin(end))
    losses = history[:, i]
    losses = losses[np.isfinite(losses)]
    row = u[i:i + 1]
    if polish_steps:
        row, polished = _polish_rows(objective, row, polish_steps, 1)
        losses = np.concatenate([losses, polished])
    result = summarise_map(model, _row_values(space, row[0]), losses, restart_losses)
    result.seconds = time.perf_counter() - clock       # float() of the losses synchronised
    return result


def _check_finals(finals):
    if finals != "all" and not (isinstance(finals, int) and finals >= 1):
        raise ValueError(f"finals must be an integer >= 1 or 'all', got {finals!r}")


def _map_objective(space, model):
    """``rows -> potential`` for :func:`_adam_rows` with one observation: every row is a
    parameter set of the same ``model``; the potential is the negative log posterior of the
    parameters (no Jacobian of the unconstrained map: its minimum is the MAP)."""
    potential = space.potential(model, jacobian=False)
    return lambda rows: potential


def _row_values(space, row):
    """One unconstrained row (D,) -> its constrained site values (detached)."""
    return {k: v[0].detach() for k, v in space.constrained(row[None]).items()}


def summarise_map(model: LensModel, values: dict, losses=np.zeros(0), restart_losses=()):
    """Evaluate the model at ``values`` and build a :class:`MAPResult`."""
    with torch.no_grad():
        cond = pyro.poutine.condition(model, data=values)
        tr = pyro.poutine.trace(cond).get_trace()
        tr.compute_log_prob()
    params = {name: tr.nodes[name]["value"].detach() for name in values}
    params.update({k: model.tensor(v) for k, v in model.fixed_values().items()})
    params.update({k: tr.nodes[k]["value"].detach() for k in model.derived_sites})
    image = tr.nodes["model_image"]["value"].detach()
    resid = (model.data - image) / model.noise_sigma
    if model.mask is not None:
        resid = torch.where(model.mask, resid, torch.zeros_like(resid))
    # the source correction's pixels are held by their prior, not free parameters: not counted
    n_params = (sum(int(v.numel()) for k, v in values.items() if k != "src_correction")
                + len(model.linear_sites))
    chi2 = float((resid ** 2).sum())
    log_post = float(sum(site["log_prob_sum"] for site in tr.nodes.values()
                         if site["type"] == "sample" and "log_prob_sum" in site))
    source_image = None
    if model.source_kind == "vae":
        with torch.no_grad():
            source_image = params["src_amp"] * model.source_stamp(params)
    lens_light_image = model.lens_light_image(values) if model.priors.lens_light else None
    return MAPResult(params=params, loss_history=np.asarray(losses), model_image=image,
                     normalised_residuals=resid, source_image=source_image,
                     reduced_chi2=chi2 / max(model.n_pixels - n_params, 1),
                     log_posterior=log_post, restart_losses=list(restart_losses),
                     fixed=tuple(model.fixed_values()), lens_light_image=lens_light_image,
                     derived=model.derived_sites)


def fit_map_batch(models, *, steps=1000, lr=0.03, lr_final_fraction=0.02, restarts=8,
                  restart_steps=250, tol=1e-6, window=100, polish_steps=300, encode_source=True,
                  finals=2, chunk=64, seed=0, progress=True) -> list:
    """MAP fits of many observations at once: each Adam step is one batched likelihood call.

    The same schedule as :func:`fit_map` (data-driven restarts, the best continued with a
    geometrically decaying learning rate, per-lens convergence test), but every lens and every
    restart is a row of one parameter batch ``(N, D)`` in Pyro's unconstrained space, pushed
    through one batched simulator call (in chunks of ``chunk`` rows to bound memory).  Lenses are
    independent, so each row follows exactly the Adam path it would follow alone; converged
    lenses drop out of the batch.  The L-BFGS polish runs on the sum of the lenses' objectives
    (independent blocks, so its optimum is every lens's optimum) and is kept lens by lens only
    where it improved the posterior.

    Parameters
    ----------
    models : list of LensModel
        Same grid, PSF, source and priors (see :meth:`LensModel.stack`); data and noise differ.
    steps, lr, lr_final_fraction, restart_steps, tol, window, polish_steps :
        As in :func:`fit_map`.
    restarts : int
        Short runs per lens from data-driven and prior starts (rows of one batch).  Default 8:
        on 256x256 mocks 4 missed a better basin near the truth on 2 of 28 lenses with exact
        (VAE-decoded) sources and on several with real galaxies; 8 found it on all five misses
        tried (+58 to +381 nats) and ended 27 nats lower on one other lens
        (docs/validation.md, section 3b).  Cheap on a GPU; on a CPU the restart phase costs
        ~2x that of 4.
    encode_source : bool
        With a VAE source, as in :func:`fit_map`: one more short run per lens from the source
        read off its arcs through its best restart's lens (placement, encoder latent,
        amplitude; :func:`difflens.infer.initialise.source_from_arcs`), all such runs one batch.
    finals : int or "all"
        As in :func:`fit_map`: each lens continues its ``finals`` best short runs with Adam (all
        lenses' rows one batch) and keeps the one with the highest log posterior for the polish.
        The default 2 because the short runs' order predicts the final poorly: on 28 256x256
        mocks with real-galaxy sources, continuing only the best short run ended 15 and 162
        nats lower on 2 of 14 lenses once the encoded start was among the runs
        (docs/validation.md, section 3b).  Rows are nearly free on a GPU; on a CPU each extra
        final costs one more final Adam run per lens.
    chunk : int
        Rows per batched call (memory: ~``chunk`` x a few images; raise it on a GPU).
    seed : int

    Returns
    -------
    list of MAPResult
        One per model, in order.

    Examples
    --------
    >>> from difflens.datasets.mocks import simulate_mock
    >>> from difflens.fitting import build_model
    >>> models = [build_model(simulate_mock(s, npix=64, pixel_scale=0.12, source="sersic"),
    ...                       source="sersic") for s in range(8)]
    >>> results = fit_map_batch(models, steps=600, restarts=2)     # doctest: +SKIP
    >>> [r.reduced_chi2 for r in results]                          # doctest: +SKIP
    """
    from .hmc import FlatSites

    models = list(models)
    if not models:
        raise ValueError("fit_map_batch needs at least one model")
    if steps < 1 or restarts < 1 or restart_steps < 1 or chunk < 1:
        raise ValueError("steps, restarts, restart_steps and chunk must be >= 1")
    _check_finals(finals)
    n_lens = len(models)
    clock = time.perf_counter()
    pyro.set_rng_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)     # restart jitter, on the host
    template = models[0]
    space = FlatSites(template)

    starts = []
    for m in models:
        guess = initialise(m)
        for r in range(restarts):
            values = _restart_values(m, guess, gen, jitter=r > 0)
            values.update(m.latent_start())
            starts.append(space.flatten(_complete(m, values)))
    u = torch.stack(starts)                                        # (n_lens * restarts, D)

    def objective(stacked):
        """rows -> the potential of those rows of ``stacked`` (MAP: no Jacobian term)."""
        def rows_potential(rows):
            sub = copy.copy(stacked)
            sub.data, sub.noise_sigma = stacked.data[rows], stacked.noise_sigma[rows]
            sub.mask = stacked.mask[rows] if stacked.mask is not None else None
            return space.potential(sub, jacobian=False)
        return rows_potential

    losses, u, _ = _adam_rows(objective(LensModel.stack(models, repeat=restarts)), u,
                           restart_steps, lr, 0.5, 0.0, window, chunk, progress,
                           "MAP restarts (batched)")
    final = np.nanmean(losses[-20:], axis=0).reshape(n_lens, restarts)
    # each lens's short runs as (loss, row); row bookkeeping stays on the host
    runs = [[(float(final[i, r]), u[i * restarts + r]) for r in range(restarts)]
            for i in range(n_lens)]
    if encode_source and template.source_kind == "vae":
        best = torch.stack([min(lens_runs, key=lambda run: run[0])[1] for lens_runs in runs])
        for i, run in _encoded_source_runs(models, space, objective, best, restart_steps, lr,
                                           window, chunk, progress).items():
            runs[i].append(run)
    # the best ``finals`` short runs of every lens continued to convergence, one batch
    chosen = [sorted(lens_runs, key=lambda run: run[0])[:None if finals == "all" else finals]
              for lens_runs in runs]
    owner = [i for i, lens_runs in enumerate(chosen) for _ in lens_runs]
    losses, u, end = _adam_rows(objective(LensModel.stack([models[i] for i in owner])),
                                torch.stack([row for lens_runs in chosen for _, row in lens_runs]),
                                steps, lr, lr_final_fraction, tol, window, chunk, progress,
                                "MAP (batched)")
    best = {}                                       # lens -> its row with the lowest end
    for j, (i, loss) in enumerate(zip(owner, end.tolist())):
        if i not in best or loss < best[i][0]:
            best[i] = (loss, j)
    keep = [best[i][1] for i in range(n_lens)]
    u, losses = u[keep], losses[:, keep]
    if polish_steps:
        u, _ = _polish_rows(objective(LensModel.stack(models)), u, polish_steps, chunk)
    sites = space.constrained(u)
    results = []
    for i, m in enumerate(models):
        values = {k: v[i].detach() for k, v in sites.items()}
        history = losses[:, i]
        results.append(summarise_map(m, values, history[np.isfinite(history)],
                                     [loss for loss, _ in runs[i]]))
    for r in results:
        r.seconds = time.perf_counter() - clock
    return results


def _encoded_source_runs(models, space, objective, u, steps, lr, window, chunk, progress):
    """The encoded-source short runs of :func:`fit_map_batch`, one batch over the lenses.

    ``u`` (N, D) holds each lens's best restart; lens ``i``'s run starts there with the source
    placement, latent and amplitude of :func:`source_from_arcs`.  Returns ``{i: (loss, row)}``
    for the lenses whose arcs gave a start (mean loss of the last 20 steps, final row)."""
    template = models[0]
    priors, sites = template.all_priors(), template.site_names()
    lenses, starts = [], []
    for i, m in enumerate(models):
        values = _row_values(space, u[i])
        start = {k: _inside(priors[k], v) if k in priors else v
                 for k, v in source_from_arcs(m, values).items() if k in sites}
        if start:
            lenses.append(i)
            starts.append(space.flatten({**values, **start}))
    if not lenses:
        return {}
    stacked = LensModel.stack([models[i] for i in lenses])
    history, rows, _ = _adam_rows(objective(stacked), torch.stack(starts), steps, lr, 0.5, 0.0,
                                  window, chunk, progress, "MAP from the encoded sources (batched)")
    ends = np.nanmean(history[-20:], axis=0)
    return {i: (float(ends[j]), rows[j]) for j, i in enumerate(lenses)}


def _adam_rows(objective, u0, steps, lr, lr_final_fraction, tol, window, chunk, progress, desc):
    """Adam (Kingma & Ba 2015, Algorithm 1) on each row of ``u0`` (N, D) independently.

    ``objective(rows)`` returns the batched potential for those rows.  Each row's gradient is
    clipped to norm 100 (a start far from the optimum has gradients of 1e4-1e6); a row stops
    once its loss improves by less than ``tol`` (relative) between two successive
    ``window``-step means.
    Adam's fixed-size steps can carry a good start away (e.g. a learning rate too large for a
    narrow optimum) and never come back, so each row ends at the best point it visited.
    Returns the loss history (steps, N) (NaN after a row stopped), the final rows and their
    losses (N,).
    """
    n = u0.shape[0]
    u = u0.detach().clone()
    m, v = torch.zeros_like(u), torch.zeros_like(u)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    decay = lr_final_fraction ** (1.0 / max(steps, 1))
    history = np.full((steps, n), np.nan)
    # losses in float64 whatever the model's precision (a float32 model's potential mixes
    # float32 pixels with float64 prior terms)
    best_val = torch.full((n,), math.inf, dtype=torch.float64, device=u.device)
    best_u = u.clone()
    active = torch.ones(n, dtype=torch.bool, device="cpu")      # which rows still move (host)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False)
    for t in range(1, steps + 1):
        idx = torch.nonzero(active).reshape(-1)
        val, g = _rows_value_and_grad(objective, u, idx, chunk)
        if not torch.isfinite(val).all():
            bad = idx[~torch.isfinite(val)].tolist()
            raise FloatingPointError(f"MAP loss became non-finite at step {t} in rows {bad}")
        better = val < best_val[idx]                     # val is the loss before this update
        best_val[idx] = torch.where(better, val, best_val[idx])
        best_u[idx] = torch.where(better[:, None], u[idx], best_u[idx])
        g = g * (100.0 / g.norm(dim=1, keepdim=True).clamp_min(100.0))
        m[idx] = beta1 * m[idx] + (1 - beta1) * g
        v[idx] = beta2 * v[idx] + (1 - beta2) * g * g
        step = lr * decay ** (t - 1)
        mhat, vhat = m[idx] / (1 - beta1 ** t), v[idx] / (1 - beta2 ** t)
        u[idx] = u[idx] - step * mhat / (vhat.sqrt() + eps)
        history[t - 1, idx.cpu().numpy()] = val.cpu().numpy()
        if tol and t >= 2 * window:
            old = history[t - 2 * window:t - window, idx.cpu().numpy()].mean(0)
            new = history[t - window:t, idx.cpu().numpy()].mean(0)
            done = torch.as_tensor((old - new) < tol * np.abs(new), device="cpu")
            active[idx[done]] = False
            if not active.any():
                history = history[:t]
                break
        if bar is not None:
            bar.update()
            bar.set_postfix(active=int(active.sum()), loss=f"{float(val.mean()):.1f}")
    if bar is not None:
        bar.close()
    end, _ = _rows_value_and_grad(objective, u, torch.arange(n, device="cpu"), chunk)
    better = torch.isfinite(end) & (end < best_val)
    return history, torch.where(better[:, None], u, best_u), torch.where(better, end, best_val)


def _rows_value_and_grad(objective, u, rows, chunk):
    """Potential and gradient of ``rows`` of ``u``, ``chunk`` rows per batched call."""
    values, grads = [], []
    for part in torch.split(rows, chunk):
        x = u[part].detach().requires_grad_(True)
        val = objective(part)(x)
        g, = torch.autograd.grad(val.sum(), x)
        values.append(val.detach().to(torch.float64))
        grads.append(g)
    return torch.cat(values), torch.cat(grads)


def _polish_rows(objective, u, max_iter, chunk, min_gain=0.01):
    """L-BFGS (strong Wolfe line search) on the summed potential of all rows (independent
    blocks): it converges to the optimum that Adam's fixed-size steps only approach.

    Torch's L-BFGS stops for good after one line search without progress, which on these
    rugged posteriors can happen hundreds of iterations before the optimum; it is then restarted
    with a fresh curvature history, as long as the last round gained more than ``min_gain``
    (nats) and the budget of ``1.25 max_iter`` evaluations lasts.  Per row, the polished point
    is kept only where its potential is lower and finite.  Returns the rows and the summed
    potential at each evaluation."""
    rows = torch.arange(u.shape[0], device="cpu")
    before, _ = _rows_value_and_grad(objective, u, rows, chunk)
    x = u.detach().clone().requires_grad_(True)
    budget = max(1, int(1.25 * max_iter))
    seen = []

    def closure():
        opt.zero_grad()
        val, g = _rows_value_and_grad(objective, x, rows, chunk)
        x.grad = g
        seen.append(float(val.sum()))
        return val.sum()

    try:
        while len(seen) < budget:
            done, last = len(seen), min(seen, default=math.inf)
            opt = torch.optim.LBFGS([x], max_iter=max_iter, max_eval=budget - done,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                    tolerance_change=1e-12, history_size=50)
            opt.step(closure)
            if not last - min(seen[done:], default=math.inf) > min_gain:
                break
    except (ValueError, FloatingPointError):
        return u, np.asarray(seen)
    after, _ = _rows_value_and_grad(objective, x.detach(), rows, chunk)
    better = torch.isfinite(after) & (after < before)
    return torch.where(better[:, None], x.detach(), u), np.asarray(seen)

"""Vectorised Hamiltonian Monte Carlo: many chains through one batched likelihood.

Pyro's ``MCMC`` runs chains one after another (or in separate processes); a lens likelihood is
batch-first (:class:`difflens.simulate.Simulator`), so here all chains are one batch of parameter
sets and every leapfrog step is one batched forward + backward pass -- on a GPU, 4 or 64 chains
cost about what one does.

Two pieces:

* :func:`batched_potential` -- the negative log posterior of a :class:`~difflens.model.LensModel`
  at ``C`` points of Pyro's unconstrained space at once (shape ``(C,)``), including the
  log-Jacobians of the constraint transforms; it equals Pyro's own ``potential_fn`` chain by chain
  (tested).
* :func:`hmc` -- HMC (Neal 2011, eqs. 5.18-5.20: leapfrog + Metropolis) on a batch of chains with a
  per-chain step size tuned by dual averaging (Hoffman & Gelman 2014, Algorithm 5) to a target
  acceptance, a diagonal mass matrix estimated from the pooled warm-up draws, and a trajectory
  length jittered uniformly in [0.5, 1] x ``path_length`` each iteration (so no chain locks into a
  periodic orbit).  It is meant to run in coordinates whitened by the Laplace approximation at the
  MAP (see :func:`difflens.infer.mcmc.laplace_whitening`), where the posterior is close to
  N(0, I), a path length of ~pi/2 gives nearly independent draws and the step size is O(1).

A fixed trajectory length is what makes the chains vectorisable: NUTS lets every chain grow its own
tree, so chains cannot share one batched call per step.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from pyro import poutine
from tqdm.auto import tqdm

from .._io import atomic_path, tensors_to


class FlatSites:
    """The latent sites of a Pyro model laid out as one flat unconstrained vector per row.

    Samplers and optimisers over many lenses or chains work on a matrix ``u`` of shape ``(N, D)``:
    each row is every latent site of the model, mapped to Pyro's unconstrained space (e.g.
    ``log r_ein``) and flattened in a fixed order.  This object holds that order and the
    transforms, and converts both ways.

    Parameters
    ----------
    model : callable
        A Pyro model (e.g. :class:`difflens.model.LensModel`).
    init_strategy : callable, optional
        Pyro initialisation strategy giving the starting point :attr:`start` (default: prior
        medians).
    dtype : torch.dtype, optional
        Precision of the flat vectors (default: that of ``model.data``, else of the sites), for
        models wrapped by a poutine, which carry no data of their own.

    Attributes
    ----------
    names, sizes, shapes : list
        Site names in order, number of elements and shape of each site.
    transforms : dict of str -> Transform
        Constrained -> unconstrained transform per site (from Pyro's ``initialize_model``).
    start : Tensor (D,)
        The initial point, unconstrained and flattened, in ``dtype`` if given, else in the
        dtype of ``model.data`` when the model has one.

    Examples
    --------
    >>> import torch
    >>> from difflens.model import LensModel
    >>> from difflens.simulate import Simulator
    >>> from difflens.sources import Sersic
    >>> sim = Simulator(npix=16, pixel_scale=0.2, psf_sigma=0.1)
    >>> lens = dict(r_ein=1.0, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
    >>> model = LensModel(sim.image(lens, Sersic(amp=1.0, r_e=0.2, n=1.0)), 0.05, sim,
    ...                   source="sersic")
    >>> space = FlatSites(model)
    >>> u = space.start.expand(3, -1)              # three identical rows
    >>> space.potential(model)(u).shape
    torch.Size([3])
    >>> space.constrained(u)["r_ein"].shape
    torch.Size([3])
    """

    def __init__(self, model, init_strategy=None, dtype=None):
        from pyro.infer.autoguide.initialization import init_to_median
        from pyro.infer.mcmc.util import initialize_model

        params, _, self.transforms, _ = initialize_model(
            model, init_strategy=init_strategy or init_to_median)
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [int(params[n].numel()) for n in self.names]
        # the model's working precision (priors may hold float64 constants while a float32 model
        # computes in float32; a concatenation would promote everything to float64); a model
        # wrapped by a poutine (no data of its own) names it through ``dtype``
        dtype = (dtype or getattr(getattr(model, "data", None), "dtype", None)
                 or params[self.names[0]].dtype)
        self.start = torch.cat([params[n].detach().to(dtype).reshape(-1) for n in self.names])

    def potential(self, model, jacobian=True):
        """:func:`batched_potential` of ``model`` (same sites) in this layout."""
        return batched_potential(model, self.transforms, self.names, self.sizes, self.shapes,
                                 jacobian=jacobian)

    def flatten(self, values: dict, batch_ndim=0) -> torch.Tensor:
        """Constrained site values -> unconstrained flat vectors: one parameter set gives
        ``(D,)``; with ``batch_ndim`` leading batch dimensions (e.g. 2 for chains x draws),
        ``(*batch, D)``."""
        parts = []
        for k in self.names:
            v = torch.as_tensor(values[k], dtype=self.start.dtype, device=self.start.device)
            y = self.transforms[k](v) if k in self.transforms else v
            parts.append(y.reshape(*v.shape[:batch_ndim], -1))
        return torch.cat(parts, -1).to(self.start.dtype)   # transforms may hold float64 bounds

    def unconstrained(self, u: torch.Tensor) -> dict:
        """Rows ``u`` (N, D) -> unconstrained site tensors of shape ``(N, *site_shape)``."""
        return {n: c.reshape(u.shape[0], *sh)
                for n, c, sh in zip(self.names, torch.split(u, self.sizes, dim=1), self.shapes)}

    def constrained(self, u: torch.Tensor) -> dict:
        """Rows ``u`` (N, D) -> site values in their natural units, shape ``(N, *site_shape)``."""
        return {n: (self.transforms[n].inv(v) if n in self.transforms else v)
                for n, v in self.unconstrained(u).items()}


def batched_potential(model, transforms: dict, names, sizes, shapes, jacobian=True):
    """Return ``potential(u) -> (C,)``, the negative log joint of ``model`` at ``C`` points.

    Parameters
    ----------
    model : callable
        A Pyro model whose sample sites are scalars or vectors (event dims only) and whose
        computation broadcasts over a leading batch of parameter values, as ``LensModel`` does.
    transforms : dict of str -> Transform
        Constrained -> unconstrained transform per latent site (Pyro's ``initialize_model``).
    names, sizes, shapes :
        Order, number of elements and shape of each latent site in the flat vector ``u``.
    jacobian : bool
        Include ``log |d theta / d u|`` (True: the density of ``u``, what a sampler needs;
        False: the posterior density of ``theta``, whose maximum is the MAP).

    Returns
    -------
    callable
        ``potential(u)`` for ``u`` of shape ``(C, D)`` (unconstrained, flattened), returning
        ``-log p(theta(u), data) - log |d theta / d u|`` of shape ``(C,)``; ``+inf`` (zero
        gradient) for a row whose constrained values overflow or underflow, without touching
        the other rows.

    Examples
    --------
    >>> from pyro.infer.mcmc.util import initialize_model                     # doctest: +SKIP
    >>> params, _, transforms, _ = initialize_model(model)                    # doctest: +SKIP
    >>> names = list(params)                                                  # doctest: +SKIP
    >>> pot = batched_potential(model, transforms, names, [params[n].numel() for n in names],
    ...                         [params[n].shape for n in names])             # doctest: +SKIP
    >>> pot(u).shape        # u: (C, D) unconstrained points -> (C,)          # doctest: +SKIP
    """
    def off_support(u):
        """Rows whose constrained values overflow or underflow (far out in a trajectory,
        exp() gives r_e = inf or 0; a sigmoid gives q = q_max): they map back to +-inf."""
        bad = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
        for name, chunk in zip(names, torch.split(u, sizes, dim=1)):
            if name in transforms:
                x = transforms[name].inv(chunk)
                ok = torch.isfinite(x) & torch.isfinite(transforms[name](x))
                bad |= ~ok.all(1)
        return bad

    def potential(u):
        c = u.shape[0]
        with torch.no_grad():
            outside = off_support(u)
        if outside.any():
            if outside.all():
                return u.sum(1) * 0.0 + float("inf")
            # such rows get +inf; the physics sees a valid row in their place (detached, so
            # nothing flows back): one chain off the support costs only that chain
            ref = int(torch.nonzero(~outside)[0])
            u = torch.where(outside[:, None], u[ref].detach(), u)
        values, log_jac = {}, u.new_zeros(c)
        for name, chunk, shape in zip(names, torch.split(u, sizes, dim=1), shapes):
            v = chunk.reshape(c, *shape)
            if name in transforms:
                inv = transforms[name].inv
                x = inv(v)
                if jacobian:
                    log_jac = log_jac + inv.log_abs_det_jacobian(v, x).reshape(c, -1).sum(1)
                v = x
            values[name] = v
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace()
        log_joint = log_jac
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            lp = site["fn"].log_prob(site["value"])
            # sites shared by all chains (e.g. a fixed-prior term) broadcast to every chain
            lp = lp.reshape(1).expand(c) if lp.numel() == 1 else lp.reshape(c, -1).sum(1)
            log_joint = log_joint + lp
        return (-log_joint).masked_fill(outside, float("inf"))

    return potential


def _value_and_grad(potential, u):
    u = u.detach().requires_grad_(True)
    pot = potential(u)
    bad = ~torch.isfinite(pot)
    grad, = torch.autograd.grad(pot.sum(), u)
    pot = pot.detach().masked_fill(bad, float("inf"))
    return pot, torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def _safe(potential):
    """Refused parameters (the physics raising ValueError far out in a trajectory) -> +inf."""
    def wrapped(u):
        try:
            return potential(u)
        except ValueError:
            return u.sum(1) * 0.0 + float("inf")
    return wrapped


def hmc(potential, u0, *, num_samples=500, warmup=300, target_accept=0.8, path_length=2.2,
        max_steps=64, max_steps_ratio=3.0, dense=True, adapt_metric=True, groups=None, seed=0,
        jumps=None, tempering=None, progress=True, desc="HMC", checkpoint=None,
        checkpoint_every=20):
    """Run ``C`` HMC chains at once from ``u0`` (shape ``(C, D)``).

    Parameters
    ----------
    potential : callable
        ``(C, D) -> (C,)`` negative log density (e.g. :func:`batched_potential`), chains
        independent of each other.
    u0 : Tensor (C, D)
        Starting points, one row per chain.
    num_samples, warmup : int
        Draws kept and adaptation iterations per chain.
    target_accept : float
        Mean Metropolis acceptance that dual averaging aims for (0 < t < 1).
    path_length : float
        Trajectory length in units of the (preconditioned) posterior scale; each iteration uses
        ``U(0.5, 1) * path_length``.  For a unit Gaussian a time t gives draws correlated by
        cos t and squares by cos^2 t; the default 2.2 keeps t in [1.1, 2.2] around a quarter
        orbit (both near 0) while still moving along directions two or three times broader
        than the preconditioner assumed (the curved r_ein-gamma-source degeneracy at low S/N:
        3-4x the effective samples of 1.5 on the test suite's noise-0.2 lens).  Near pi the
        radius of the orbit is kept and widths mix slowly.
    max_steps : int
        Cap on leapfrog steps per iteration (guards against a collapsed step size).
    max_steps_ratio : float
        No chain takes more than this multiple of the batch's median step count.  Every
        leapfrog step is one batched call, so the batch waits for its slowest chain: one chain
        (or one lens of many) with a 10x smaller step size would make all of them 10x slower.
        A capped chain travels a shorter path instead, which costs only its own effective
        sample size.  After warm-up the step sizes are fixed, so the cap is a constant of the
        kernel and each chain stays a valid Markov chain.
    dense : bool
        Adapt a dense preconditioner (within-chain covariance of the warm-up draws, shrunk
        towards the current metric when draws are few) rather than a diagonal one.
    adapt_metric : bool
        Adapt the preconditioner in warm-up (default).  False keeps the unit metric of the
        coordinates ``u`` as given and adapts only the step size: for a potential already
        whitened by a trustworthy posterior covariance (e.g. from a long pilot run, see
        :func:`difflens.infer.mcmc.sample_posterior`), which short warm-up windows of slowly
        mixing chains would only shrink again.
    groups : LongTensor (C,), optional
        Which posterior each chain samples (0 .. G-1), e.g. the lens of each chain when many
        lenses run in one batch: the preconditioner is adapted per group from that group's
        chains only.  Default: all chains sample one posterior.
    seed : int
    jumps : tuple (centres, factors), optional
        Gaussian approximations ``N(centres[k], factors[k] factors[k]^T)`` of ``K >= 2`` modes
        in the coordinates ``u`` (Tensors (K, D) and (K, D, D)), for posteriors whose basins
        HMC crosses too rarely.  After every iteration past warm-up each chain then also tries
        a mode-jumping Metropolis move (Tjelmeland & Hegstad 2001): from the basin ``i`` whose
        Gaussian is densest at ``u`` to another basin ``j`` (uniformly among the others) by the
        affine map between the two Gaussians, ``u' = c_j + F_j F_i^-1 (u - c_i)``, accepted
        with probability ``min(1, p(u') |det F_j| / (p(u) |det F_i|))`` if ``u'`` lies in basin
        ``j`` (else rejected).  The map is its own inverse between the two basins, so the move
        is reversible and leaves the posterior invariant; a chain then changes basin every
        ``1 / acceptance`` iterations instead of waiting for a trajectory to find the path.
        Warm-up has no jumps: a metric adapted on draws from several basins would fit none.
    tempering : sequence of K floats, optional
        Inverse temperatures ``1 = beta_0 > beta_1 > ... > beta_{K-1} > 0`` for parallel
        tempering (replica exchange; Geyer 1991), for posteriors whose modes or ridge ends HMC
        crosses too rarely.  The C chains form ``C / K`` ladders (C must be a multiple of K):
        chain ``c`` samples ``p(u)^beta_k``, ``k = c mod K``, in ladder ``c // K``, and only the
        ``beta = 1`` chains (``c mod K == 0``) sample the posterior itself.  After every
        iteration, warm-up included, neighbouring levels of each ladder propose to exchange
        positions, the pairs ``(k, k + 1)`` with ``k`` even on even iterations and odd on odd
        ones (the deterministic even-odd scheme, which carries positions through the ladder
        without backtracking; Syed et al. 2022), accepted with probability ``min(1,
        exp((beta_k - beta_{k+1}) (U_k - U_{k+1})))`` where ``U = -log p`` at each position.
        A hot chain crosses barriers ``1 / beta`` times lower and hands what it finds down the
        ladder.  Every level adapts its own step size and (with ``adapt_metric``) its own
        metric, per group.  Not combined with ``jumps``.
    progress : bool
        Progress bar (with the current mean acceptance and step size).
    checkpoint : str or Path, optional
        File holding the sampler's whole state (positions, adaptation, random generator, draws
        so far), rewritten atomically every ``checkpoint_every`` iterations and at the end.  If
        it exists when ``hmc`` starts, the run resumes from it and returns exactly the draws an
        uninterrupted run would; a file written with other settings, starting points or target
        density (its value at the starts) raises ``ValueError`` (delete it to start afresh).
        A finished (or interrupted) run is *extended* by calling again with a larger
        ``num_samples`` and everything else the same: the chains continue where they stopped,
        and the draws are exactly those of one uninterrupted run of the larger size (warm-up
        does not depend on ``num_samples``).  Likewise an interrupted long run is *ended early*
        by asking for fewer draws than it was started with but at least as many as the file
        holds: it continues to that number (or stops at once) and returns those draws.  Asking
        for fewer draws than the file holds raises ``ValueError``.
    checkpoint_every : int
        Iterations between checkpoint writes.

    Returns
    -------
    draws : Tensor (C, num_samples, D)
    stats : dict
        ``accept`` (C, num_samples) acceptance probabilities, ``step_size`` (C,),
        ``n_steps`` (C, num_samples) leapfrog steps of each chain, ``divergent`` (C, num_samples) bool, and
        ``scale`` (G, D, D) the adapted preconditioner of each group (``u = scale[g] @ v`` for
        a chain of group g, v sampled with unit mass), ``rejected_updates`` the number of
        window updates kept back because they made the step size 4x smaller, ``seconds``
        the wall time of warm-up and of drawing the kept samples (``{"warmup": s,
        "sampling": s}``, this call only: a resumed run counts what it ran); with ``jumps``
        also ``jump_accept`` (C, num_samples), the jump moves' acceptance probabilities, and
        ``basin`` (C, num_samples), the basin of each draw; with ``tempering`` also ``beta``
        (C,) each chain's inverse temperature, ``swap_accept`` (C // K, num_samples, K - 1)
        the exchange moves' acceptance probabilities between levels k and k + 1 of each ladder
        after each kept iteration (NaN where that pair was not proposed), and ``replica``
        (C, num_samples) which of the C walkers (numbered by the chain they started in) held
        each chain's position at each draw (:func:`round_trips` counts their journeys).

    Notes
    -----
    Warm-up follows Stan's schedule: 15% step-size search, then adaptation windows of doubling
    length (25, 50, ...) after each of which the covariance of the pooled draws of each group's
    chains re-scales that group's coordinates and the step-size search restarts, then 10% step size only.
    """
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")
    if max_steps < 1 or max_steps_ratio < 1:
        raise ValueError(f"max_steps must be >= 1 and max_steps_ratio >= 1, got {max_steps}, "
                         f"{max_steps_ratio}")
    if num_samples < 1 or warmup < 0:
        raise ValueError("num_samples must be >= 1 and warmup >= 0")
    if u0.ndim != 2:
        raise ValueError(f"u0 must have shape (chains, dim), got {tuple(u0.shape)}")
    c, d = u0.shape
    if groups is None:
        groups = torch.zeros(c, dtype=torch.long, device=u0.device)
    groups = torch.as_tensor(groups, dtype=torch.long, device=u0.device)
    if groups.shape != (c,) or int(groups.min()) < 0:
        raise ValueError(f"groups must hold one group index >= 0 per chain, shape ({c},), "
                         f"got shape {tuple(groups.shape)}")
    n_groups = int(groups.max()) + 1
    if jumps is not None:
        jumps = _checked_jumps(jumps, d, u0)
    betas = None
    if tempering is not None:
        betas = _checked_ladder(tempering, c, jumps, u0.device)
        # every temperature of every group adapts its own metric
        level = torch.arange(c, device=u0.device) % betas.numel()
        groups = torch.unique(groups * betas.numel() + level, return_inverse=True)[1]
        n_groups = int(groups.max()) + 1
    gen = torch.Generator(device=u0.device).manual_seed(seed)
    potential = _safe(potential)
    kw = dict(dtype=u0.dtype, device=u0.device)
    scale = torch.eye(d, **kw).expand(n_groups, d, d).clone()   # u = scale[g] @ v; unit mass

    def to_u(v):
        return torch.einsum("cij,cj->ci", scale[groups], v)

    def to_v(u):
        return torch.linalg.solve_triangular(scale[groups], u[:, :, None], upper=False)[:, :, 0]

    def pot_v(v):
        pot = potential(to_u(v))
        return pot if betas is None else pot * betas[level].to(pot.dtype)

    v = u0.detach().clone()
    pot, grad = _value_and_grad(pot_v, v)
    if not torch.isfinite(pot).all():
        raise ValueError("HMC start has a non-finite log density in chains "
                         f"{torch.nonzero(~torch.isfinite(pot)).reshape(-1).tolist()}")
    window_ends = _adaptation_windows(warmup) if adapt_metric else []
    window = []
    rejected_updates = 0

    def dual_averaging_state(eps):
        return dict(mu=torch.log(10 * eps), log_eps_bar=torch.zeros(c, **kw),
                    h_bar=torch.zeros(c, **kw), t=0)

    eps = _initial_step_size(pot_v, v, pot, grad, gen)
    da = dual_averaging_state(eps)
    draws, accepts, divergent, n_steps_kept, jump_accepts, basins = [], [], [], [], [], []
    replica = torch.arange(c, device=u0.device)          # which walker each chain holds
    replicas, swap_accepts = [], []
    start = 0
    settings = dict(u0=u0.detach().cpu(), groups=groups.cpu(), num_samples=num_samples,
                    warmup=warmup, target_accept=target_accept, path_length=path_length,
                    max_steps=max_steps, max_steps_ratio=max_steps_ratio, dense=dense,
                    adapt_metric=adapt_metric, seed=seed,
                    start_potential=pot.detach().cpu())     # a fingerprint of the target density
    if jumps is not None:      # (files written without jumps lack the key: they differ)
        settings["jumps"] = torch.cat([jumps[0][:, :, None], jumps[1]], 2).cpu()
    if betas is not None:      # (likewise for tempering)
        settings["tempering"] = betas.cpu()
    if checkpoint is not None and Path(checkpoint).exists():
        state = _load_checkpoint(checkpoint, settings, u0.device)
        (start, v, pot, grad, eps, da, scale, window, window_ends, rejected_updates, draws,
         accepts, divergent, n_steps_kept) = (state[k] for k in _STATE)
        jump_accepts, basins = state.get("jump_accepts", []), state.get("basins", [])
        replica = state.get("replica", replica)
        replicas, swap_accepts = state.get("replicas", []), state.get("swap_accepts", [])
        scale = scale.clone()
        gen.set_state(state["generator"])

    def save(next_it):
        if checkpoint is None:
            return
        state = dict(zip(_STATE, (next_it, v, pot, grad, eps, da, scale, window, window_ends,
                                  rejected_updates, draws, accepts, divergent, n_steps_kept)))
        state.update(settings=settings, generator=gen.get_state(), jump_accepts=jump_accepts,
                     basins=basins, replica=replica, replicas=replicas,
                     swap_accepts=swap_accepts)
        with atomic_path(checkpoint) as tmp:
            torch.save(tensors_to(state, "cpu"), tmp)

    seconds = dict(warmup=0.0, sampling=0.0)
    clock = time.perf_counter()
    bar = tqdm(range(start, warmup + num_samples), desc=desc, disable=not progress, leave=False,
               initial=start, total=warmup + num_samples)
    for it in bar:
        jitter = 0.5 + 0.5 * torch.rand((), generator=gen, **kw)
        # each chain takes its own number of steps, so that every chain travels the same
        # length whatever its step size (a shared count would send a chain with a 2x larger
        # step half a period round the Gaussian: anticorrelated, periodic draws)
        steps_c = torch.ceil(jitter * path_length / eps).clamp(1, max_steps)
        steps_c = steps_c.clamp(max=math.ceil(max_steps_ratio * float(steps_c.median()))).long()
        n_steps = int(steps_c.max())
        p = torch.randn(v.shape, generator=gen, **kw)
        h0 = pot + 0.5 * (p * p).sum(1)
        vn, pn, gn = v, p, grad
        # positions move in the model's precision (a float32 model's potential is float64:
        # float32 pixels plus float64 prior terms, and so is the step adapted from it)
        step = eps[:, None].to(v.dtype)
        pn = pn - 0.5 * step * gn                  # leapfrog (Neal 2011, eqs. 5.18-5.20)
        lost = torch.zeros(c, dtype=torch.bool, device=v.device)
        for k in range(n_steps):
            # chains past their own count stand still; so does a chain whose trajectory left
            # the support (its proposal is rejected below), so it raises nothing further
            moving = ((k < steps_c) & ~lost)[:, None]
            vn = torch.where(moving, vn + step * pn, vn)
            potn, gn = _value_and_grad(pot_v, vn)
            lost |= ~torch.isfinite(potn)
            # a full momentum step inside the trajectory, the closing half step at its end
            kick = torch.where(k < steps_c - 1, 1.0, 0.5)[:, None].to(vn.dtype)
            pn = torch.where(moving, pn - kick * step * gn, pn)
        h1 = (potn + 0.5 * (pn * pn).sum(1)).masked_fill(lost, float("inf"))
        log_accept = torch.nan_to_num(h0 - h1, nan=-math.inf).clamp(max=0.0)
        accept_prob = log_accept.exp()
        take = torch.rand(c, generator=gen, **kw) < accept_prob
        v = torch.where(take[:, None], vn, v)
        pot = torch.where(take, potn, pot)
        grad = torch.where(take[:, None], gn, grad)
        if betas is not None:
            order, swap_prob = _exchange(pot / betas[level].to(pot.dtype), betas, it % 2, gen)
            if not torch.equal(order, torch.arange(c, device=order.device)):
                v = to_v(to_u(v)[order])        # each level keeps its own coordinates
                pot, grad = _value_and_grad(pot_v, v)
                replica = replica[order]
        if it < warmup:
            eps = _dual_averaging_update(da, accept_prob, target_accept)
            if window_ends and window_ends[0][0] <= it:
                window.append(v)
            if window_ends and it == window_ends[0][1] - 1:
                window_ends.pop(0)
                drawn = torch.stack(window)                          # (iterations, C, D)
                window = []
                old_scale, old_v = scale.clone(), v.clone()
                old_eps = _initial_step_size(pot_v, v, pot, grad, gen)
                for g in range(n_groups):                            # pooled over its chains
                    rows = groups == g
                    update = _preconditioner(drawn[:, rows], dense)
                    # u = scale v is unchanged; new coordinates v' with v = update v'
                    scale[g] = scale[g] @ update
                    v[rows] = torch.linalg.solve_triangular(update, v[rows].T, upper=False).T
                pot, grad = _value_and_grad(pot_v, v)
                eps = _initial_step_size(pot_v, v, pot, grad, gen)
                # a metric under which one leapfrog step must be 4x shorter fits worse than the
                # old one (e.g. draws from chains still drifting): keep the old one
                worse = [g for g in range(n_groups) if float(eps[groups == g].median())
                         < 0.25 * float(old_eps[groups == g].median())]
                if worse:
                    for g in worse:
                        rows = groups == g
                        scale[g], v[rows] = old_scale[g], old_v[rows]
                    pot, grad = _value_and_grad(pot_v, v)
                    eps = _initial_step_size(pot_v, v, pot, grad, gen)
                    rejected_updates += len(worse)
                da = dual_averaging_state(eps)
            if it == warmup - 1:
                eps = da["log_eps_bar"].exp()
                seconds["warmup"] = _elapsed(clock, v)
                clock = time.perf_counter()
        else:
            if jumps is not None:
                u_new, jump_prob, basin, moved = _mode_jump(to_u(v), pot, potential, *jumps, gen)
                if moved.any():         # new positions need their gradients
                    v = to_v(u_new)
                    pot, grad = _value_and_grad(pot_v, v)
                jump_accepts.append(jump_prob)
                basins.append(basin)
            draws.append(to_u(v))
            if betas is not None:
                replicas.append(replica)
                swap_accepts.append(swap_prob)
            accepts.append(accept_prob)
            divergent.append(~torch.isfinite(h1) | (h1 - h0 > 1000.0))
            n_steps_kept.append(steps_c)
        extra = {"jump": f"{float(jump_accepts[-1].mean()):.2f}"} if jump_accepts else {}
        if betas is not None and not swap_prob.isnan().all():
            extra["swap"] = f"{float(swap_prob.nanmean()):.2f}"
        bar.set_postfix(accept=f"{float(accept_prob.mean()):.2f}", step=f"{float(eps.median()):.3f}",
                        L=n_steps, **extra)
        if (it + 1) % checkpoint_every == 0 or it + 1 == warmup + num_samples:
            save(it + 1)
    bar.close()
    seconds["sampling"] = _elapsed(clock, v)          # the clock restarted when warm-up ended
    stats = dict(accept=torch.stack(accepts, 1), step_size=eps,
                 n_steps=torch.stack(n_steps_kept, 1), divergent=torch.stack(divergent, 1),
                 scale=scale, rejected_updates=rejected_updates, seconds=seconds)
    if jumps is not None:
        stats.update(jump_accept=torch.stack(jump_accepts, 1), basin=torch.stack(basins, 1))
    if betas is not None:
        stats.update(beta=betas[level], swap_accept=torch.stack(swap_accepts, 1),
                     replica=torch.stack(replicas, 1))
    return torch.stack(draws, 1), stats


def _checked_ladder(tempering, chains, jumps, device):
    """``tempering`` as a float64 tensor of inverse temperatures, checked (see :func:`hmc`)."""
    try:
        betas = torch.as_tensor(tempering, dtype=torch.float64, device=device).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError("tempering must be a sequence of inverse temperatures") from err
    k = betas.numel()
    if (k < 2 or not torch.isfinite(betas).all() or float(betas[0]) != 1.0
            or not (betas[1:] < betas[:-1]).all() or float(betas[-1]) <= 0):
        raise ValueError("tempering needs K >= 2 inverse temperatures 1 = beta_0 > beta_1 > "
                         f"... > 0, got {betas.tolist()}")
    if chains % k:
        raise ValueError(f"tempering with {k} temperatures needs a multiple of {k} chains (one "
                         f"ladder per {k}), got {chains}")
    if jumps is not None:
        raise ValueError("tempering and jumps are not combined; use one of them")
    return betas


def _exchange(energy, betas, parity, gen):
    """One round of replica-exchange proposals between neighbouring levels of every ladder
    (:func:`hmc`, ``tempering``).

    Parameters
    ----------
    energy : Tensor (C,)
        ``U = -log p`` (untempered) at each chain's position; chain c sits at level c mod K.
    betas : Tensor (K,)
    parity : int
        0 proposes the pairs (0, 1), (2, 3), ...; 1 the pairs (1, 2), (3, 4), ...

    Returns
    -------
    order : LongTensor (C,)
        Chain c takes the position of chain ``order[c]``.
    prob : Tensor (C // K, K - 1)
        Acceptance probability of each pair (k, k + 1), NaN where not proposed.
    """
    k = betas.numel()
    e = energy.reshape(-1, k).to(betas.dtype)
    order = torch.arange(energy.numel(), device=energy.device).reshape(-1, k)
    prob = torch.full((e.shape[0], k - 1), math.nan, dtype=betas.dtype, device=betas.device)
    lo = torch.arange(parity, k - 1, 2, device=energy.device)
    if lo.numel():
        log_r = (betas[lo] - betas[lo + 1]) * (e[:, lo] - e[:, lo + 1])
        p = torch.nan_to_num(log_r, nan=-math.inf).clamp(max=0.0).exp()
        take = torch.rand(p.shape, generator=gen, dtype=p.dtype, device=p.device) < p
        a, b = order[:, lo].clone(), order[:, lo + 1].clone()
        order[:, lo] = torch.where(take, b, a)
        order[:, lo + 1] = torch.where(take, a, b)
        prob[:, lo] = p
    return order.reshape(-1), prob


def temperature_ladder(k, dim, swap_accept=0.4):
    """``k`` geometrically spaced inverse temperatures from 1 for parallel tempering in
    ``dim`` dimensions.

    For a ``dim``-dimensional Gaussian the exchange of levels ``beta`` and ``r beta`` (``r =
    exp(-delta)``) is accepted on average with probability ``2 Phi(-sqrt(dim) delta / 2)``
    (the energy difference is Gaussian with mean ``dim delta^2 / 2`` and twice that variance
    to leading order in delta), so ``delta = -2 Phi^-1(swap_accept / 2) / sqrt(dim)``.  Real
    posteriors, with heavier tails and several modes, usually swap less often.

    Returns
    -------
    list of float
        ``[1, r, r^2, ..., r^(k-1)]``.
    """
    if k < 2 or dim < 1 or not 0 < swap_accept < 1:
        raise ValueError(f"need k >= 2 levels, dim >= 1 and 0 < swap_accept < 1, got {k}, "
                         f"{dim}, {swap_accept}")
    delta = -2 * float(torch.distributions.Normal(0.0, 1.0).icdf(
        torch.tensor(swap_accept / 2, dtype=torch.float64))) / math.sqrt(dim)
    return [math.exp(-delta * i) for i in range(k)]


def round_trips(replica, k):
    """Round trips of the walkers of a tempered run: journeys from the coldest level (``beta
    = 1``) to the hottest and back, counted over the draws of ``replica`` (C, S) as
    :func:`hmc` returns it with ``tempering`` of ``k`` levels.  A run whose walkers never make
    the trip does not mix between what only the hot levels cross."""
    replica = torch.as_tensor(replica)
    c, _ = replica.shape
    level = torch.empty_like(replica)
    # level[w, s]: the level at which walker w sits at draw s
    level.scatter_(0, replica, (torch.arange(c, device=replica.device) % k)[:, None]
                   .expand_as(replica).contiguous())
    trips = 0
    for path in level.tolist():
        leg = None                   # None: not yet at the cold end; "up", then "down"
        for lev in path:
            if lev == 0:
                trips += leg == "down"
                leg = "up"
            elif lev == k - 1 and leg == "up":
                leg = "down"
    return trips


def _checked_jumps(jumps, d, like):
    """``jumps`` as two tensors on ``like``'s device and dtype, shapes checked."""
    try:
        centres, factors = (torch.as_tensor(t, dtype=like.dtype, device=like.device)
                            for t in jumps)
    except (TypeError, ValueError) as err:
        raise ValueError("jumps must be a pair (centres (K, D), factors (K, D, D))") from err
    k = centres.shape[0] if centres.ndim == 2 else 0
    if k < 2 or centres.shape != (k, d) or factors.shape != (k, d, d):
        raise ValueError(f"jumps need centres (K, {d}) and factors (K, {d}, {d}) with K >= 2 "
                         f"modes, got shapes {tuple(centres.shape)} and {tuple(factors.shape)}")
    if not (torch.isfinite(centres).all() and torch.isfinite(factors).all()):
        raise ValueError("jumps: centres and factors must be finite")
    if (torch.linalg.slogdet(factors)[0] == 0).any():
        raise ValueError("jumps: every factor must be invertible")
    return centres, factors


def basin_labels(u, centres, factors):
    """Index of the Gaussian ``N(centres[k], factors[k] factors[k]^T)`` densest at each row of
    ``u`` (N, D): the basin a draw belongs to in :func:`hmc`'s mode-jumping moves."""
    from .importance import student_t_log_density

    dens = torch.stack([student_t_log_density(u, c, f) for c, f in zip(centres, factors)])
    return dens.argmax(0)


def map_between_basins(u, centres, factors, here, there):
    """The affine map between basins' Gaussians, row by row: ``u' = c_j + F_j F_i^-1 (u -
    c_i)`` with ``i = here``, ``j = there`` (LongTensors (N,) or ints); it carries
    ``N(c_i, F_i F_i^T)`` onto ``N(c_j, F_j F_j^T)`` and is inverted by swapping them."""
    here = torch.as_tensor(here, device=u.device).expand(u.shape[0])
    there = torch.as_tensor(there, device=u.device).expand(u.shape[0])
    y = torch.linalg.solve(factors[here], (u - centres[here])[:, :, None])
    return centres[there] + (factors[there] @ y)[:, :, 0]


def _mode_jump(u, pot, potential, centres, factors, gen):
    """One mode-jumping Metropolis move per chain (see :func:`hmc`, ``jumps``): returns the new
    positions, the acceptance probabilities, the basin of the new positions and which chains
    moved."""
    k = centres.shape[0]
    here = basin_labels(u, centres, factors)
    offset = torch.randint(1, k, here.shape, generator=gen, device=u.device)
    there = (here + offset) % k
    proposal = map_between_basins(u, centres, factors, here, there)
    with torch.no_grad():
        pot_new = potential(proposal)
    logdet = torch.linalg.slogdet(factors)[1]
    log_ratio = pot - pot_new + logdet[there] - logdet[here]
    consistent = basin_labels(proposal, centres, factors) == there
    log_ratio = torch.where(consistent & torch.isfinite(pot_new), log_ratio,
                            torch.full_like(log_ratio, -math.inf))
    prob = torch.nan_to_num(log_ratio, nan=-math.inf).clamp(max=0.0).exp()
    take = torch.rand(prob.shape, generator=gen, dtype=prob.dtype, device=prob.device) < prob
    u = torch.where(take[:, None], proposal, u)
    return u, prob, torch.where(take, there, here), take


_STATE = ("iteration", "v", "pot", "grad", "eps", "dual_averaging", "scale", "window",
          "window_ends", "rejected_updates", "draws", "accepts", "divergent", "n_steps")


def _load_checkpoint(path, settings, device):
    """Read an HMC checkpoint and check it was written for these ``settings``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = dict(state["settings"])
        saved.setdefault("adapt_metric", True)          # files written before the option
    except Exception as exc:
        raise ValueError(f"HMC checkpoint {path} cannot be read ({exc}); delete it to start "
                         "afresh") from exc
    def same(a, b):
        if not torch.is_tensor(b):
            return a == b
        if not torch.is_tensor(a) or a.shape != b.shape:
            return False
        return torch.allclose(a, b, rtol=1e-6, atol=1e-9) if b.is_floating_point() else \
            torch.equal(a, b)

    # any number of draws from those already made on is one run of that size (the kernel after
    # warm-up does not depend on num_samples): more extend the chains, fewer than the file was
    # written for end an interrupted run early; fewer than it holds would drop draws
    made = len(state.get("draws", ()))
    if made > settings["num_samples"]:
        raise ValueError(f"HMC checkpoint {path} holds {made} draws per chain already, more than "
                         f"the {settings['num_samples']} asked for; ask for at least {made} (or "
                         "delete it to start afresh)")
    differ = [k for k, val in settings.items() if k not in saved
              or (k != "num_samples" and not same(saved[k], val))]
    differ += [k for k in saved if k not in settings]         # e.g. jumps, now left out
    if differ:
        raise ValueError(f"HMC checkpoint {path} was written with other {differ}; delete it or "
                         "choose another path to start afresh")
    generator = state.pop("generator")
    state = tensors_to(state, device)
    state["generator"] = generator
    return state


def _elapsed(since, tensor):
    """Seconds since ``since``, after the device of ``tensor`` has finished its queued work."""
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter() - since


def _adaptation_windows(warmup, init=0.15, term=0.1, first=25):
    """Stan's slow-adaptation windows as (start, end) iterations: doubling lengths from
    ``first`` between an initial ``init`` and a terminal ``term`` fraction of ``warmup``; the
    last window absorbs a remainder shorter than twice its length."""
    start, stop = int(init * warmup), warmup - int(term * warmup)
    if stop - start < first:
        return []
    windows, size = [], first
    while start < stop:
        end = start + size if stop - (start + size) >= 2 * size else stop
        windows.append((start, end))
        start, size = end, 2 * size
    return windows


def _preconditioner(v, dense):
    """Lower-triangular update ``M`` of the coordinates from warm-up draws ``v`` (T, K, D): T
    iterations of K chains in the current coordinates (where the metric is the identity).

    ``M M^T`` is the pooled *within-chain* covariance (each chain centred on its own mean, so
    chains still apart -- started overdispersed, or in different modes -- do not inflate it),
    shrunk towards the identity by ``D / (N + D)`` with N the degrees of freedom -- a few dozen
    autocorrelated draws in ~80 dimensions mis-estimate the extreme eigenvalues badly
    (Marchenko-Pastur), and the current coordinates (Laplace-whitened, then earlier windows) are
    already close to right.  Diagonal when ``dense`` is False.
    """
    t, k, d = v.shape
    eye = torch.eye(d, dtype=v.dtype, device=v.device)
    n = k * (t - 1)
    if n > 0:
        r = (v - v.mean(0)).reshape(-1, d)
        cov = r.T @ r / n
    else:
        cov = eye
    if not dense:
        cov = torch.diag(cov.diagonal())
    lam = d / (n + d)
    return torch.linalg.cholesky((1 - lam) * cov + lam * eye)


def _initial_step_size(potential, u, pot, grad, gen):
    """Per-chain step size where one leapfrog step changes the energy by ~log 2 (doubling or
    halving from 1; Hoffman & Gelman 2014, Algorithm 4).  Unit mass."""
    c = u.shape[0]
    eps = torch.ones(c, dtype=u.dtype, device=u.device)
    p = torch.randn(u.shape, generator=gen, dtype=u.dtype, device=u.device)
    h0 = pot + 0.5 * (p * p).sum(1)

    def delta_h(e):
        pn = p - 0.5 * e[:, None] * grad
        un = u + e[:, None] * pn
        potn, gn = _value_and_grad(potential, un)
        pn = pn - 0.5 * e[:, None] * gn
        return torch.nan_to_num(h0 - potn - 0.5 * (pn * pn).sum(1), nan=-math.inf)

    direction = torch.where(delta_h(eps) > math.log(0.5), 1.0, -1.0).to(u.dtype)
    for _ in range(30):
        dh = delta_h(eps)
        still = torch.where(direction > 0, dh > math.log(0.5), dh <= math.log(0.5))
        if not still.any():
            break
        eps = torch.where(still, eps * 2.0 ** direction, eps)
    return eps


def _dual_averaging_update(state, accept_prob, target, gamma=0.05, t0=10.0, kappa=0.75):
    """One step of Nesterov dual averaging on log(step size), per chain (H&G 2014, Alg. 5)."""
    state["t"] += 1
    t = state["t"]
    state["h_bar"] = (1 - 1 / (t + t0)) * state["h_bar"] + (target - accept_prob) / (t + t0)
    log_eps = state["mu"] - math.sqrt(t) / gamma * state["h_bar"]
    w = t ** (-kappa)
    state["log_eps_bar"] = w * log_eps + (1 - w) * state["log_eps_bar"]
    return log_eps.exp()


"""A normalising flow fitted to a pilot run's draws, to precondition HMC on curved posteriors.

A linear whitening (a pilot's covariance, :func:`difflens.infer.mcmc.pilot_whitening`) makes a
posterior round only if its degeneracies are straight.  On a curved ridge (a banana) the local
width across the ridge is far smaller than the covariance says, so HMC's step is set by the
ridge's narrow width and it crosses the ridge's length by random walk.  NeuTra (Hoffman et al.
2019, "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural transport") runs HMC
instead in the latent space ``z`` of a bijection ``w = f(z)`` under which the posterior is close
to a unit normal, with potential ``U_z(z) = U(f(z)) - log |det df/dz|``: exact for any
bijection, efficient when ``f`` pushes N(0, I) onto the posterior.  Here ``f`` is a RealNVP
stack of affine coupling layers (Dinh et al. 2017) fitted by maximum likelihood to the pilot's
whitened draws ``w`` (rather than by variational inference as in NeuTra: the pilot has already
explored the ridge).  Its last layers start at zero, so an untrained flow is the identity and
HMC falls back to the linear whitening.

Experimental: on lens 3 of docs/real_data_studies.md it did not lengthen the steps (docs/fitting.md,
"A flow fitted to the pilot").
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CouplingFlow", "fit_flow"]


class CouplingFlow(nn.Module):
    """RealNVP bijection ``w = f(z)`` of R^D: affine coupling layers with random splits.

    Layer k keeps the coordinates in its mask ``m_k`` and maps the others as
    ``w_b = z_b * exp(s(z_a)) + t(z_a)`` (Dinh et al. 2017, eq. 7), with ``s, t`` one small
    MLP and ``s`` bounded by ``scale_bound * tanh``; ``log |det df/dz| = sum s``.

    Parameters
    ----------
    dim : int
        D, the number of (whitened, unconstrained) parameters.
    layers : int
        Coupling layers; every coordinate is transformed by about half of them.
    hidden : int
        Width of each layer's two-layer MLP.
    scale_bound : float
        Bound on each layer's log-scale ``|s|``, so no layer stretches a coordinate by more
        than ``exp(scale_bound)``.
    seed : int
        Seeds the masks and the initial weights.
    """

    def __init__(self, dim: int, layers: int = 6, hidden: int = 64, scale_bound: float = 2.0,
                 seed: int = 0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling flow needs dim >= 2, got {dim}")
        if layers < 1 or hidden < 1 or scale_bound <= 0:
            raise ValueError("layers and hidden must be >= 1 and scale_bound > 0")
        gen = torch.Generator().manual_seed(seed)
        masks = []
        for k in range(layers):
            if k % 2 == 0:            # a fresh random half; the next layer maps its complement
                mask = torch.zeros(dim, dtype=torch.bool)
                mask[torch.randperm(dim, generator=gen)[: dim // 2]] = True
            else:
                mask = ~masks[-1]
            masks.append(mask)
        self.register_buffer("masks", torch.stack(masks))
        self.scale_bound = float(scale_bound)
        self.nets = nn.ModuleList()
        with torch.random.fork_rng(devices=[]):      # seeded weights, global RNG untouched
            torch.manual_seed(int(torch.randint(2**31 - 1, (), generator=gen)))
            for _ in range(layers):
                net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                                    nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, 2 * dim))
                nn.init.zeros_(net[-1].weight)
                nn.init.zeros_(net[-1].bias)
                self.nets.append(net)

    def _shift_scale(self, k, x):
        mask = self.masks[k]
        s, t = self.nets[k](x * mask).chunk(2, dim=-1)
        s = self.scale_bound * torch.tanh(s / self.scale_bound)
        keep = mask.to(x.dtype)
        return s * (1 - keep), t * (1 - keep)          # the kept half passes unchanged

    def forward(self, z):
        """``w = f(z)`` and ``log |det df/dz|``; ``z`` of shape ``(..., D)``."""
        logdet = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for k in range(len(self.nets)):
            s, t = self._shift_scale(k, z)
            z = z * torch.exp(s) + t
            logdet = logdet + s.sum(-1)
        return z, logdet

    def inverse(self, w):
        """``z = f^{-1}(w)`` and ``log |det df^{-1}/dw|``."""
        logdet = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
        for k in reversed(range(len(self.nets))):
            s, t = self._shift_scale(k, w)           # depends on the kept half only
            w = (w - t) * torch.exp(-s)
            logdet = logdet - s.sum(-1)
        return w, logdet

    def log_prob(self, w):
        """Log density of ``w`` when ``z = f^{-1}(w)`` is a unit normal (change of variables)."""
        z, logdet = self.inverse(w)
        return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi) + logdet


def fit_flow(w, *, holdout=None, layers=6, hidden=64, steps=3000, lr=1e-3, batch=512,
             weight_decay=1e-4, seed=0, progress=False) -> tuple[CouplingFlow, dict]:
    """Fit a :class:`CouplingFlow` to draws ``w`` by maximum likelihood (Adam).

    The draws should already be whitened (zero mean, about unit covariance, e.g. by a pilot's
    Cholesky factor), so the flow only has to learn the curvature.  The weights with the best
    mean log density on ``holdout`` are kept (early stopping), so a flow that overfits a short,
    correlated pilot falls back to an earlier, smoother one -- down to the identity.

    Parameters
    ----------
    w : Tensor (N, D)
        Training draws.
    holdout : Tensor (M, D), optional
        Validation draws (e.g. other chains of the pilot).  Default: the last fifth of ``w``.
    layers, hidden : int
        As in :class:`CouplingFlow`.
    steps, lr, batch, weight_decay : training settings.
    seed : int
    progress : bool
        A progress bar with the held-out log density.

    Returns
    -------
    flow : CouplingFlow
        In ``w``'s dtype, on the CPU, in eval mode, gradients off.
    info : dict
        ``holdout_logp`` of the identity (the unit normal) and of the fitted flow (mean log
        density per draw, nats) and ``best_step``.
    """
    w = torch.as_tensor(w).detach().cpu()
    if w.ndim != 2 or w.shape[0] < 2:
        raise ValueError(f"w must have shape (N >= 2, D), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("draws to fit a flow to must be finite")
    if holdout is None:
        cut = max(1, (4 * w.shape[0]) // 5)
        w, holdout = w[:cut], w[cut:] if cut < w.shape[0] else w[-1:]
    holdout = torch.as_tensor(holdout, dtype=w.dtype).detach().cpu()
    flow = CouplingFlow(w.shape[1], layers=layers, hidden=hidden, seed=seed).to(w.dtype)
    opt = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def held_out():
        with torch.no_grad():
            return float(flow.log_prob(holdout).mean())

    best, best_step = held_out(), 0
    identity = best
    best_state = {k: v.clone() for k, v in flow.state_dict().items()}
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="flow fit", leave=False)
    for step in bar:
        idx = torch.randint(w.shape[0], (min(batch, w.shape[0]),), generator=gen)
        loss = -flow.log_prob(w[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            score = held_out()
            if score > best:
                best, best_step = score, step + 1
                best_state = {k: v.clone() for k, v in flow.state_dict().items()}
            if progress:
                bar.set_postfix(holdout_logp=f"{score:.2f}", best=f"{best:.2f}")
    flow.load_state_dict(best_state)
    flow.eval()
    for p in flow.parameters():
        p.requires_grad_(False)
    return flow, {"holdout_logp_identity": identity, "holdout_logp": best, "best_step": best_step}

"""Importance sampling over several modes (difflens.infer.importance) against closed forms and
direct numerical integration."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from difflens.infer.importance import mixture_importance, sample_modes, student_t_log_density
from difflens.model import LensModel

from .test_model_and_inference import (moments_match_grid, posterior_on_grid, small_problem,
                                       two_parameter_problem)

F64 = dict(dtype=torch.float64)


def test_student_t_density_matches_scipy():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 3, generator=gen, **F64)
    factor = torch.linalg.cholesky(a @ a.T + torch.eye(3, **F64))
    centre = torch.tensor([0.3, -1.0, 2.0], **F64)
    x = torch.randn(5, 3, generator=gen, **F64)
    cov = (factor @ factor.T).numpy()
    ours = student_t_log_density(x, centre, factor, df=4.0).numpy()
    ref = stats.multivariate_t(centre.numpy(), cov, df=4.0).logpdf(x.numpy())
    assert np.allclose(ours, ref, atol=1e-10)
    ours = student_t_log_density(x, centre, factor).numpy()
    assert np.allclose(ours, stats.multivariate_normal(centre.numpy(), cov).logpdf(x.numpy()))


def _two_gaussians(d, seed):
    """Z (0.8 N(m1, L1 L1^T) + 0.2 N(m2, L2 L2^T)) with Z = e^3: means, factors, the potential
    -log of it, and the generator that drew L1 (for further draws)."""
    gen = torch.Generator().manual_seed(seed)
    m1, m2 = torch.zeros(d, **F64), torch.full((d,), 0.8, **F64)
    a = 0.1 * torch.randn(d, d, generator=gen, **F64) + torch.eye(d, **F64)
    l1 = torch.linalg.cholesky(0.01 * a @ a.T)
    l2 = math.sqrt(0.02) * torch.eye(d, **F64)

    def potential(x):
        return -(3.0 + torch.logaddexp(math.log(0.8) + student_t_log_density(x, m1, l1),
                                       math.log(0.2) + student_t_log_density(x, m2, l2)))
    return m1, m2, l1, l2, potential, gen


def test_two_separated_modes_get_their_weights_and_the_evidence():
    """Target: Z (0.8 N(m1, S1) + 0.2 N(m2, S2)) in 20 dimensions, Z = e^3, modes 40 sd apart
    (no chain would cross).  Proposals at the exact modes with the exact covariances."""
    d = 20
    m1, m2, l1, l2, potential, _ = _two_gaussians(d, seed=0)
    draws, log_w, labels = mixture_importance(potential, [m1, m2], [l1, l2], 4000, df=5.0,
                                              scale=1.2, seed=3)
    assert draws.shape == (4000, d) and log_w.shape == labels.shape == (4000,)
    log_z = np.logaddexp.reduce(log_w) - math.log(4000)
    assert log_z == pytest.approx(3.0, abs=0.05)
    w = np.exp(log_w - log_w.max())
    assert w[labels == 1].sum() / w.sum() == pytest.approx(0.2, abs=0.02)
    # each component's draws are labelled to it (the modes are far apart)
    assert (labels[:2000] == 0).all() and (labels[2000:] == 1).all()
    # a proposal that misses the second mode weighs it at zero: what pareto_k is for
    _, log_w1, _ = mixture_importance(potential, [m1], [l1], 2000, seed=3)
    assert np.logaddexp.reduce(log_w1) - math.log(2000) == pytest.approx(3 + math.log(0.8),
                                                                           abs=0.05)


def test_mixture_importance_rejects_bad_input():
    c, f = torch.zeros(2, **F64), torch.eye(2, **F64)
    with pytest.raises(ValueError, match="one factor per centre"):
        mixture_importance(lambda x: x.sum(-1), [c, c], [f], 10)
    with pytest.raises(ValueError, match="num_samples"):
        mixture_importance(lambda x: x.sum(-1), [c], [f], 1)
    with pytest.raises(ValueError, match="scale and df"):
        mixture_importance(lambda x: x.sum(-1), [c], [f], 10, scale=-1.0)


def test_sample_modes_evidence_and_moments_match_the_posterior_integrated_on_a_grid():
    """One mode of a two-parameter lens posterior (r_ein, gamma; the rest held): the evidence,
    means and sds from sample_modes against direct numerical integration on a grid."""
    model, init = two_parameter_problem()
    mix = sample_modes(model, [init], num_samples=3000, seed=2)
    assert mix.pareto_k < 0.5 and mix.ess > 1000
    assert mix.mode_weights.tolist() == [1.0]
    draws = {k: mix.posterior.idata.posterior[k].values.reshape(-1) for k in ("r_ein", "gamma")}
    assert draws["r_ein"].shape == (3000,)
    rr, gg, logp = posterior_on_grid(model, draws, sds=7.0, n=121)
    r, g = rr[:, 0], gg[0]
    log_z = np.logaddexp.reduce(logp.ravel()) + math.log((r[1] - r[0]) * (g[1] - g[0]))
    assert mix.log_evidence == pytest.approx(log_z, abs=0.03)
    assert mix.laplace_log_evidence[0] == pytest.approx(log_z, abs=0.2)
    moments_match_grid(draws, rr, gg, logp)
    summary = mix.summary()
    assert summary["reliable"] and len(summary["modes"]) == 1


def test_sample_modes_rejects_bad_input():
    sim, _, data = small_problem(npix=16, pixscale=0.16)
    model = LensModel(data, 0.02, sim, source="sersic")
    with pytest.raises(ValueError, match="at least one mode"):
        sample_modes(model, [])


def test_basin_log_ratios_weigh_two_basins_from_draws_within_each():
    """Exact draws from each component of 0.8 N(m1, S1) + 0.2 N(m2, S2) in 20 dimensions,
    labelled by component: the bridge gives log(0.2 / 0.8) with Gaussians fitted to the draws,
    and still does (less precisely) with Gaussians that are too wide and shifted."""
    from difflens.infer.importance import basin_log_ratios

    d = 20
    m1, m2, l1, l2, potential, gen = _two_gaussians(d, seed=4)
    x = torch.cat([m1 + torch.randn(3000, d, generator=gen, **F64) @ l1.T,
                   m2 + torch.randn(1000, d, generator=gen, **F64) @ l2.T])
    labels = torch.cat([torch.zeros(3000, dtype=torch.long), torch.ones(1000, dtype=torch.long)])
    fitted = [torch.linalg.cholesky(torch.cov(x[labels == b].T)) for b in (0, 1)]
    centres = torch.stack([x[labels == b].mean(0) for b in (0, 1)])
    log_r = basin_log_ratios(potential, x, labels, centres, torch.stack(fitted))
    assert log_r[0] == 0.0 and log_r[1] == pytest.approx(math.log(0.25), abs=0.05)
    rough = basin_log_ratios(potential, x, labels, centres + 0.02,
                             torch.stack([1.3 * f for f in fitted]))
    assert rough[1] == pytest.approx(math.log(0.25), abs=0.15)
    with pytest.raises(ValueError, match="every basin needs draws"):
        basin_log_ratios(potential, x, torch.zeros(4000, dtype=torch.long), centres,
                         torch.stack(fitted))

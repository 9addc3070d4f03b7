import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from difflens.infer import fit_map, sample_posterior
from difflens.infer.map import summarise_map
from difflens.model import (LensModel, Priors, TruncatedNormal, ellipticity_to_q_phi,
                            q_phi_to_ellipticity)
from difflens.simulate import Simulator
from difflens.sources import Sersic

LENS = dict(r_ein=1.1, q=0.8, phi=0.4, gamma=2.05, x0=0.03, y0=-0.02, g1=0.02, g2=-0.01)
SRC = dict(amp=2.0, r_e=0.2, n=1.2, q=0.7, phi=0.8, x0=0.06, y0=0.03)


def truth_sites():
    e1, e2 = q_phi_to_ellipticity(LENS["q"], LENS["phi"])
    se1, se2 = q_phi_to_ellipticity(SRC["q"], SRC["phi"])
    t = {k: torch.tensor(LENS[k], dtype=torch.float64)
         for k in ("r_ein", "gamma", "x0", "y0", "g1", "g2")}
    t.update(e1=e1, e2=e2)
    t.update({"src_" + k: torch.tensor(SRC[k], dtype=torch.float64)
              for k in ("amp", "r_e", "n", "x0", "y0")})
    t.update(src_e1=se1, src_e2=se2)
    return t


def small_problem(npix=24, pixscale=0.12, noise=0.02, seed=0):
    sim = Simulator(npix=npix, pixel_scale=pixscale, psf_sigma=0.1, dtype=torch.float64)
    clean = sim.image(LENS, Sersic(**SRC))
    g = torch.Generator().manual_seed(seed)
    data = clean + noise * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return sim, clean, data


def test_ellipticity_map_round_trip_and_bound():
    q, phi = ellipticity_to_q_phi(*q_phi_to_ellipticity(0.37, -1.1))
    assert float(q) == pytest.approx(0.37) and float(phi) == pytest.approx(-1.1)
    q, _ = ellipticity_to_q_phi(torch.tensor(50.0), torch.tensor(-80.0))
    assert float(q) >= 0.1
    q_plus, phi_plus = ellipticity_to_q_phi(*q_phi_to_ellipticity(0.6, 0.3 + math.pi))
    assert float(phi_plus) == pytest.approx(0.3)          # phi and phi + pi are one point


def test_unwrap_angle_keeps_draws_near_pi_over_2_together():
    from difflens.model import unwrap_angle

    draws = torch.tensor([1.55, -1.56, 1.57, -1.55], dtype=torch.float64)   # one mode at pi/2
    out = unwrap_angle(draws, 1.56)
    assert float(out.max() - out.min()) < 0.05
    torch.testing.assert_close(torch.cos(2 * out), torch.cos(2 * draws))   # same ellipses


def test_truncated_normal_density_and_samples():
    d = TruncatedNormal(2.0, 0.25, 1.2, 2.8)
    x = torch.linspace(1.3, 2.7, 5, dtype=torch.float64)
    ref = stats.truncnorm((1.2 - 2) / 0.25, (2.8 - 2) / 0.25, loc=2, scale=0.25).logpdf(x.numpy())
    np.testing.assert_allclose(d.log_prob(x).numpy(), ref, rtol=1e-6)
    s = d.sample((20000,))
    assert s.min() >= 1.2 and s.max() <= 2.8 and float(s.mean()) == pytest.approx(2.0, abs=0.01)


def test_log_density_equals_hand_computation():
    sim, clean, data = small_problem(npix=8, pixscale=0.4)
    priors = Priors.default("sersic")
    model = LensModel(data, 0.05, sim, source="sersic", priors=priors)
    t = truth_sites()
    tr = pyro.poutine.trace(pyro.poutine.condition(model, data=t)).get_trace()
    got = float(tr.log_prob_sum())
    # by hand: scipy densities of every prior + the Gaussian likelihood of the simulated image
    logp = 0.0
    for k, d in list(priors.lens.items()) + [("src_" + k, v) for k, v in priors.source.items()]:
        v = float(t[k])
        if isinstance(d, dist.Normal):
            logp += stats.norm(float(d.loc), float(d.scale)).logpdf(v)
        elif isinstance(d, dist.Uniform):
            logp += stats.uniform(float(d.low), float(d.high - d.low)).logpdf(v)
        elif isinstance(d, dist.LogNormal):
            logp += stats.lognorm(float(d.scale), scale=math.exp(float(d.loc))).logpdf(v)
        elif isinstance(d, TruncatedNormal):
            a, b = (float(d.low) - float(d.loc)) / float(d.scale), (float(d.high) - float(d.loc)) / float(d.scale)
            logp += stats.truncnorm(a, b, loc=float(d.loc), scale=float(d.scale)).logpdf(v)
        else:
            raise AssertionError(type(d))
    logp += stats.norm(clean.numpy(), 0.05).logpdf(data.numpy()).sum()
    assert got == pytest.approx(logp, rel=1e-9)


def test_masked_pixels_do_not_change_the_posterior():
    sim, _, data = small_problem(npix=8, pixscale=0.4)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[2, 3] = False
    changed = data.clone()
    changed[2, 3] += 100.0
    t = truth_sites()
    lp = [float(pyro.poutine.trace(pyro.poutine.condition(
        LensModel(d, 0.05, sim, source="sersic", mask=mask), data=t)).get_trace().log_prob_sum())
        for d in (data, changed)]
    assert lp[0] == pytest.approx(lp[1])


def test_map_recovers_noiseless_lens():
    sim, clean, _ = small_problem(npix=32, pixscale=0.1)
    model = LensModel(clean, 0.01, sim, source="sersic")
    start = {k: v * 1.05 if k in ("r_ein", "gamma", "src_r_e") else v
             for k, v in truth_sites().items()}
    res = fit_map(model, steps=600, restarts=2, restart_steps=100, init=start, progress=False)
    for k in ("r_ein", "q", "gamma"):
        assert res.lens()[k] == pytest.approx(LENS[k], rel=0.01), k
    assert abs(res.lens()["phi"] - LENS["phi"]) < 0.02
    assert res.reduced_chi2 < 0.05                       # noiseless data, sigma 0.01
    assert res.log_posterior >= summarise_map(model, truth_sites()).log_posterior - 1.0


def test_short_nuts_converges_on_low_dimensional_problem():
    sim, _, data = small_problem(npix=16, pixscale=0.16, noise=0.02)
    fixed = Priors.default("sersic")
    t = truth_sites()
    for k in ("e1", "e2", "x0", "y0", "g1", "g2"):
        fixed.lens[k] = float(t[k])
    for k in ("r_e", "n", "e1", "e2", "x0", "y0"):
        fixed.source[k] = float(t["src_" + k])
    model = LensModel(data, 0.02, sim, source="sersic", priors=fixed)
    init = {k: t[k] for k in ("r_ein", "gamma", "src_amp")}
    post = sample_posterior(model, init, num_samples=200, warmup=100, chains=4, seed=1,
                            progress=False)
    # independent draws give R-hat < 1.01 at this size; chains that each travel a different
    # trajectory length (a shared leapfrog count with per-chain step sizes) gave 1.10
    for k in ("r_ein", "gamma"):
        assert post.rhat[k] < 1.03, (k, post.rhat[k])
    assert post.idata.posterior["q"].shape == (4, 200)
    lo, hi = post.interval("r_ein", 0.99)
    assert lo < LENS["r_ein"] < hi


def test_model_bad_input():
    sim, _, data = small_problem(npix=8, pixscale=0.4)
    with pytest.raises(ValueError, match="shape"):
        LensModel(data[:4], 0.05, sim, source="sersic")
    with pytest.raises(ValueError, match="positive"):
        LensModel(data, -0.05, sim, source="sersic")
    with pytest.raises(ValueError, match="noise map shape"):
        LensModel(data, torch.ones(3, 3), sim, source="sersic")
    bad = data.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        LensModel(bad, 0.05, sim, source="sersic")
    with pytest.raises(ValueError, match="preset"):
        Priors.preset("bogus")


def test_map_is_reproducible_from_its_seed_whatever_ran_before():
    from difflens.sources.vae import load_default_vae

    sim, _, data = small_problem(npix=16, pixscale=0.16, noise=0.02)
    # VAE source: the first restart draws its unset sites (half-width s) from the prior
    model = LensModel(data, 0.02, sim, source=load_default_vae())
    prior_mean = model.z_prior.mean.clone()
    init = {"r_ein": torch.tensor(1.0, dtype=torch.float64)}
    first = fit_map(model, steps=30, restarts=1, restart_steps=20, polish_steps=0, init=init,
                    progress=False)
    # the optimiser must not move the latent prior or the caller's init in place
    assert torch.equal(model.z_prior.mean, prior_mean)
    assert float(init["r_ein"]) == 1.0
    first = fit_map(model, steps=30, restarts=2, restart_steps=20, polish_steps=0, seed=5,
                    progress=False)
    pyro.sample("unrelated", dist.Normal(0.0, 1.0))     # consume the global RNG in between
    torch.rand(7)
    second = fit_map(model, steps=30, restarts=2, restart_steps=20, polish_steps=0, seed=5,
                     progress=False)
    assert first.restart_losses == second.restart_losses       # restarts drawn from the prior
    for k in ("r_ein", "gamma", "src_amp"):
        assert float(first.params[k]) == float(second.params[k]), k


def two_parameter_problem():
    """A lens posterior over r_ein and gamma only (every other site held at its truth), and
    those two sites' truths."""
    sim, _, data = small_problem(npix=16, pixscale=0.16, noise=0.02)
    held = Priors.default("sersic")
    t = truth_sites()
    for k in ("e1", "e2", "x0", "y0", "g1", "g2"):
        held.lens[k] = float(t[k])
    for k in ("amp", "r_e", "n", "e1", "e2", "x0", "y0"):
        held.source[k] = float(t["src_" + k])
    model = LensModel(data, 0.02, sim, source="sersic", priors=held)
    return model, {k: t[k] for k in ("r_ein", "gamma")}


def posterior_on_grid(model, draws, sds=6.0, n=81):
    """The log posterior density of the constrained (r_ein, gamma) (no Jacobian) on an n x n
    grid of +-``sds`` sd of ``draws`` around their mean: ``(rr, gg, logp)``."""
    from difflens.infer.hmc import FlatSites

    space = FlatSites(model)
    density = space.potential(model, jacobian=False)
    m, s = {k: draws[k].mean() for k in draws}, {k: draws[k].std() for k in draws}
    r = np.linspace(m["r_ein"] - sds * s["r_ein"], m["r_ein"] + sds * s["r_ein"], n)
    g = np.linspace(m["gamma"] - sds * s["gamma"], m["gamma"] + sds * s["gamma"], n)
    rr, gg = np.meshgrid(r, g, indexing="ij")
    rows = torch.stack([space.flatten({"r_ein": a, "gamma": b})
                        for a, b in zip(rr.ravel(), gg.ravel())])
    with torch.no_grad():
        logp = -density(rows).numpy().reshape(rr.shape)
    return rr, gg, logp


def moments_match_grid(draws, rr, gg, logp):
    """Assert the draws' means (within 0.1 sd) and sds (6%) of r_ein and gamma are those of
    the grid posterior of :func:`posterior_on_grid`; return its normalised weights."""
    w = np.exp(logp - logp.max())
    w /= w.sum()
    for k, x in (("r_ein", rr), ("gamma", gg)):
        mean = (w * x).sum()
        sd = math.sqrt((w * (x - mean) ** 2).sum())
        assert abs(draws[k].mean() - mean) < 0.1 * sd, k
        assert draws[k].std() == pytest.approx(sd, rel=0.06), k
    return w


def test_laplace_draws_match_the_posterior_integrated_on_a_grid():
    """Mean and sd of r_ein and gamma from sample_laplace against the posterior computed by
    direct numerical integration over a (r_ein, gamma) grid, the other parameters held."""
    from difflens.infer import sample_laplace

    model, init = two_parameter_problem()
    # 16000 draws: the covariance of 4000 scatters by ~10% between seeds (0.89-1.21 of the
    # grid's over seeds 0-7), too close to the 15% asked below; of 16000, 0.95-1.08
    post = sample_laplace(model, init, num_samples=16000, seed=3)
    draws = {k: post.idata.posterior[k].values.reshape(-1) for k in ("r_ein", "gamma")}
    assert draws["r_ein"].shape == (16000,)
    rr, gg, logp = posterior_on_grid(model, draws)
    w = moments_match_grid(draws, rr, gg, logp)
    # and the two are correlated as on the grid
    c_grid = (w * (rr - (w * rr).sum()) * (gg - (w * gg).sum())).sum()
    c_draw = np.cov(draws["r_ein"], draws["gamma"])[0, 1]
    assert c_draw == pytest.approx(c_grid, rel=0.15)


def test_laplace_rejects_bad_input():
    from difflens.infer import sample_laplace

    sim, _, data = small_problem(npix=16, pixscale=0.16)
    model = LensModel(data, 0.02, sim, source="sersic")
    with pytest.raises(ValueError, match="num_samples"):
        sample_laplace(model, truth_sites(), num_samples=0)

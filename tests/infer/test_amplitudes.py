"""Amplitudes integrated out analytically: the marginal likelihood against direct numerical
integration over the amplitudes, the model wiring, and a fit that recovers light and mass."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from difflens.infer import sample_posterior
from difflens.infer.mcmc import amplitude_draws
from difflens.instrument import marginal_log_likelihood
from difflens.model import LensModel, LinearAmplitude, Priors, TruncatedNormal
from difflens.simulate import Simulator
from difflens.sources import Sersic

from .test_lens_light import LENS, LIGHT, SRC, _sites


def _grid_integral(log_f, axes):
    """log of the integral of exp(log_f) over a regular grid (trapezoid weights)."""
    weights = 1.0
    for k, a in enumerate(axes):
        w = np.full(a.size, a[1] - a[0])
        w[[0, -1]] *= 0.5
        shape = [1] * len(axes)
        shape[k] = a.size
        weights = weights * w.reshape(shape)
    return float(torch.logsumexp(torch.as_tensor(log_f + np.log(weights)).reshape(-1), 0))


def test_marginal_likelihood_matches_numerical_integration():
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    templates = torch.rand(2, 6, 5, generator=g, **f64)
    sigma = 0.5 + torch.rand(6, 5, generator=g, **f64)          # a noise map
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, :2] = False
    data = 1.3 * templates[0] - 0.4 * templates[1] + 0.3 * torch.randn(6, 5, generator=g, **f64)
    data[0, 0] = 50.0                                            # masked: must not matter
    mu, sd = torch.tensor([0.5, 0.0], **f64), torch.tensor([2.0, 1.0], **f64)
    logz, mean, cov = marginal_log_likelihood(templates, data, sigma, mu, sd, mask)

    # brute force: the joint density on a fine grid of (a1, a2), integrated numerically
    a1, a2 = np.linspace(-6.0, 8.0, 561), np.linspace(-8.0, 6.0, 561)
    A1, A2 = (torch.as_tensor(v) for v in np.meshgrid(a1, a2, indexing="ij"))
    model = A1[..., None, None] * templates[0] + A2[..., None, None] * templates[1]
    loglik = dist.Normal(model, sigma).log_prob(data).masked_fill(~mask, 0.0).sum((-2, -1))
    logp = loglik + dist.Normal(mu[0], sd[0]).log_prob(A1) + dist.Normal(mu[1], sd[1]).log_prob(A2)
    ref = _grid_integral(logp.numpy(), (a1, a2))
    assert float(logz) == pytest.approx(ref, abs=1e-6)
    post = torch.exp(logp - ref).numpy() * (a1[1] - a1[0]) * (a2[1] - a2[0])
    m1, m2 = (post * A1.numpy()).sum(), (post * A2.numpy()).sum()
    np.testing.assert_allclose(mean.numpy(), [m1, m2], atol=1e-6)
    c12 = (post * (A1.numpy() - m1) * (A2.numpy() - m2)).sum()
    c11 = (post * (A1.numpy() - m1) ** 2).sum()
    np.testing.assert_allclose([cov[0, 0], cov[0, 1]], [c11, c12], atol=1e-6)

    # a leading batch of template sets gives one value per set
    batch = torch.stack([templates, 2.0 * templates])
    logz_b, mean_b, cov_b = marginal_log_likelihood(batch, data, sigma, mu, sd, mask)
    assert logz_b.shape == (2,) and mean_b.shape == (2, 2) and cov_b.shape == (2, 2, 2)
    assert float(logz_b[0]) == pytest.approx(float(logz), rel=1e-12)
    with pytest.raises(ValueError, match="prior_mean and prior_sd of shape"):
        marginal_log_likelihood(templates, data, sigma, mu[:1], sd[:1])


def _sim():
    return Simulator(npix=12, pixel_scale=0.25, psf_sigma=0.15, dtype=torch.float64)


def _truth_image(sim):
    return sim.image(LENS, Sersic(**SRC), [Sersic(x0=LENS["x0"], y0=LENS["y0"], **LIGHT)])


def test_model_marginal_equals_integral_of_the_sampled_model():
    """The marginalised model's likelihood factor is the sampled model's likelihood times the
    amplitude priors, integrated over both amplitudes on a grid."""
    sim = _sim()
    g = torch.Generator().manual_seed(1)
    sigma = 0.05
    data = _truth_image(sim) + sigma * torch.randn(12, 12, generator=g, dtype=torch.float64)
    prior = {"src_amp": (1.0, 1.0), "light0_amp": (0.3, 0.5)}
    sampled = Priors.default("sersic", lens_light=1)
    sampled.source["amp"] = dist.Normal(torch.tensor(1.0, dtype=torch.float64), 1.0)
    sampled.lens_light[0]["amp"] = dist.Normal(torch.tensor(0.3, dtype=torch.float64), 0.5)
    marg = sampled.with_amplitudes_marginalised()
    assert marg.source["amp"] == LinearAmplitude(*prior["src_amp"])
    sites = {k: v for k, v in _sites().items() if k not in prior}

    m_model = LensModel(data, sigma, sim, source="sersic", priors=marg)
    assert m_model.linear_sites == ("src_amp", "light0_amp")
    tr = pyro.poutine.trace(pyro.poutine.condition(m_model, data=sites)).get_trace()
    tr.compute_log_prob()
    assert "src_amp" not in m_model.site_names()
    marginal = float(tr.nodes["obs"]["log_prob_sum"])

    a_src = np.linspace(SRC["amp"] - 0.25, SRC["amp"] + 0.25, 301)
    a_light = np.linspace(LIGHT["amp"] - 0.08, LIGHT["amp"] + 0.08, 301)
    A, B = (torch.as_tensor(v) for v in np.meshgrid(a_src, a_light, indexing="ij"))
    s_model = LensModel(data, sigma, sim, source="sersic", priors=sampled)
    grid = dict(sites, src_amp=A.reshape(-1), light0_amp=B.reshape(-1))
    tr_s = pyro.poutine.trace(pyro.poutine.condition(s_model, data=grid)).get_trace()
    logp = (tr_s.nodes["obs"]["fn"].log_prob(data)
            + tr_s.nodes["src_amp"]["fn"].log_prob(grid["src_amp"])
            + tr_s.nodes["light0_amp"]["fn"].log_prob(grid["light0_amp"]))
    ref = _grid_integral(logp.reshape(A.shape).numpy(), (a_src, a_light))
    assert marginal == pytest.approx(ref, abs=1e-4)

    # the recorded amplitudes are the conditional means, and the model image is drawn with them
    post = torch.exp(logp - ref).reshape(A.shape) * (a_src[1] - a_src[0]) * (a_light[1] - a_light[0])
    for name, grid_values in (("src_amp", A), ("light0_amp", B)):
        assert float(tr.nodes[name]["value"]) == pytest.approx(float((post * grid_values).sum()),
                                                               abs=1e-5)
    amps = {k: tr.nodes[k]["value"] for k in m_model.linear_sites}
    image = sim.image(LENS, Sersic(**dict(SRC, amp=amps["src_amp"])),
                      [Sersic(x0=LENS["x0"], y0=LENS["y0"], **dict(LIGHT, amp=amps["light0_amp"]))])
    torch.testing.assert_close(tr.nodes["model_image"]["value"], image)
    light = m_model.lens_light_image(sites)
    ref_light = sim.image(None, None, [Sersic(x0=LENS["x0"], y0=LENS["y0"],
                                              **dict(LIGHT, amp=amps["light0_amp"]))])
    torch.testing.assert_close(light, ref_light)


def test_a_fixed_amplitude_stays_in_the_image_and_others_are_solved():
    sim = _sim()
    data = _truth_image(sim)
    priors = Priors.default("sersic", lens_light=1).with_amplitudes_marginalised()
    priors.lens_light[0]["amp"] = LIGHT["amp"]                  # held fixed: not marginalised
    model = LensModel(data, 1e-3, sim, source="sersic", priors=priors)
    assert model.linear_sites == ("src_amp",)
    sites = {k: v for k, v in _sites().items() if not k.endswith("amp")}
    tr = pyro.poutine.trace(pyro.poutine.condition(model, data=sites)).get_trace()
    # noise-free data and a broad prior: the solved amplitude is the true one
    assert float(tr.nodes["src_amp"]["value"]) == pytest.approx(SRC["amp"], rel=1e-4)
    torch.testing.assert_close(tr.nodes["model_image"]["value"], data, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="each not a site"):
        model.with_fixed({"src_amp": 1.0})


def test_truncated_normal_moments_match_numerical_integration():
    d = TruncatedNormal(1.0, 0.5, 0.2, 4.0)
    x = torch.linspace(0.2, 4.0, 200001, dtype=torch.float64)
    p = torch.exp(d.log_prob(x))
    mean = torch.trapezoid(p * x, x)
    var = torch.trapezoid(p * (x - mean) ** 2, x)
    assert float(d.mean) == pytest.approx(float(mean), rel=1e-8)
    assert float(d.variance) == pytest.approx(float(var), rel=1e-7)
    assert float(d.stddev) == pytest.approx(math.sqrt(float(var)), rel=1e-7)


def test_linear_amplitude_rejects_a_bad_prior():
    with pytest.raises(ValueError, match="sd > 0"):
        LinearAmplitude(1.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        LinearAmplitude(float("nan"), 1.0)


def test_amplitude_draws_follow_their_conditional_gaussian_and_reach_the_posterior():
    sim = _sim()
    g = torch.Generator().manual_seed(2)
    data = _truth_image(sim) + 0.05 * torch.randn(12, 12, generator=g, dtype=torch.float64)
    priors = Priors.default("sersic", lens_light=1).with_amplitudes_marginalised()
    model = LensModel(data, 0.05, sim, source="sersic", priors=priors)
    sites = {k: v for k, v in _sites().items() if not k.endswith("amp")}
    mean, cov = model.amplitude_posterior(sites)
    # 4000 posterior "draws" all at the same parameters: the amplitude draws must scatter
    # around the conditional mean with the conditional covariance
    posterior = {k: np.full((2, 2000), float(v)) for k, v in sites.items()}
    draws = amplitude_draws(model, posterior, seed=0, chunk=500)
    assert set(draws) == {"src_amp", "light0_amp"} and draws["src_amp"].shape == (2, 2000)
    x = np.stack([draws["src_amp"].ravel(), draws["light0_amp"].ravel()])
    sd = np.sqrt(np.diag(cov.numpy()))
    assert (np.abs(x.mean(1) - mean.numpy()) < 4 * sd / np.sqrt(4000)).all()
    np.testing.assert_allclose(np.cov(x), cov.numpy(), rtol=0.1, atol=0.1 * sd.prod())
    # and the sampler's posterior carries them beside the sampled sites
    init = {k: v for k, v in _sites().items() if k in model.site_names()}
    post = sample_posterior(model, init, num_samples=10, warmup=10, chains=2, progress=False)
    assert post.idata.posterior["light0_amp"].shape == (2, 10)

"""The pixel correction integrated out (difflens.infer.evidence) against brute force: the image
is linear in the correction, so the data are Gaussian with covariance N + G G^T, whose density
is evaluated directly from columns of G made by the simulator itself."""
import numpy as np
import pyro
import pytest
import torch

from difflens.infer.evidence import correction_evidence, correction_response
from difflens.model import LensModel, Priors, q_phi_to_ellipticity
from difflens.simulate import Simulator
from difflens.sources.vae import load_default_vae

LENS = dict(r_ein=0.5, q=0.7, phi=0.4, gamma=2.1, x0=0.02, y0=-0.03, g1=0.03, g2=-0.01)


@pytest.fixture(scope="module")
def vae():
    return load_default_vae().double()


def _sites(model, n):
    e1, e2 = q_phi_to_ellipticity(torch.tensor(LENS["q"]), torch.tensor(LENS["phi"]))
    v = {k: torch.tensor(x, dtype=torch.float64) for k, x in LENS.items() if k not in ("q", "phi")}
    v.update(e1=e1.double(), e2=e2.double(), src_x0=torch.tensor(0.04, dtype=torch.float64),
             src_y0=torch.tensor(-0.02, dtype=torch.float64),
             src_s=torch.tensor(0.35, dtype=torch.float64),
             src_amp=torch.tensor(1.3, dtype=torch.float64))
    v["z"] = model.z_prior.mean + 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(1),
                                                    dtype=torch.float64)
    v["src_correction"] = torch.zeros(n * n, dtype=torch.float64)
    return v


def _model(vae, n, sigma, *, supersample=1, mask=False, noise_map=False, smoothing=0.0,
           regularisation="identity", frame=None):
    # an asymmetric PSF, so a flipped (correlation) convention would be caught
    psf = torch.tensor([[0.0, 0.05, 0.02], [0.1, 0.5, 0.15], [0.03, 0.1, 0.05]],
                       dtype=torch.float64)
    sim = Simulator(npix=12, pixel_scale=0.1, psf=psf, supersample=supersample,
                    dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(12, 12, generator=gen, dtype=torch.float64) * 0.1
    noise = 0.05 + 0.1 * torch.rand(12, 12, generator=gen, dtype=torch.float64) if noise_map \
        else 0.08
    m = torch.rand(12, 12, generator=gen) > 0.2 if mask else None
    priors = Priors.default("vae").with_source_correction(sigma, pixels=n, smoothing=smoothing,
                                                          regularisation=regularisation,
                                                          frame=frame)
    model = LensModel(data, noise, sim, source=vae, priors=priors, mask=m)
    values = _sites(model, n)
    with torch.no_grad():   # data = the model at w = 0 plus noise-like structure: r is not tiny
        model = model.with_data(pyro.poutine.condition(model.predict, data=values)() + data,
                                noise, m)
    return model, values


def _brute_force(model, values, n):
    """log p(d, theta) with w integrated out, from the dense Gaussian N(m0, N + G G^T)."""
    def image(w):
        with torch.no_grad():
            return pyro.poutine.condition(model.predict, data={**values,
                                                               "src_correction": w})().ravel()
    m0 = image(torch.zeros(n * n, dtype=torch.float64))
    G = torch.stack([image(e) - m0 for e in torch.eye(n * n, dtype=torch.float64)], dim=1)
    keep = (model.mask.ravel() if model.mask is not None
            else torch.ones(m0.numel(), dtype=torch.bool))
    var = (model.noise_sigma * torch.ones_like(model.data)).ravel() ** 2
    cov = torch.diag(var[keep]) + G[keep] @ G[keep].T
    loglik = torch.distributions.MultivariateNormal(m0[keep], cov).log_prob(
        model.data.ravel()[keep])
    trace = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace()
    trace.compute_log_prob()
    log_prior = sum(s["log_prob_sum"] for k, s in trace.nodes.items()
                    if s["type"] == "sample" and k not in ("obs", "src_correction"))
    return float(loglik + log_prior), G


# a grid fixed on the source plane (on the arcs of LENS, about the source at (0.04, -0.02))
FRAME = (0.03, -0.01, 0.4)
OPTIONS = [dict(), dict(supersample=2), dict(mask=True, noise_map=True), dict(smoothing=0.8),
           dict(regularisation="gradient"), dict(regularisation="curvature", frame=FRAME),
           dict(frame=FRAME, mask=True, noise_map=True)]


def dense(G):
    """The response (sparse matrix or LinearOperator) as a dense tensor."""
    return torch.as_tensor(np.asarray(G @ np.eye(G.shape[1])))


@pytest.mark.parametrize("options", OPTIONS)
def test_evidence_matches_the_dense_gaussian_marginal(vae, options):
    n = 4
    model, values = _model(vae, n, 0.3, **options)
    expected, G = _brute_force(model, values, n)
    assert float(G.abs().max()) > 1e-3                       # the correction is seen
    assert torch.allclose(dense(correction_response(model, values)), G, atol=1e-12)
    ev = correction_evidence(model, values, sigmas=(0.3, 0.1))
    assert ev.log_evidence == pytest.approx(expected, abs=1e-6)
    assert ev.by_sigma[0.3] == pytest.approx(ev.log_evidence, abs=1e-9)
    # another sigma: the brute force of a model built with it
    other, _ = _model(vae, n, 0.1, **options)
    other = other.with_data(model.data, model.noise_sigma, model.mask)
    assert ev.by_sigma[0.1] == pytest.approx(_brute_force(other, values, n)[0], abs=1e-6)
    assert 0 < ev.n_constrained < n * n


def test_w_mean_maximises_the_joint_posterior(vae):
    """The posterior mean of w given the other sites is where the joint log density's gradient
    in w vanishes (the joint is Gaussian in w)."""
    n = 4
    model, values = _model(vae, n, 0.3, mask=True)
    ev = correction_evidence(model, values)
    w = ev.w_mean.clone().requires_grad_(True)
    at_w = pyro.poutine.condition(model, data={**values, "src_correction": w})
    trace = pyro.poutine.trace(at_w).get_trace()
    (grad,) = torch.autograd.grad(trace.log_prob_sum(), w)
    assert ev.w_mean.abs().max() > 1e-3 and grad.abs().max() < 1e-6


def test_bad_input_is_refused(vae):
    model, values = _model(vae, 4, 0.3)
    with pytest.raises(ValueError, match="sigmas"):
        correction_evidence(model, values, sigmas=(-0.1,))
    plain = LensModel(model.data, 0.1, model.simulator, source=vae)
    with pytest.raises(ValueError, match="no source correction"):
        correction_evidence(plain, values)
    stacked = LensModel.stack([model, model])
    with pytest.raises(ValueError, match="one observation"):
        correction_evidence(stacked, values)


def test_laplace_integrates_the_correction_out_as_the_full_hessian_would(vae):
    """The Schur complement with the analytic correction block (laplace_whitening's
    integrate_out, as sample_laplace uses it) equals the other sites' block of the inverse of the
    full finite-difference Hessian over every site; and the widths it gives are wider than
    those with the correction held fixed."""
    from pyro.infer.autoguide.initialization import init_to_value

    from difflens.infer.hmc import FlatSites
    from difflens.infer.mcmc import _correction_block, _grad_fn, laplace_whitening

    n = 4
    model, values = _model(vae, n, 0.3)
    with torch.no_grad():          # noiseless data: the sites are the maximum likelihood
        model = model.with_data(pyro.poutine.condition(model.predict, data=values)(),
                                model.noise_sigma)
    space = FlatSites(model, init_strategy=init_to_value(values=values))
    grad_fn = _grad_fn(space.potential(model))
    full = laplace_whitening(grad_fn, space.start, passes=0, min_curvature=0.0)
    block = _correction_block(model, values, space)
    keep = ~block[0]
    assert int(block[0].sum()) == n * n
    marg = laplace_whitening(grad_fn, space.start, passes=0, min_curvature=0.0,
                             integrate_out=block)
    expected = (full @ full.T)[keep][:, keep]
    cov = marg @ marg.T
    assert (cov - expected).abs().max() < 1e-6 * expected.abs().max()
    assert torch.allclose(torch.diagonal(cov), torch.diagonal(expected), rtol=1e-5)
    held = laplace_whitening(lambda x: grad_fn(_embed(x, space.start, keep))[:, keep],
                             space.start[keep], passes=0, min_curvature=0.0)
    assert (torch.diagonal(marg @ marg.T) >= torch.diagonal(held @ held.T) * (1 - 1e-6)).all()
    assert (torch.diagonal(marg @ marg.T) > 1.05 * torch.diagonal(held @ held.T)).any()


def _embed(x, start, keep):
    """Rows of the kept coordinates -> full rows, the others at ``start``."""
    full = start.repeat(x.shape[0], 1)
    full[:, keep] = x
    return full


def test_sample_laplace_with_a_correction_draws_the_other_sites(vae):
    from difflens.infer import sample_laplace

    model, values = _model(vae, 4, 0.3)
    post = sample_laplace(model, values, num_samples=200, seed=0)
    names = set(post.idata.posterior.data_vars)
    assert "src_correction" not in names and {"r_ein", "gamma", "z", "src_amp"} <= names
    sd = post.summary()["r_ein"]["sd"]
    assert 0 < sd < 1

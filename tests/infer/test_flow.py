"""The pilot flow (NeuTra preconditioner): bijection, log-determinant, fit, and its use in HMC."""

import math

import arviz as az
import pytest
import torch

from difflens.infer.flow import CouplingFlow, fit_flow


def _perturbed_flow(dim, seed=0):
    flow = CouplingFlow(dim, layers=4, hidden=8, seed=seed).to(torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow


def test_coupling_flow_inverts_and_its_log_determinant_is_the_jacobians():
    flow = _perturbed_flow(5)
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w, logdet = flow(z)
    assert not torch.allclose(w, z)                         # a real, non-trivial map
    back, logdet_inv = flow.inverse(w)
    assert torch.allclose(back, z, atol=1e-12)
    assert torch.allclose(logdet_inv, -logdet, atol=1e-12)
    for zi, ld in zip(z, logdet):                            # against the autograd Jacobian
        jac = torch.autograd.functional.jacobian(lambda x: flow(x[None])[0][0], zi)
        assert math.isclose(float(torch.linalg.slogdet(jac.detach())[1]), float(ld.detach()), abs_tol=1e-10)


def test_an_untrained_flow_is_the_identity():
    flow = CouplingFlow(6, seed=2).to(torch.float64)
    z = torch.randn(4, 6, dtype=torch.float64)
    w, logdet = flow(z)
    assert torch.equal(w, z) and torch.equal(logdet, torch.zeros(4, dtype=torch.float64))


def _banana(n, seed, bend=1.0, width=0.3):
    """Draws of x1 ~ N(0, 1), x2 | x1 ~ N(bend (x1^2 - 1), width^2), and their exact log density."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, generator=gen, dtype=torch.float64)
    x2 = bend * (x1**2 - 1) + width * torch.randn(n, generator=gen, dtype=torch.float64)

    def log_density(x):
        a, b = x[..., 0], x[..., 1]
        return (-0.5 * a**2 - 0.5 * ((b - bend * (a**2 - 1)) / width) ** 2
                - math.log(2 * math.pi * width))
    return torch.stack([x1, x2], -1), log_density


def test_fit_flow_learns_a_curved_density_that_a_gaussian_cannot():
    train, log_density = _banana(6000, seed=0)
    test, _ = _banana(2000, seed=1)
    flow, info = fit_flow(train, holdout=test, layers=6, hidden=32, steps=1500, lr=3e-3,
                          seed=0)
    exact = float(log_density(test).mean())
    mean, cov = train.mean(0), torch.cov(train.T)
    gauss = float(torch.distributions.MultivariateNormal(mean, cov).log_prob(test).mean())
    with torch.no_grad():
        fitted = float(flow.log_prob(test).mean())
    assert fitted == pytest.approx(info["holdout_logp"])
    assert exact - gauss > 0.5               # the banana is far from any Gaussian...
    assert exact - fitted < 0.15             # ...and the flow nearly reaches its exact density


def test_fit_flow_refuses_bad_draws():
    with pytest.raises(ValueError, match="finite"):
        fit_flow(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        fit_flow(torch.zeros(5))


def test_hmc_with_a_pilot_flow_starts_at_pilot_draws_and_maps_draws_back(monkeypatch, tmp_path):
    """The latent potential is U(flat0 + L f(z)) - log|det f'|, the starts are pilot draws, the
    draws returned are f of what the sampler visited, and a checkpoint keeps the flow."""
    import difflens.infer.hmc as hmc_module
    from difflens.infer.hmc import FlatSites
    from difflens.infer.mcmc import pilot_whitening, sample_posterior
    from tests.infer.test_hmc import _pilot_from_unconstrained, _sersic_model_and_map

    model, space, init = _sersic_model_and_map()
    d = space.start.numel()
    gen = torch.Generator().manual_seed(4)
    # a curved pilot: the second coordinate bends with the square of the first
    base = torch.randn(2 * 400, d, generator=gen, dtype=torch.float64)
    base[:, 1] = base[:, 1] * 0.3 + (base[:, 0] ** 2 - 1)
    rows = space.start + 0.01 * base
    pilot = _pilot_from_unconstrained(space, rows, chains=2)
    seen = {}

    def fake_hmc(potential, u0, *, num_samples, adapt_metric, **kw):
        seen.update(potential=potential, u0=u0.clone(), adapt_metric=adapt_metric)
        return u0[:, None].repeat(1, num_samples, 1), dict(seconds={})

    monkeypatch.setattr(hmc_module, "hmc", fake_hmc)
    ckpt = tmp_path / "run.pt"
    post = sample_posterior(model, init, num_samples=2, chains=3, seed=5, pilot=pilot,
                            pilot_flow=True, progress=False, checkpoint=ckpt)
    assert seen["adapt_metric"] is False
    assert (tmp_path / "run.pt.flow0.pt").is_file()
    factor, u0 = pilot_whitening(space, pilot, space.start, chains=3, seed=5)
    z0 = seen["u0"]
    assert not torch.allclose(z0, u0, atol=1e-3)       # the flow moved them
    # the draws returned are the pilot draws the chains started at (through the constraints)
    starts = space.start + u0 @ factor.T
    for c in range(3):
        got = space.flatten({k: torch.as_tensor(post.idata.posterior[k].values[c, 0])
                             for k in space.names})
        assert torch.allclose(got, starts[c], atol=1e-6)
    # the potential in z is the model's potential minus the flow's log-determinant there
    from difflens.infer.flow import CouplingFlow
    saved = torch.load(tmp_path / "run.pt.flow0.pt", weights_only=False)
    flow = CouplingFlow(d, **saved["shape"]).to(torch.float64)
    flow.load_state_dict(saved["state"])
    w, logdet = flow(z0)
    assert torch.allclose(w, u0, atol=1e-8)
    direct = FlatSites(model).potential(model)(space.start + w @ factor.T)
    assert torch.allclose(seen["potential"](z0), direct - logdet, rtol=1e-8, atol=1e-6)
    # a resumed run reads the same flow rather than fitting another
    sample_posterior(model, init, num_samples=2, chains=3, seed=5, pilot=pilot,
                     pilot_flow=True, progress=False, checkpoint=ckpt)
    assert torch.equal(seen["u0"], z0)
    with pytest.raises(ValueError, match="pass pilot"):
        sample_posterior(model, init, num_samples=2, pilot_flow=True, progress=False)
    with pytest.raises(ValueError, match="method='hmc'"):
        sample_posterior(model, init, num_samples=2, method="nuts", pilot_flow=True)

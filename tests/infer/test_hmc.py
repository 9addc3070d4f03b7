"""The vectorised HMC sampler: its batched potential against Pyro's, its draws against a known
Gaussian, and bad input."""
import arviz as az
import numpy as np
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.mcmc.util import initialize_model

from difflens.infer.hmc import FlatSites, hmc
from difflens.model import LensModel, Priors
from difflens.simulate import Simulator
from difflens.sources import Sersic


def test_batched_potential_equals_pyro_potential_chain_by_chain():
    sim = Simulator(npix=20, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    data = sim.image(dict(r_ein=1.0, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.01, g2=0.0),
                     Sersic(amp=1.0, r_e=0.2, n=1.0))
    model = LensModel(data, 0.05, sim, source="sersic",
                      priors=Priors.default("sersic", lens_light=1))
    pyro_potential = initialize_model(model, init_strategy=init_to_median)[1]
    space = FlatSites(model)
    g = torch.Generator().manual_seed(0)
    u = space.start + 0.3 * torch.randn(6, space.start.numel(), generator=g,
                                        dtype=space.start.dtype)
    batched = space.potential(model)(u)
    assert batched.shape == (6,)
    sites = space.unconstrained(u)
    for row, value in enumerate(batched):
        assert float(value) == pytest.approx(
            float(pyro_potential({n: v[row] for n, v in sites.items()})), rel=1e-10)


def test_hmc_draws_match_an_anisotropic_correlated_gaussian():
    # target N(mean, cov) with scales 0.2 .. 5 and correlation 0.9 between two coordinates
    d = 5
    scales = torch.tensor([0.2, 1.0, 5.0, 1.0, 2.0], dtype=torch.float64)
    corr = torch.eye(d, dtype=torch.float64)
    corr[0, 1] = corr[1, 0] = 0.9
    cov = corr * scales[:, None] * scales[None, :]
    mean = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def potential(u):
        r = u - mean
        return 0.5 * ((r @ prec) * r).sum(1)

    u0 = mean + torch.randn(4, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws, stats = hmc(potential, u0, num_samples=1500, warmup=400, path_length=6.0,
                       max_steps=100, seed=3, progress=False)
    assert draws.shape == (4, 1500, d)
    x = draws.numpy()
    ess = np.array([float(az.ess(x[..., i])) for i in range(d)])
    assert (ess > 400).all(), ess
    assert max(float(az.rhat(x[..., i])) for i in range(d)) < 1.01
    flat = draws.reshape(-1, d)
    se = scales / torch.tensor(ess).sqrt()
    assert ((flat.mean(0) - mean).abs() < 5 * se).all()
    # sample covariance error: sd of element (i, j) is s_i s_j sqrt((1 + rho_ij^2) / n_eff)
    tol = 4 * scales[:, None] * scales[None, :] * torch.sqrt((1 + corr ** 2) / float(ess.min()))
    assert ((torch.cov(flat.T) - cov).abs() < tol).all(), torch.cov(flat.T) - cov
    assert 0.6 < float(stats["accept"].mean()) < 0.95


def test_hmc_groups_adapt_one_preconditioner_per_posterior():
    # two independent targets in one batch, scales 100x apart: a pooled metric would fit neither
    d = 3
    sd = torch.tensor([[0.05, 0.1, 0.02], [5.0, 2.0, 8.0]], dtype=torch.float64)
    mean = torch.tensor([[1.0, 0.0, -1.0], [10.0, -20.0, 5.0]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])

    def potential(u):
        return 0.5 * (((u - mean[groups]) / sd[groups]) ** 2).sum(1)

    u0 = mean[groups] + sd[groups] * torch.randn(6, d, generator=torch.Generator().manual_seed(2),
                                                 dtype=torch.float64)
    draws, stats = hmc(potential, u0, num_samples=800, warmup=300, groups=groups, seed=1,
                       progress=False)
    assert stats["scale"].shape == (2, d, d)
    for g in range(2):
        x = draws[groups == g].numpy()                             # (3, 800, d)
        ess = np.array([float(az.ess(x[..., i])) for i in range(d)])
        assert (ess > 200).all(), (g, ess)
        flat = torch.as_tensor(x.reshape(-1, d))
        se = sd[g] / torch.tensor(ess).sqrt()
        assert ((flat.mean(0) - mean[g]).abs() < 5 * se).all(), (g, flat.mean(0))
        # the sd of a sample sd is about sd / sqrt(2 n_eff), n_eff that of the squared draws
        # (antithetic draws can have n_eff above n for the mean and below it for the square)
        sq = (x - x.mean((0, 1))) ** 2
        ess_sq = min(float(az.ess(sq[..., i])) for i in range(d))
        assert ((flat.std(0) / sd[g] - 1).abs() < 4 / np.sqrt(2 * ess_sq)).all(), \
            (g, flat.std(0), ess_sq)
    with pytest.raises(ValueError, match="groups"):
        hmc(potential, u0, groups=torch.tensor([0, 1]), progress=False)


def test_a_chain_with_a_tiny_step_size_does_not_hold_up_the_batch():
    # one chain samples a target 50x narrower than the others under one pooled metric, so its
    # step size is ~50x smaller: its leapfrog count is capped at 3x the batch median, and its
    # draws still have the right mean and sd
    d = 2
    sd = torch.tensor([0.02, 1.0, 1.0, 1.0], dtype=torch.float64)[:, None]

    def potential(u):
        return 0.5 * ((u / sd) ** 2).sum(1)

    u0 = sd * torch.randn(4, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    draws, stats = hmc(potential, u0, num_samples=600, warmup=300, seed=2, progress=False)
    assert float(stats["step_size"][0]) < 0.1 * float(stats["step_size"][1:].min())
    median = stats["n_steps"].median(0).values.double()
    assert (stats["n_steps"] <= torch.ceil(3.0 * median)).all()
    assert float(stats["n_steps"][0].float().mean()) < 20        # 2.2 / eps would be > 50
    x = draws[0].numpy()
    ess = min(float(az.ess(x[None, :, i])) for i in range(d))
    assert ess > 50
    assert (np.abs(x.mean(0)) < 5 * 0.02 / np.sqrt(ess)).all()
    assert (np.abs(x.std(0) / 0.02 - 1) < 4 / np.sqrt(2 * ess)).all()
    with pytest.raises(ValueError, match="max_steps_ratio"):
        hmc(potential, u0, max_steps_ratio=0.5, progress=False)


def test_hmc_rejects_bad_input():
    pot = lambda u: 0.5 * (u * u).sum(1)                     # noqa: E731
    with pytest.raises(ValueError, match="target_accept"):
        hmc(pot, torch.zeros(2, 3), target_accept=1.5, progress=False)
    with pytest.raises(ValueError, match="shape"):
        hmc(pot, torch.zeros(3), progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        hmc(lambda u: pot(u) + torch.log(u[:, 0]), -torch.ones(2, 3), progress=False)


def test_hmc_resumes_from_a_checkpoint_with_the_same_draws(tmp_path):
    """An interrupted run continued from its checkpoint gives exactly the uninterrupted draws;
    a checkpoint written with other settings is refused."""
    prec = torch.tensor([[4.0, 1.5], [1.5, 2.0]], dtype=torch.float64)

    def potential(u):
        return 0.5 * torch.einsum("ci,ij,cj->c", u, prec, u)

    u0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.1]], dtype=torch.float64)
    kw = dict(num_samples=30, warmup=60, seed=3, progress=False)
    full, full_stats = hmc(potential, u0, **kw)

    calls = {"n": 0}

    def interrupted(u):
        calls["n"] += 1
        if calls["n"] > 400:                     # somewhere inside the warm-up windows
            raise KeyboardInterrupt
        return potential(u)

    path = tmp_path / "chains.pt"
    with pytest.raises(KeyboardInterrupt):
        hmc(interrupted, u0, checkpoint=path, checkpoint_every=7, **kw)
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    assert 0 < torch.load(path, weights_only=False)["iteration"] < 90
    resumed, stats = hmc(potential, u0, checkpoint=path, checkpoint_every=7, **kw)
    assert torch.equal(resumed, full)
    assert torch.equal(stats["accept"], full_stats["accept"])
    with pytest.raises(ValueError, match="seed"):
        hmc(potential, u0, checkpoint=path, **dict(kw, seed=4))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        hmc(potential, u0, checkpoint=path, **kw)
    path.unlink()
    hmc(potential, u0, checkpoint=path, **kw)
    with pytest.raises(ValueError, match="start_potential"):     # another posterior, same starts
        hmc(lambda u: 2.0 * potential(u), u0, checkpoint=path, **kw)


def test_hmc_extends_a_finished_run_with_the_draws_of_a_longer_one(tmp_path):
    """Asking a finished run's checkpoint for more draws continues its chains: the result is
    exactly one uninterrupted run of the larger size; an interrupted run is ended early with
    the draws it holds; asking for fewer than it holds is refused."""
    prec = torch.tensor([[3.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)

    def potential(u):
        return 0.5 * torch.einsum("ci,ij,cj->c", u, prec, u)

    u0 = torch.tensor([[0.3, -0.2], [-0.5, 0.4]], dtype=torch.float64)
    kw = dict(warmup=50, seed=5, progress=False)
    longer, longer_stats = hmc(potential, u0, num_samples=45, **kw)
    path = tmp_path / "chains.pt"
    short, _ = hmc(potential, u0, num_samples=20, checkpoint=path, **kw)
    assert torch.equal(short, longer[:, :20])
    extended, stats = hmc(potential, u0, num_samples=45, checkpoint=path, **kw)
    assert torch.equal(extended, longer)
    assert torch.equal(stats["n_steps"], longer_stats["n_steps"])
    assert torch.load(path, weights_only=False)["settings"]["num_samples"] == 45
    with pytest.raises(ValueError, match="45 draws"):
        hmc(potential, u0, num_samples=30, checkpoint=path, **kw)
    # an interrupted run of 45 draws, ended early with the draws it holds (or a few more)
    calls = {"n": 0}

    def interrupted(u):
        calls["n"] += 1
        if calls["n"] > 300:                     # well into the draws (366 calls in all)
            raise KeyboardInterrupt
        return potential(u)

    cut = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        hmc(interrupted, u0, num_samples=45, checkpoint=cut, checkpoint_every=5, **kw)
    held = len(torch.load(cut, weights_only=False)["draws"])
    assert 0 < held < 45
    with pytest.raises(ValueError, match=f"holds {held} draws"):
        hmc(potential, u0, num_samples=held - 1, checkpoint=cut, **kw)
    ended, _ = hmc(potential, u0, num_samples=held, checkpoint=cut, **kw)
    assert torch.equal(ended, longer[:, :held])
    more, _ = hmc(potential, u0, num_samples=held + 3, checkpoint=cut, **kw)
    assert torch.equal(more, longer[:, :held + 3])
    state = torch.load(path, weights_only=False)
    del state["settings"]["num_samples"]              # a file that does not say how many it holds
    torch.save(state, path)
    with pytest.raises(ValueError, match="num_samples"):
        hmc(potential, u0, num_samples=45, checkpoint=path, **kw)


def test_per_chain_metric_gives_every_chain_its_own_adaptation_group(monkeypatch):
    import difflens.infer.hmc as hmc_module
    from difflens.infer.mcmc import sample_posterior, sample_posterior_batch

    sim = Simulator(npix=20, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    truth = dict(r_ein=1.0, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.01, g2=0.0)
    model = LensModel(sim.image(truth, Sersic(amp=1.0, r_e=0.2, n=1.0)), 0.05, sim,
                      source="sersic", priors=Priors.default("sersic"))
    space = FlatSites(model)
    init = space.constrained(space.start[None])
    init = {k: v[0] for k, v in init.items()}
    seen = []

    def fake_hmc(potential, u0, *, num_samples, groups, **kw):
        seen.append(groups.tolist())
        return torch.zeros(u0.shape[0], num_samples, u0.shape[1], dtype=u0.dtype), \
            dict(seconds={})

    monkeypatch.setattr(hmc_module, "hmc", fake_hmc)
    sample_posterior_batch([model, model], [init, init], num_samples=2, chains=3, progress=False)
    sample_posterior_batch([model, model], [init, init], num_samples=2, chains=3,
                           per_chain_metric=True, progress=False)
    assert seen == [[0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="per_chain_metric"):
        sample_posterior(model, init, num_samples=2, method="nuts", per_chain_metric=True)


def test_hmc_without_metric_adaptation_samples_in_the_coordinates_it_is_given():
    # a unit Gaussian: adapting only the step size must keep the identity metric, and the draws
    # must still be N(0, I); with adaptation on, warm-up windows re-estimate the metric
    d = 4

    def potential(u):
        return 0.5 * (u * u).sum(1)

    u0 = torch.randn(4, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws, stats = hmc(potential, u0, num_samples=1000, warmup=200, adapt_metric=False, seed=1,
                       progress=False)
    assert torch.equal(stats["scale"][0], torch.eye(d, dtype=torch.float64))
    flat = draws.reshape(-1, d)
    assert (flat.mean(0).abs() < 0.1).all()
    assert ((flat.var(0) - 1).abs() < 0.15).all()
    _, adapted = hmc(potential, u0, num_samples=10, warmup=200, seed=1, progress=False)
    assert not torch.equal(adapted["scale"][0], torch.eye(d, dtype=torch.float64))


def _sersic_model_and_map():
    sim = Simulator(npix=20, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    truth = dict(r_ein=1.0, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.01, g2=0.0)
    model = LensModel(sim.image(truth, Sersic(amp=1.0, r_e=0.2, n=1.0)), 0.05, sim,
                      source="sersic", priors=Priors.default("sersic"))
    space = FlatSites(model)
    init = {k: v[0] for k, v in space.constrained(space.start[None]).items()}
    return model, space, init


def _pilot_from_unconstrained(space, rows, chains):
    """An InferenceData holding ``rows`` (chains * n, D) of unconstrained draws as site values."""
    sites = space.constrained(rows)
    return az.from_dict(posterior={k: v.reshape(chains, -1, *v.shape[1:]).numpy()
                                   for k, v in sites.items()})


def test_a_pilot_whitens_with_its_covariance_and_starts_chains_at_its_draws():
    from difflens.infer.mcmc import pilot_whitening

    model, space, init = _sersic_model_and_map()
    d = space.start.numel()
    gen = torch.Generator().manual_seed(2)
    # draws of a known, strongly correlated Gaussian in the unconstrained space
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.05
    rows = space.start + torch.randn(2 * 300, d, generator=gen, dtype=torch.float64) @ a.T
    pilot = _pilot_from_unconstrained(space, rows, chains=2)
    factor, u0 = pilot_whitening(space, pilot, space.start, chains=3, seed=5)
    # the covariance survives the round trip through the sites' constraints
    assert torch.allclose(factor @ factor.T, torch.cov(rows.T), rtol=1e-6, atol=1e-10)
    assert torch.equal(factor, torch.tril(factor))
    starts = space.start + u0 @ factor.T
    for c, start in enumerate(starts):   # chain c: a draw of the second half of pilot chain c % 2
        half = rows[(c % 2) * 300 + 150:(c % 2) * 300 + 300]
        assert float((half - start).abs().max(1).values.min()) < 1e-8


def test_sample_posterior_with_a_pilot_fixes_the_metric_and_refuses_bad_pilots(monkeypatch):
    import difflens.infer.hmc as hmc_module
    from difflens.infer.mcmc import sample_posterior

    model, space, init = _sersic_model_and_map()
    d = space.start.numel()
    rows = space.start + 0.01 * torch.randn(200, d, generator=torch.Generator().manual_seed(3),
                                            dtype=torch.float64)
    pilot = _pilot_from_unconstrained(space, rows, chains=2)
    seen = []

    def fake_hmc(potential, u0, *, num_samples, adapt_metric, **kw):
        seen.append(adapt_metric)
        return torch.zeros(u0.shape[0], num_samples, u0.shape[1], dtype=u0.dtype), \
            dict(seconds={})

    monkeypatch.setattr(hmc_module, "hmc", fake_hmc)
    sample_posterior(model, init, num_samples=2, chains=2, progress=False)
    sample_posterior(model, init, num_samples=2, chains=2, pilot=pilot, progress=False)
    assert seen == [True, False]
    lacking = az.from_dict(posterior={k: v for k, v in pilot.posterior.items() if k != "gamma"})
    with pytest.raises(ValueError, match="lacks the sampled sites"):
        sample_posterior(model, init, num_samples=2, pilot=lacking, progress=False)
    few = _pilot_from_unconstrained(space, rows[:10], chains=2)
    with pytest.raises(ValueError, match="too few"):
        sample_posterior(model, init, num_samples=2, pilot=few, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        sample_posterior(model, init, num_samples=2, pilot="no/such/posterior.nc",
                         progress=False)
    with pytest.raises(ValueError, match="method='hmc'"):
        sample_posterior(model, init, num_samples=2, method="nuts", pilot=pilot)
    with pytest.raises(ValueError, match="per_chain_metric"):
        sample_posterior(model, init, num_samples=2, pilot=pilot, per_chain_metric=True,
                         progress=False)


def _two_modes(d=4):
    """Target 0.7 N(0, I) + 0.3 N(m, 0.25 I), m 12 sd away along every axis (HMC alone never
    crosses), and exact Gaussians of both modes."""
    f64 = dict(dtype=torch.float64)
    centres = torch.stack([torch.zeros(d, **f64), torch.full((d,), 6.0, **f64)])
    factors = torch.stack([torch.eye(d, **f64), 0.5 * torch.eye(d, **f64)])
    normal = [torch.distributions.MultivariateNormal(c, scale_tril=f)
              for c, f in zip(centres, factors)]

    def potential(u):
        return -torch.logaddexp(np.log(0.7) + normal[0].log_prob(u),
                                np.log(0.3) + normal[1].log_prob(u))
    return potential, centres, factors


def test_mode_jumps_give_separated_basins_their_weights():
    """Chains all start in the heavier mode; with jumps the share of draws in the lighter one
    is its weight 0.3 and each basin's draws have its mean and width (the jump's Jacobian
    |det F_j / det F_i| = 16 matters: without it the share would be far off)."""
    potential, centres, factors = _two_modes()
    u0 = 0.1 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws, stats = hmc(potential, u0, num_samples=1500, warmup=150, seed=1, progress=False,
                       jumps=(centres, factors))
    basin = stats["basin"].numpy()
    assert draws.shape == (4, 1500, 4) and basin.shape == (4, 1500)
    assert set(np.unique(basin)) == {0, 1}
    assert basin.mean() == pytest.approx(0.3, abs=0.05)
    assert 0.3 < float(stats["jump_accept"].mean()) < 0.8
    flat, lab = draws.reshape(-1, 4).numpy(), basin.reshape(-1)
    assert np.allclose(flat[lab == 1].mean(0), 6.0, atol=0.1)
    assert np.allclose(flat[lab == 1].std(0), 0.5, rtol=0.15)
    assert np.allclose(flat[lab == 0].std(0), 1.0, rtol=0.15)
    # without jumps every chain stays where it started
    _, plain = hmc(potential, u0, num_samples=200, warmup=100, seed=1, progress=False)
    assert "basin" not in plain


def test_mode_jumps_reject_bad_modes_and_resume_from_a_checkpoint(tmp_path):
    potential, centres, factors = _two_modes()
    u0 = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="K >= 2"):
        hmc(potential, u0, jumps=(centres[:1], factors[:1]), progress=False)
    with pytest.raises(ValueError, match="invertible"):
        hmc(potential, u0, jumps=(centres, 0 * factors), progress=False)
    ckpt = tmp_path / "jump.pt"
    full, stats = hmc(potential, u0, num_samples=60, warmup=40, seed=2, progress=False,
                      jumps=(centres, factors))
    part, _ = hmc(potential, u0, num_samples=30, warmup=40, seed=2, progress=False,
                  jumps=(centres, factors), checkpoint=ckpt)
    more, more_stats = hmc(potential, u0, num_samples=60, warmup=40, seed=2, progress=False,
                           jumps=(centres, factors), checkpoint=ckpt)
    assert torch.equal(more, full) and torch.equal(more_stats["basin"], stats["basin"])
    with pytest.raises(ValueError, match="other"):
        hmc(potential, u0, num_samples=80, warmup=40, seed=2, progress=False,
            checkpoint=ckpt)


def test_sample_posterior_hands_hmc_each_modes_laplace_gaussian_in_its_coordinates(
        monkeypatch):
    """The jumps sample_posterior(modes=) passes to hmc, mapped back through the whitening
    (theta = theta_MAP + L u), are each mode's Laplace centre and covariance."""
    import difflens.infer.hmc as hmc_module
    from difflens.infer.mcmc import _grad_fn, _laplace_mode, laplace_whitening, sample_posterior

    model, space, init = _sersic_model_and_map()
    other = dict(init, gamma=torch.tensor(2.4, dtype=torch.float64))
    seen = {}

    def fake_hmc(potential, u0, *, num_samples, jumps, **kw):
        seen["jumps"], seen["potential"] = jumps, potential
        c, d = u0.shape
        draws = torch.zeros(c, num_samples, d, dtype=u0.dtype)
        return draws, dict(seconds={}, basin=torch.zeros(c, num_samples, dtype=torch.long),
                           jump_accept=torch.zeros(c, num_samples, dtype=u0.dtype))

    monkeypatch.setattr(hmc_module, "hmc", fake_hmc)
    post = sample_posterior(model, init, num_samples=3, chains=2, modes=[other],
                            progress=False)
    assert post.idata.sample_stats["basin"].shape == (2, 3)
    centres, factors = seen["jumps"]
    pot = space.potential(model)
    x0 = FlatSites(model, init_strategy=lambda site: init[site["name"]]).start
    # u = 0 is the MAP: the whitening is centred there
    assert seen["potential"](torch.zeros(1, x0.numel(), dtype=x0.dtype))[0] == \
        pytest.approx(float(pot(x0[None])[0]))
    whiten = laplace_whitening(_grad_fn(pot), x0)
    for k, start in enumerate([x0, space.flatten(other)]):
        centre, factor, _ = _laplace_mode(pot, start)
        assert torch.allclose(x0 + whiten @ centres[k], centre, atol=1e-8)
        assert torch.allclose((whiten @ factors[k]) @ (whiten @ factors[k]).T,
                              factor @ factor.T, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="modes"):
        sample_posterior(model, init, num_samples=2, method="nuts", modes=[other])


@pytest.mark.parametrize("passes", [0, 2])
def test_laplace_whitening_is_a_function_of_the_hessian_not_of_eigenvector_signs(passes):
    """Where eigenvalues coincide (or nearly: at the curvature floor, or by symmetry) eigh may
    flip or rotate its eigenvectors under a rounding-level change of the Hessian.  The
    whitening must not follow them: a run that recomputes it to resume from a checkpoint has to
    meet the same coordinates (a float32 lens-3 run met u0 apart by 85 before the fix).  Truth:
    the symmetric root of the exact inverse, H^-1/2, from this test's own eigen-decomposition."""
    from difflens.infer.mcmc import laplace_whitening

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    evals = np.array([2.0, 2.0, 2.0, 5.0, 9.0, 9.0])             # two degenerate eigenspaces
    prec = torch.tensor(q @ np.diag(evals) @ q.T)
    root = torch.tensor(q @ np.diag(evals ** -0.5) @ q.T)        # H^-1/2, symmetric
    x0 = torch.zeros(6, dtype=torch.float64)
    for scale in (0.0, 1e-12, -1e-12, 3e-12):
        bump = torch.tensor(rng.normal(size=(6, 6)))
        p = prec + scale * (bump + bump.T)
        factor = laplace_whitening(lambda x, p=p: x @ p, x0, passes=passes)
        assert torch.allclose(factor, root, atol=1e-8)
        assert torch.allclose(factor @ factor.T, torch.linalg.inv(prec), atol=1e-8)


def _equal_modes(d=4):
    """Target 0.7 N(0, I) + 0.3 N(m, I), m 12 sd away (6 along every axis): HMC alone never
    crosses.  Equal widths, so every tempered level holds both modes (at beta their weights
    are 0.7^beta : 0.3^beta)."""
    def potential(u):
        return -torch.logaddexp(np.log(0.7) - 0.5 * (u * u).sum(1),
                                np.log(0.3) - 0.5 * ((u - 6.0) ** 2).sum(1))
    return potential


def test_tempering_gives_separated_modes_their_weights():
    """Every chain starts in the heavier mode; with a ladder of five temperatures the beta = 1
    chains hold the lighter one 30% of the time with its mean and width, the exchanges are
    accepted at the ladder's design rate and walkers make round trips; plain HMC from the
    same starts never leaves."""
    from difflens.infer.hmc import round_trips, temperature_ladder

    potential, d, k = _equal_modes(), 4, 5
    betas = temperature_ladder(k, d)
    u0 = 0.1 * torch.randn(4 * k, d, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    draws, stats = hmc(potential, u0, num_samples=1500, warmup=100, seed=0, progress=False,
                       tempering=betas)
    assert draws.shape == (4 * k, 1500, d)
    assert torch.allclose(stats["beta"], torch.tensor(betas, dtype=torch.float64).repeat(4))
    assert stats["swap_accept"].shape == (4, 1500, k - 1)
    assert stats["replica"].shape == (4 * k, 1500)
    cold = draws[::k].reshape(-1, d)
    light = cold.sum(1) > 12.0                       # nearer the second mode
    assert float(light.double().mean()) == pytest.approx(0.3, abs=0.08)
    assert torch.allclose(cold[light].mean(0), torch.full((d,), 6.0, dtype=torch.float64),
                          atol=0.15)
    assert torch.allclose(cold[light].std(0), torch.ones(d, dtype=torch.float64), rtol=0.1)
    assert torch.allclose(cold[~light].std(0), torch.ones(d, dtype=torch.float64), rtol=0.1)
    # exchanges: accepted near the 40% the ladder is spaced for, each pair every other time
    rate = stats["swap_accept"].nanmean((0, 1))
    assert ((rate > 0.25) & (rate < 0.6)).all()
    assert torch.isnan(stats["swap_accept"]).float().mean() == pytest.approx(0.5, abs=0.01)
    assert round_trips(stats["replica"], k) > 100
    plain, _ = hmc(potential, u0[:4], num_samples=300, warmup=100, seed=0, progress=False)
    assert (plain.sum(-1) < 12.0).all()


def test_tempered_gaussian_levels_have_their_temperatures_widths():
    """For N(0, I) in 10 dimensions level k samples N(0, I / beta_k), and the exchanges are
    accepted at the rate temperature_ladder spaces them for (2 Phi(-sqrt(d) delta / 2))."""
    from difflens.infer.hmc import temperature_ladder

    d, k = 10, 3
    betas = temperature_ladder(k, d, swap_accept=0.4)
    assert betas[0] == 1.0 and betas[1] / betas[0] == pytest.approx(betas[2] / betas[1])
    u0 = torch.randn(6 * k, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws, stats = hmc(lambda u: 0.5 * (u * u).sum(1), u0, num_samples=800, warmup=100,
                       seed=1, progress=False, tempering=betas)
    for level, beta in enumerate(betas):
        sd = draws[level::k].reshape(-1, d).std(0).mean()
        assert float(sd) == pytest.approx(beta ** -0.5, rel=0.05)
    assert float(stats["swap_accept"].nanmean()) == pytest.approx(0.4, abs=0.07)


def test_round_trips_count_cold_to_hot_and_back():
    from difflens.infer.hmc import round_trips

    # one ladder of 3 levels; replica[c, s] = the walker at chain (level) c at draw s
    replica = torch.tensor([[0, 1, 2, 1, 0, 1, 2, 2, 0],
                            [1, 0, 1, 2, 1, 2, 1, 0, 1],
                            [2, 2, 0, 0, 2, 0, 0, 1, 2]])
    # the level of each walker at each draw -- walker 0: 0 1 2 2 0 2 2 1 0, two trips;
    # walker 1: 1 0 1 0 1 0 1 2 1, none (up to 2 and not back); walker 2: 2 2 0 1 2 1 0 0 2,
    # one (its start at the hot end does not count)
    assert round_trips(replica, 3) == 3
    assert round_trips(replica[:, :4], 3) == 0


def test_tempering_rejects_bad_ladders_and_resumes_from_a_checkpoint(tmp_path):
    potential = _equal_modes()
    u0 = torch.zeros(6, 4, dtype=torch.float64)
    kw = dict(progress=False, num_samples=2, warmup=0)
    for bad in ([0.9, 0.5], [1.0, 1.0], [1.0, 0.5, 0.6], [1.0, 0.0], [1.0]):
        with pytest.raises(ValueError, match="inverse temperatures"):
            hmc(potential, u0, tempering=bad, **kw)
    with pytest.raises(ValueError, match="multiple of 4"):
        hmc(potential, u0, tempering=[1.0, 0.5, 0.25, 0.1], **kw)
    centres, factors = torch.zeros(2, 4, dtype=torch.float64), torch.eye(4).expand(2, 4, 4)
    centres[1] = 6.0
    with pytest.raises(ValueError, match="not combined"):
        hmc(potential, u0, tempering=[1.0, 0.5], jumps=(centres, factors.double()), **kw)
    betas = [1.0, 0.4, 0.16]
    kw = dict(warmup=40, seed=2, progress=False, tempering=betas)
    full, stats = hmc(potential, u0, num_samples=60, **kw)
    ckpt = tmp_path / "pt.pt"
    hmc(potential, u0, num_samples=30, checkpoint=ckpt, **kw)
    more, more_stats = hmc(potential, u0, num_samples=60, checkpoint=ckpt, **kw)
    assert torch.equal(more, full)
    assert torch.equal(more_stats["replica"], stats["replica"])
    assert torch.equal(more_stats["swap_accept"].nan_to_num(-1),
                       stats["swap_accept"].nan_to_num(-1))
    with pytest.raises(ValueError, match="tempering"):
        hmc(potential, u0, num_samples=80, checkpoint=ckpt, **dict(kw, tempering=[1.0, 0.5, 0.2]))


def test_sample_posterior_with_tempering_keeps_the_beta_one_chains(monkeypatch):
    """sample_posterior(tempering=K) runs chains x K sampler chains on a ladder spaced for the
    model's dimension and returns the beta = 1 ones: here the fake sampler leaves only those at
    the MAP (u = 0), so every draw of the posterior must equal it."""
    import difflens.infer.hmc as hmc_module
    from difflens.infer.hmc import temperature_ladder
    from difflens.infer.mcmc import sample_posterior

    model, space, init = _sersic_model_and_map()
    d, k = space.start.numel(), 3
    seen = {}

    def fake_hmc(potential, u0, *, num_samples, tempering, **kw):
        seen["chains"], seen["betas"] = u0.shape[0], tempering
        c = u0.shape[0]
        draws = torch.full((c, num_samples, u0.shape[1]), 0.3, dtype=u0.dtype)
        draws[::k] = 0.0
        swaps = torch.full((c // k, num_samples, k - 1), 0.5, dtype=torch.float64)
        replica = torch.arange(c)[:, None].expand(c, num_samples)
        return draws, dict(seconds={}, swap_accept=swaps, replica=replica)

    monkeypatch.setattr(hmc_module, "hmc", fake_hmc)
    post = sample_posterior(model, init, num_samples=5, chains=2, tempering=k, progress=False)
    assert seen["chains"] == 2 * k and seen["betas"] == temperature_ladder(k, d)
    assert post.idata.posterior["gamma"].shape == (2, 5)
    assert np.allclose(post.idata.posterior["gamma"].values, float(init["gamma"]))
    assert post.tempering["swap_accept"] == [0.5, 0.5]
    assert post.tempering["round_trips"] == 0 and len(post.tempering["betas"]) == k
    with pytest.raises(ValueError, match="method='hmc'"):
        sample_posterior(model, init, num_samples=2, method="nuts", tempering=3)
    with pytest.raises(ValueError, match="not combined"):
        sample_posterior(model, init, num_samples=2, tempering=3, modes=[dict(init)],
                         progress=False)


def test_a_tempered_batch_of_lenses_reports_each_lens_its_own_ladders(monkeypatch):
    """sample_posterior_batch(tempering=) with two lenses: each lens's posterior holds its own
    beta = 1 chains, and its exchange rates and round trips come from its own ladders."""
    import difflens.infer.hmc as hmc_module
    from difflens.infer.mcmc import sample_posterior_batch

    model, space, init = _sersic_model_and_map()
    other = model.with_data(model.data * 1.01, model.noise_sigma)
    k, chains = 2, 2

    def fake_hmc(potential, u0, *, num_samples, tempering, **kw):
        c = u0.shape[0]                                  # lenses x chains x levels
        draws = torch.full((c, num_samples, u0.shape[1]), 0.3, dtype=u0.dtype)
        draws[::k] = 0.0
        swaps = torch.full((c // k, num_samples, k - 1), 0.2, dtype=torch.float64)
        swaps[chains:] = 0.6                            # the second lens's ladders
        replica = torch.arange(c)[:, None].repeat(1, num_samples)
        replica[:k, 1], replica[:k, 2] = replica[:k, 1].flip(0), replica[:k, 2].flip(0)
        return draws, dict(seconds={}, swap_accept=swaps, replica=replica)

    monkeypatch.setattr(hmc_module, "hmc", fake_hmc)
    posts = sample_posterior_batch([model, other], [init, init], num_samples=4, chains=chains,
                                   tempering=[1.0, 0.5], progress=False)
    for post in posts:
        assert post.idata.posterior["gamma"].shape == (chains, 4)
        assert np.allclose(post.idata.posterior["gamma"].values, float(init["gamma"]))
    assert posts[0].tempering["swap_accept"] == [0.2] and posts[1].tempering["swap_accept"] == [0.6]
    # walker 0 of lens 0: levels 0, 1, 1, 0 -> one round trip; lens 1's walkers stay put
    assert posts[0].tempering["round_trips"] == 1 and posts[1].tempering["round_trips"] == 0

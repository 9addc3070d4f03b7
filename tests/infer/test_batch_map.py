"""Many lenses at once: the stacked model's batched potential against each lens alone, and the
batched MAP against the truths of noiseless lenses."""
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.mcmc.util import initialize_model

from difflens.infer import fit_map_batch
from difflens.infer.hmc import FlatSites
from difflens.model import LensModel
from difflens.simulate import Simulator
from difflens.sources import Sersic

LENSES = [dict(r_ein=1.1, q=0.8, phi=0.4, gamma=2.05, x0=0.03, y0=-0.02, g1=0.02, g2=-0.01),
          dict(r_ein=0.9, q=0.65, phi=-0.7, gamma=1.9, x0=-0.05, y0=0.04, g1=-0.01, g2=0.02),
          dict(r_ein=1.25, q=0.9, phi=1.2, gamma=2.2, x0=0.0, y0=0.05, g1=0.0, g2=0.01)]
SRC = dict(amp=2.0, r_e=0.2, n=1.2, q=0.7, phi=0.8, x0=0.06, y0=0.03)


def _models(sim, noise):
    images = [sim.image(lens, Sersic(**SRC)) for lens in LENSES]
    first = LensModel(images[0], noise, sim, source="sersic")
    return [first] + [first.with_data(image, noise) for image in images[1:]]


def test_stacked_potential_equals_each_lens_alone():
    sim = Simulator(npix=20, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    models = _models(sim, 0.05)
    space = FlatSites(models[0])
    g = torch.Generator().manual_seed(0)
    u = space.start + 0.3 * torch.randn(6, space.start.numel(), generator=g,
                                        dtype=space.start.dtype)
    stacked = LensModel.stack(models, repeat=2)                  # rows: lens 0, 0, 1, 1, 2, 2
    batched = space.potential(stacked)(u)
    sites = space.unconstrained(u)
    for row in range(6):
        alone = initialize_model(models[row // 2], init_strategy=init_to_median)[1]
        assert float(batched[row]) == pytest.approx(
            float(alone({n: v[row] for n, v in sites.items()})), rel=1e-10)


def test_a_row_off_the_support_leaves_the_other_rows_alone():
    # a chain far out in a trajectory (exp overflow: r_e = inf; underflow: r_e = 0) must cost
    # only that chain: the physics used to raise for the whole batch, rejecting every chain
    sim = Simulator(npix=16, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    model = _models(sim, 0.05)[0]
    space = FlatSites(model)
    potential = space.potential(model)
    i = space.names.index("src_r_e")
    u = space.start.expand(3, -1).clone()
    u[1, i], u[2, i] = 1000.0, -1000.0                       # log r_e
    u.requires_grad_(True)
    pot = potential(u)
    assert torch.isinf(pot[1:]).all() and torch.isfinite(pot[0])
    grad, = torch.autograd.grad(pot[0], u)
    alone = space.start[None].clone().requires_grad_(True)
    pot_alone = potential(alone)
    grad_alone, = torch.autograd.grad(pot_alone.sum(), alone)
    torch.testing.assert_close(pot[0], pot_alone[0])
    torch.testing.assert_close(grad[0], grad_alone[0])
    assert (grad[1:] == 0).all()


def test_batched_map_recovers_noiseless_lenses():
    sim = Simulator(npix=32, pixel_scale=0.1, psf_sigma=0.1, dtype=torch.float64)
    models = _models(sim, 0.01)
    results = fit_map_batch(models, steps=1500, restarts=3, restart_steps=150, chunk=2,
                            seed=0, progress=False)
    assert len(results) == len(LENSES)
    for lens, res in zip(LENSES, results):
        got = res.lens()
        for k in ("r_ein", "q", "gamma"):
            assert got[k] == pytest.approx(lens[k], rel=0.02), (k, got[k], lens[k])
        assert res.reduced_chi2 < 0.2                    # noiseless data, sigma 0.01


def test_stack_and_batch_reject_bad_input():
    sim = Simulator(npix=20, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    other = Simulator(npix=24, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    a = LensModel(torch.zeros(20, 20), 0.1, sim, source="sersic")
    b = LensModel(torch.zeros(24, 24), 0.1, other, source="sersic")
    with pytest.raises(ValueError, match="pixel grid"):
        LensModel.stack([a, b])
    with pytest.raises(ValueError, match="one Priors"):
        LensModel.stack([a, LensModel(torch.zeros(20, 20), 0.1, sim, source="sersic")])
    with pytest.raises(ValueError, match="does not match"):
        a.with_data(torch.zeros(24, 24), 0.1)
    with pytest.raises(ValueError, match="positive"):
        a.with_data(torch.zeros(20, 20), -0.1)
    with pytest.raises(ValueError, match="at least one"):
        LensModel.stack([])
    with pytest.raises(ValueError, match="at least one"):
        fit_map_batch([])
    with pytest.raises(ValueError, match=">= 1"):
        fit_map_batch([a], steps=0)


def test_fit_lenses_needs_one_grid_and_psf():
    from difflens.datasets.mocks import simulate_mock
    from difflens.fitting import fit_lenses

    a = simulate_mock(0, npix=32, pixel_scale=0.15, source="sersic")
    b = simulate_mock(1, npix=40, pixel_scale=0.15, source="sersic")
    c = simulate_mock(2, npix=32, pixel_scale=0.15, psf_sigma=0.1, source="sersic")
    with pytest.raises(ValueError, match="one grid"):
        fit_lenses([a, b], source="sersic")
    with pytest.raises(ValueError, match="different PSF"):
        fit_lenses([a, c], source="sersic")
    with pytest.raises(ValueError, match="at least one"):
        fit_lenses([], source="sersic")
    with pytest.raises(ValueError, match="interpolation"):
        fit_lenses([a], source="sersic", source_interpolation="nearest")


def test_fit_lenses_reads_every_stamp_with_the_interpolation_asked_for():
    from difflens.datasets.mocks import simulate_mock
    from difflens.fitting import fit_lenses

    mocks = [simulate_mock(s, npix=24, pixel_scale=0.2, source="sersic") for s in (0, 1)]
    fits = fit_lenses(mocks, source="sersic", steps=2, restarts=1, finals=1,
                      encode_source=False, source_interpolation="cubic", progress=False)
    assert [f.model.source_interpolation for f in fits] == ["cubic", "cubic"]


def test_batched_posteriors_scale_with_each_lens_noise():
    # the same lens observed at noise 0.02 and 0.2: with data-dominated posteriors the widths
    # scale with sigma, so a shared (pooled) preconditioner would mis-sample one of them
    from difflens.infer import sample_posterior_batch

    sim = Simulator(npix=24, pixel_scale=0.12, psf_sigma=0.1, dtype=torch.float64)
    lens = LENSES[0]
    clean = sim.image(lens, Sersic(**SRC))
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(clean.shape, generator=gen, dtype=clean.dtype)
    first = LensModel(clean + 0.02 * noise, 0.02, sim, source="sersic")
    models = [first, first.with_data(clean + 0.2 * noise, 0.2)]
    maps = fit_map_batch(models, steps=800, restarts=2, restart_steps=150, seed=0,
                         progress=False)
    # 3 x 300 draws: with 150 the R-hat estimate itself scatters by ~0.03 around its value
    posts = sample_posterior_batch(models, [m.sample_sites() for m in maps], num_samples=300,
                                   warmup=150, chains=3, seed=2, progress=False)
    assert len(posts) == 2
    for post in posts:
        for k in ("r_ein", "gamma"):
            assert post.rhat[k] < 1.05, (k, post.rhat[k])
            # the truth within 3.5 posterior sd (a 99% interval's end rests on a few tail draws)
            mean, sd = post.summary()[k]["mean"], post.summary()[k]["sd"]
            assert abs(mean - lens[k]) < 3.5 * sd, (k, mean, sd)
    ratio = posts[1].summary()["r_ein"]["sd"] / posts[0].summary()["r_ein"]["sd"]
    # sigma ratio 10; at noise 0.2 the posterior is wider than linear (a curved r_ein-gamma-
    # source degeneracy): a long run (3 x 1500 draws, R-hat 1.004) gives 13.8
    assert 9 < ratio < 19, ratio


def test_batched_posteriors_reject_bad_input():
    from difflens.infer import sample_posterior_batch

    sim = Simulator(npix=16, pixel_scale=0.15, psf_sigma=0.1, dtype=torch.float64)
    a = LensModel(torch.zeros(16, 16), 0.1, sim, source="sersic")
    with pytest.raises(ValueError, match="one init per model"):
        sample_posterior_batch([a, a], [{}])
    with pytest.raises(ValueError, match="lack sampled sites"):
        sample_posterior_batch([a], [{"r_ein": torch.tensor(1.0)}])


def test_float32_vae_model_potential_and_gradient_match_float64():
    # the flat vector follows the model's precision even though the priors hold float64
    # constants; float32 changes the log posterior by ~4e-7 relative, its gradient by ~1e-5
    from difflens.sources.vae import load_default_vae

    vae = load_default_vae()
    lens = LENSES[0]
    out = {}
    for dtype in (torch.float64, torch.float32):
        sim = Simulator(npix=24, pixel_scale=0.15, psf_sigma=0.1, dtype=dtype)
        data = sim.image(lens, Sersic(**SRC))
        model = LensModel(data, 0.05, sim, source=vae)
        space = FlatSites(model)
        assert space.start.dtype == dtype
        u = space.flatten({**{k: lens[k] for k in ("r_ein", "gamma", "x0", "y0", "g1", "g2")},
                           "e1": 0.1, "e2": -0.05, "src_x0": 0.05, "src_y0": 0.0,
                           "src_s": 0.4, "src_amp": 1.5,
                           "z": vae.prior.mean.to(dtype)})[None].requires_grad_(True)
        pot = space.potential(LensModel.stack([model], repeat=1))(u)
        grad, = torch.autograd.grad(pot.sum(), u)
        out[dtype] = (float(pot), grad.double())
    (p64, g64), (p32, g32) = out[torch.float64], out[torch.float32]
    print(f"float32 vs float64: potential rel {abs(p32 - p64) / abs(p64):.1e}, gradient rel "
          f"{float((g32 - g64).norm() / g64.norm()):.1e}")
    assert p32 == pytest.approx(p64, rel=1e-5)
    assert float((g32 - g64).norm() / g64.norm()) < 1e-3

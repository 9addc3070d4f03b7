"""Umbrella sampling with MBAR reweighting (difflens.infer.umbrella) against closed forms and
direct numerical integration."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from difflens.infer.umbrella import (bootstrap_sd, checked_windows, sample_umbrella,
                                     umbrella_hmc, umbrella_weights)

from .test_model_and_inference import moments_match_grid, posterior_on_grid, two_parameter_problem

#: p(x) = 0.7 N(-2, 0.5^2) + 0.3 N(2, 0.8^2): weights, means, sds
MIX = (np.array([0.7, 0.3]), np.array([-2.0, 2.0]), np.array([0.5, 0.8]))


def _restrained(mix, c, kappa):
    """p(x) exp(-kappa (x - c)^2 / 2) for a Gaussian mixture p = (weights, means, sds): again a
    Gaussian mixture, whose unnormalised component weights, means and sds are returned."""
    a, m, s = mix
    amp = a / np.sqrt(1 + kappa * s ** 2) * np.exp(-kappa * (m - c) ** 2
                                                  / (2 * (1 + kappa * s ** 2)))
    prec = 1 / s ** 2 + kappa
    return amp, (m / s ** 2 + kappa * c) / prec, 1 / np.sqrt(prec)


def _window_draws(centres, kappa, n, rng):
    """Exact draws of MIX restrained to each window, and the exact log Z_c of each window."""
    xs, log_z = [], []
    for c in centres:
        amp, mean, sd = _restrained(MIX, c, kappa)
        comp = rng.choice(2, size=n, p=amp / amp.sum())
        xs.append(rng.normal(mean[comp], sd[comp]))
        log_z.append(math.log(amp.sum()))
    return np.array(xs), np.array(log_z)


def test_mbar_recovers_a_two_gaussian_mixture_from_exact_window_draws():
    centres, kappa = checked_windows(np.linspace(-4, 4, 9))
    assert kappa == pytest.approx(1.0)                   # restraint sd: the spacing
    xs, log_z = _window_draws(centres, kappa, 2000, np.random.default_rng(0))
    window = np.repeat(np.arange(9), 2000)
    log_w, free = umbrella_weights(xs.ravel(), window, centres, kappa)
    w = np.exp(log_w)
    assert w.sum() == pytest.approx(1.0)
    a, m, s = MIX
    upper = (a * stats.norm.sf(0, m, s)).sum()           # P(x > 0) = 0.298
    assert (w * (xs.ravel() > 0)).sum() == pytest.approx(upper, abs=0.01)
    assert (xs.ravel() > 0).mean() > upper + 0.15        # unweighted, the windows' share
    assert (w * xs.ravel()).sum() == pytest.approx((a * m).sum(), abs=0.03)
    var = (a * (s ** 2 + m ** 2)).sum() - (a * m).sum() ** 2
    assert (w * (xs.ravel() - (a * m).sum()) ** 2).sum() == pytest.approx(var, rel=0.03)
    # the windows' free energies: -log Z_k + log Z_0
    assert np.allclose(free, -(log_z - log_z[0]), atol=0.05)


def test_bootstrap_error_matches_the_scatter_of_independent_repeats():
    centres, kappa = checked_windows(np.linspace(-4, 4, 9))
    window = np.arange(9)
    means = []
    for seed in range(30):
        xs, _ = _window_draws(centres, kappa, 300, np.random.default_rng(100 + seed))
        log_w, _ = umbrella_weights(xs.ravel(), np.repeat(window, 300), centres, kappa)
        means.append((np.exp(log_w) * (xs.ravel() > 0)).sum())
    xs, _ = _window_draws(centres, kappa, 300, np.random.default_rng(7))
    se = bootstrap_sd(xs > 0, xs, window, centres, kappa, blocks=10, n_boot=100, seed=1)
    assert se == pytest.approx(np.std(means, ddof=1), rel=0.4)


def test_restrained_hmc_weighs_wells_that_plain_chains_never_cross():
    """x0: 0.25 N(-2.5, 0.5^2) + 0.75 N(2.5, 0.5^2) (a 12-nat barrier), x1 | x0 ~ N(x0 / 2, 1).
    Chains restrained along x0 recover the wells' weights and E[x1] = 0.625.  The restraint
    (sd 0.125) is stiffer than the default: at the default (sd 0.25, the spacing) the window on
    the barrier is itself bimodal, its chain mixes slowly between the two humps and the weight
    comes out 0.68."""
    def potential(u):
        x0, x1 = u[:, 0], u[:, 1]
        well = torch.logaddexp(math.log(0.25) - 2 * (x0 + 2.5) ** 2,
                               math.log(0.75) - 2 * (x0 - 2.5) ** 2)
        return -well + 0.5 * (x1 - 0.5 * x0) ** 2

    centres = np.linspace(-4.5, 4.5, 37)
    u0 = torch.zeros(37, 2, dtype=torch.float64)
    u0[:, 0] = torch.as_tensor(centres)
    draws, xi, window, _ = umbrella_hmc(potential, u0, lambda u: u[:, 0], centres, 64.0,
                                        num_samples=600, warmup=200, seed=3, progress=False)
    assert draws.shape == (37, 600, 2) and xi.shape == (37, 600)
    assert np.allclose(xi, draws[..., 0].numpy())
    # each chain's mean is its restrained target's (a Gaussian mixture again)
    wells = (np.array([0.25, 0.75]), np.array([-2.5, 2.5]), np.array([0.5, 0.5]))
    exact = [(amp * mean).sum() / amp.sum()
             for amp, mean, _ in (_restrained(wells, c, 64.0) for c in centres)]
    assert np.abs(xi.mean(1) - exact).max() < 0.15
    log_w, _ = umbrella_weights(xi, np.repeat(window, 600), centres, 64.0)
    w = np.exp(log_w)
    assert (w * (xi.ravel() > 0)).sum() == pytest.approx(0.75, abs=0.03)
    assert (w * draws[..., 1].numpy().ravel()).sum() == pytest.approx(0.625, abs=0.1)


def test_umbrella_on_a_lens_posterior_matches_grid_integration():
    """gamma restrained in 7 windows; the reweighted draws of r_ein and gamma against the
    posterior integrated on a grid, from the Laplace whitening and from a pilot."""
    from difflens.infer import sample_laplace

    model, init = two_parameter_problem()
    lap = sample_laplace(model, init, num_samples=2000, seed=1)
    g = lap.idata.posterior["gamma"].values
    centres = np.linspace(g.mean() - 3 * g.std(), g.mean() + 3 * g.std(), 7)
    for pilot in (None, lap):
        u = sample_umbrella(model, init, centres, coordinate="gamma", num_samples=500,
                            warmup=150, pilot=pilot, seed=2, progress=False, bootstrap=20)
        assert u.xi.shape == (7, 500) and u.window.tolist() == list(range(7))
        assert np.allclose(u.xi, u.windows.idata.posterior["gamma"].values)
        draws = {k: u.posterior.idata.posterior[k].values.reshape(-1) for k in ("r_ein", "gamma")}
        assert draws["r_ein"].shape == (3500,)
        rr, gg, logp = posterior_on_grid(model, draws, sds=6.0, n=101)
        moments_match_grid(draws, rr, gg, logp)
        assert np.all(u.window_rhat < 1.1) and np.isfinite(u.theta_E_se)
        s = u.summary()
        assert s["coordinate"] == "gamma" and s["draws_per_window"] == [500] * 7
        centre, energy = u.profile(bins=20)
        assert np.nanmin(energy) == 0.0 and len(centre) == 20


def test_bad_windows_and_coordinates_are_refused():
    model, init = two_parameter_problem()
    with pytest.raises(ValueError, match="increasing"):
        checked_windows([2.0, 1.9, 2.1])
    with pytest.raises(ValueError, match=">= 2"):
        checked_windows([2.0])
    with pytest.raises(ValueError, match="kappa"):
        checked_windows([1.9, 2.1], kappa=-1.0)
    with pytest.raises(ValueError, match="coordinate must be"):
        sample_umbrella(model, init, [1.9, 2.1], coordinate="src_s", progress=False)
    with pytest.raises(ValueError, match="e1, e2"):
        sample_umbrella(model, init, [0.5, 0.6], progress=False)
    with pytest.raises(ValueError, match="every window needs draws"):
        umbrella_weights([0.1, 0.2], [0, 0], [0.0, 1.0], 4.0)


@pytest.mark.filterwarnings("ignore:poor convergence")        # few draws: the bookkeeping
def test_lens_fit_umbrella_along_q_holds_sites_reports_and_saves(tmp_path):
    import json

    from difflens.datasets.observation import Observation
    from difflens.fitting import LensFit
    from difflens.infer.map import summarise_map
    from difflens.model import LensModel

    from .test_model_and_inference import SRC, small_problem, truth_sites

    sim, _, data = small_problem(npix=12, pixscale=0.24)
    model = LensModel(data, 0.02, sim, source="sersic")
    fit = LensFit(Observation(data.numpy(), 0.02, sim.pixel_scale), model,
                  summarise_map(model, truth_sites()))
    centres = [0.7, 0.75, 0.8]
    out = fit.sample_umbrella(centres, 8, warmup=10, hold=("src_n",), progress=False,
                              checkpoint=tmp_path / "ck.pt")
    u = out.umbrella
    assert u.coordinate == "q" and u.kappa == pytest.approx(1 / 0.05 ** 2)
    q = u.windows.idata.posterior["q"].values
    assert np.allclose(u.xi, q) and np.all(u.windows.idata.posterior["src_n"].values == SRC["n"])
    assert out.posterior.idata.posterior["q"].shape == (1, 24)
    s = out.summary()
    assert s["umbrella"]["centres"] == centres and "posterior" in s
    out.save(tmp_path / "fit")
    for f in ("windows.nc", "profile.png", "trace.png", "posterior.nc"):
        assert (tmp_path / "fit" / f).is_file(), f
    assert json.loads((tmp_path / "fit" / "summary.json").read_text())["umbrella"]["kappa"] > 0
    # the checkpoint resumes: the same call again returns the same draws
    again = fit.sample_umbrella(centres, 8, warmup=10, hold=("src_n",), progress=False,
                                checkpoint=tmp_path / "ck.pt").umbrella
    assert np.array_equal(again.xi, u.xi)

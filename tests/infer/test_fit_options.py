"""Fit options: the Einstein radius sampled as theta_E, starting from an earlier fit, holding sites."""
import math

import numpy as np
import pyro
import pytest
import torch

from difflens.infer import fit_map, sample_posterior
from difflens.model import LensModel, Priors, lens_from_sites
from difflens.sources import Sersic

from .test_model_and_inference import LENS, SRC, small_problem, truth_sites


def _theta_e_sites():
    t = truth_sites()
    t["theta_E"] = torch.tensor(math.sqrt(LENS["q"]) * LENS["r_ein"], dtype=torch.float64)
    del t["r_ein"]
    return t


def _trace(model, values):
    with torch.no_grad():
        tr = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace()
        tr.compute_log_prob()
    return tr


def test_theta_e_model_predicts_the_image_of_the_equivalent_r_ein():
    sim, _, data = small_problem()
    direct = sim.image(LENS, Sersic(**SRC))                  # the simulator called with r_ein
    model = LensModel(data, 0.02, sim, source="sersic",
                      priors=Priors.default("sersic").with_theta_E())
    tr = _trace(model, _theta_e_sites())
    torch.testing.assert_close(tr.nodes["model_image"]["value"], direct, rtol=1e-10, atol=1e-12)
    assert float(tr.nodes["r_ein"]["value"]) == pytest.approx(LENS["r_ein"], rel=1e-12)
    # the same likelihood as the r_ein model at the same lens
    ref = _trace(LensModel(data, 0.02, sim, source="sersic"), truth_sites())
    assert float(tr.nodes["obs"]["log_prob_sum"]) == pytest.approx(
        float(ref.nodes["obs"]["log_prob_sum"]), rel=1e-12)


def test_theta_e_priors_and_bad_input():
    base = Priors.default("sersic")
    p = base.with_theta_E()
    assert p.lens["theta_E"] is base.lens["r_ein"]            # same distribution, new site
    assert "r_ein" not in p.lens and "r_ein" in base.lens     # the original is left alone
    held = Priors.default("sersic").with_theta_E(prior=1.2)
    assert held.lens["theta_E"] == 1.2
    with pytest.raises(ValueError, match="r_ein"):
        p.with_theta_E()                                       # already converted
    with pytest.raises(ValueError, match="exactly one"):
        lens_from_sites(dict(r_ein=1.0, theta_E=1.0, e1=torch.tensor(0.1),
                             e2=torch.tensor(0.0), gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0))
    sim, _, data = small_problem(npix=8, pixscale=0.4)
    model = LensModel(data, 0.05, sim, source="sersic", priors=p)
    with pytest.raises(ValueError, match="r_ein"):          # r_ein is derived, not a site here
        fit_map(model, steps=1, restarts=1, init={"r_ein": torch.tensor(1.0)}, progress=False)


def test_theta_e_map_and_posterior_report_both_radii():
    sim, _, data = small_problem(npix=16, pixscale=0.16, noise=0.02)
    priors = Priors.default("sersic").with_theta_E()
    t = _theta_e_sites()
    for k in ("x0", "y0", "g1", "g2"):
        priors.lens[k] = float(t[k])
    for k in ("r_e", "n", "e1", "e2", "x0", "y0"):
        priors.source[k] = float(t["src_" + k])
    model = LensModel(data, 0.02, sim, source="sersic", priors=priors)
    fit = fit_map(model, steps=300, restarts=1, init={k: t[k] for k in (
        "theta_E", "e1", "e2", "gamma", "src_amp")}, progress=False)
    assert set(fit.sample_sites()) == {"theta_E", "e1", "e2", "gamma", "src_amp"}
    p = fit.params
    assert float(p["r_ein"]) == pytest.approx(float(p["theta_E"]) / math.sqrt(float(p["q"])),
                                              rel=1e-12)
    assert fit.lens()["r_ein"] == pytest.approx(LENS["r_ein"], rel=0.03)
    post = sample_posterior(model, fit.sample_sites(), num_samples=100, warmup=60, chains=2,
                            seed=2, progress=False)
    d = post.idata.posterior
    np.testing.assert_allclose(d["theta_E"].values, np.sqrt(d["q"].values) * d["r_ein"].values,
                               rtol=1e-12)
    lo, hi = post.interval("theta_E", 0.99)
    assert lo < math.sqrt(LENS["q"]) * LENS["r_ein"] < hi
    lo, hi = post.interval("r_ein", 0.99)
    assert lo < LENS["r_ein"] < hi


def test_a_fit_written_in_r_ein_seeds_a_theta_e_model_at_the_same_lens(tmp_path):
    import json

    from difflens.datasets.observation import Observation
    from difflens.fitting import LensFit, start_from_summary
    from difflens.infer.map import summarise_map

    sim, _, data = small_problem()
    r_model = LensModel(data, 0.02, sim, source="sersic")
    written = LensFit(Observation(data.numpy(), 0.02, sim.pixel_scale), r_model,
                      summarise_map(r_model, truth_sites())).summary()
    (tmp_path / "summary.json").write_text(json.dumps(written))
    t_model = LensModel(data, 0.02, sim, source="sersic",
                        priors=Priors.default("sersic").with_theta_E())
    start = start_from_summary(t_model, tmp_path)             # the folder, as the script passes it
    assert "r_ein" not in start and "theta_E" in start
    image = _trace(t_model, start).nodes["model_image"]["value"]
    torch.testing.assert_close(image, sim.image(LENS, Sersic(**SRC)), rtol=1e-9, atol=1e-11)
    with pytest.raises(FileNotFoundError, match="summary.json"):
        start_from_summary(t_model, tmp_path / "nowhere")


@pytest.mark.filterwarnings("ignore:poor convergence")        # 5 draws: only the bookkeeping
def test_sites_held_at_the_map_while_sampling_stay_there():
    from difflens.datasets.observation import Observation
    from difflens.fitting import LensFit
    from difflens.infer.map import summarise_map

    sim, _, data = small_problem(npix=12, pixscale=0.24)
    model = LensModel(data, 0.02, sim, source="sersic")
    fit = LensFit(Observation(data.numpy(), 0.02, sim.pixel_scale), model,
                  summarise_map(model, truth_sites()))
    with pytest.raises(ValueError, match="src_size"):
        fit.sample(5, warmup=5, chains=2, hold=("src_size",), progress=False)
    post = fit.sample(5, warmup=5, chains=2, hold=("src_n", "g1"), progress=False).posterior
    d = post.idata.posterior
    assert np.all(d["src_n"].values == SRC["n"]) and np.all(d["g1"].values == LENS["g1"])
    assert np.ptp(d["gamma"].values) > 0                      # the others are sampled


def test_fit_lens_laplace_sampler_and_bad_sampler(tmp_path):
    from difflens.datasets.mocks import simulate_mock
    from difflens.fitting import fit_lens, fit_lenses

    obs = simulate_mock(5, noise_sigma=0.05, npix=32, pixel_scale=0.2, source="sersic")
    with pytest.raises(ValueError, match="sampler must be"):
        fit_lens(obs, source="sersic", samples=10, sampler="mh")        # before any MAP work
    with pytest.raises(ValueError, match="checkpoints"):
        fit_lens(obs, source="sersic", samples=10, sampler="laplace", checkpoint=tmp_path / "c")
    with pytest.raises(ValueError, match="'hmc' or 'laplace'"):
        fit_lenses([obs], source="sersic", samples=10, sampler="nuts")
    fit = fit_lens(obs, source="sersic", steps=200, restarts=1, samples=100, chains=2,
                   sampler="laplace", progress=False)
    draws = fit.posterior.idata.posterior
    assert draws["r_ein"].shape == (1, 200)                          # samples x chains, iid
    # the Gaussian is centred near the MAP (one Newton step away at most)
    sd = float(draws["r_ein"].std())
    assert abs(float(draws["r_ein"].mean()) - fit.map.lens()["r_ein"]) < 0.5 * sd
    fit.save(tmp_path / "out")
    assert (tmp_path / "out" / "posterior.nc").exists()


def test_a_tempered_fit_keeps_its_coldest_chains_and_reports_the_exchanges(tmp_path):
    """fit_lens(tempering=3) on a small mock: a posterior of ``chains`` chains, and the
    ladder, exchange rates and round trips in summary.json; other samplers refuse it before
    any MAP work."""
    import json

    from difflens.datasets.mocks import simulate_mock
    from difflens.fitting import fit_lens

    obs = simulate_mock(5, noise_sigma=0.05, npix=32, pixel_scale=0.2, source="sersic")
    with pytest.raises(ValueError, match="tempering"):
        fit_lens(obs, source="sersic", samples=10, sampler="laplace", tempering=3)
    fit = fit_lens(obs, source="sersic", steps=150, restarts=1, samples=20, warmup=30,
                   chains=2, tempering=3, progress=False)
    assert fit.posterior.idata.posterior["r_ein"].shape == (2, 20)
    fit.save(tmp_path / "out")
    t = json.loads((tmp_path / "out" / "summary.json").read_text())["tempering"]
    assert len(t["betas"]) == 3 and t["betas"][0] == 1.0 and t["betas"][2] < t["betas"][1] < 1
    assert len(t["swap_accept"]) == 2 and all(0 <= a <= 1 for a in t["swap_accept"])
    assert t["round_trips"] >= 0


def test_a_slope_held_fixed_fits_samples_and_plots(tmp_path):
    """An SIE fit (gamma a number in the priors): gamma stays at the value in every draw, the
    corner plot leaves it out instead of failing on a parameter with no spread."""
    from difflens.datasets.mocks import simulate_mock
    from difflens.fitting import fit_lens
    from difflens.plots import plot_corner, plot_trace

    obs = simulate_mock(6, noise_sigma=0.05, npix=32, pixel_scale=0.2, source="sersic")
    priors = Priors.default("sersic")
    priors.lens["gamma"] = 2.0
    fit = fit_lens(obs, source="sersic", priors=priors, steps=150, restarts=1, samples=60,
                   chains=2, sampler="laplace", progress=False)
    d = fit.posterior.idata.posterior
    assert np.all(d["gamma"].values == 2.0) and np.ptp(d["r_ein"].values) > 0
    fig = plot_corner(fit.posterior)
    labels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
    assert not any("gamma" in s for s in labels) and any("r_" in s for s in labels)
    fig = plot_trace(fit.posterior)
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles and all("R-hat" in t for t in titles)
    assert not any(t.startswith("gamma") for t in titles) and any(t.startswith("r_ein")
                                                                  for t in titles)
    assert len(fig.axes[0].lines) == d["r_ein"].shape[0]    # one trace per chain
    fit.save(tmp_path / "out")
    assert (tmp_path / "out" / "corner.png").exists() and (tmp_path / "out" / "trace.png").exists()
    with pytest.raises(ValueError, match="held fixed"):
        plot_corner(fit.posterior, names=("gamma",))
    with pytest.raises(ValueError, match="held fixed"):
        plot_trace(fit.posterior, names=("gamma",))


def _idata(means, draws=400, seed=0):
    """Independent unit-normal draws around each chain's mean: every parameter
    combine_posteriors summarises (theta_E, r_ein, q, phi, gamma, centre, shear)."""
    import arviz as az

    from difflens.infer.mcmc import SUMMARISED

    rng = np.random.default_rng(seed)
    means = np.asarray(means, dtype=float)[:, None]
    return az.from_dict(posterior={k: means + rng.standard_normal((len(means), draws))
                                   for k in SUMMARISED})


def test_combined_runs_show_chains_that_disagree(tmp_path):
    """R-hat over the chains of two runs: about 1 when both sample one distribution, large when
    the second run's chains sit elsewhere -- which neither run alone can show."""
    import warnings

    from difflens.infer import combine_posteriors

    a, b, far = _idata([0, 0]), _idata([0, 0], seed=1), _idata([3, 3], seed=2)
    b.to_netcdf(str(tmp_path / "b.nc"))
    same = combine_posteriors([a, tmp_path / "b.nc"])          # an InferenceData and a file
    assert same.idata.posterior.sizes["chain"] == 4 and same.rhat["gamma"] < 1.01
    with pytest.warns(RuntimeWarning, match="poor convergence"):
        apart = combine_posteriors([a, far])
    assert apart.rhat["gamma"] > 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # each run alone looks fine
        for run in (a, far):
            assert combine_posteriors([run]).rhat["gamma"] < 1.01
    # runs of different lengths: the last N draws of every chain
    short = _idata([0], draws=100, seed=3)
    with pytest.raises(ValueError, match="draws=N"):
        combine_posteriors([a, short])
    tail = combine_posteriors([a, short], draws=100)
    got = tail.idata.posterior["gamma"].values
    assert got.shape == (3, 100)
    assert np.array_equal(got[0], a.posterior["gamma"].values[0, -100:])
    with pytest.raises(ValueError, match="draws must"):
        combine_posteriors([a, short], draws=101)
    import arviz as az

    with pytest.raises(ValueError, match="same model"):
        combine_posteriors([a, az.InferenceData(posterior=a.posterior.drop_vars("g1"))])
    with pytest.raises(ValueError, match="posterior 1 must be"):
        combine_posteriors([a, {"gamma": 1}])
    with pytest.raises(ValueError, match="does not exist"):
        combine_posteriors([a, tmp_path / "missing.nc"])
    with pytest.raises(ValueError, match="at least one"):
        combine_posteriors([])


def test_a_resumed_run_reads_the_map_kept_beside_its_checkpoint(tmp_path):
    """The MAP an HMC run started from is kept beside its checkpoint, and a rerun reads it
    instead of searching again: a rerun whose search would end elsewhere (here: 3 Adam steps
    instead of 80) gives the first run's MAP and draws; sampling from another MAP with that
    checkpoint, a kept file of another model and an unreadable one are refused."""
    from difflens.datasets.mocks import simulate_mock
    from difflens.fitting import fit_lens

    obs = simulate_mock(5, noise_sigma=0.05, npix=32, pixel_scale=0.2, source="sersic")
    path = tmp_path / "hmc.pt"
    kw = dict(source="sersic", restarts=1, samples=6, warmup=6, chains=2, progress=False,
              checkpoint=path)
    first = fit_lens(obs, steps=80, **kw)
    kept = tmp_path / "hmc.pt.map.pt"
    assert kept.exists()
    again = fit_lens(obs, steps=3, **kw)
    for k, v in first.map.sample_sites().items():
        assert torch.equal(again.map.params[k], v), k
    assert again.map.log_posterior == first.map.log_posterior
    a, b = (f.posterior.idata.posterior for f in (first, again))
    assert np.array_equal(a["gamma"].values, b["gamma"].values)
    # the search from 3 steps does end elsewhere: sampling from it with that checkpoint is refused
    elsewhere = fit_lens(obs, steps=3, source="sersic", restarts=1, progress=False)
    assert float(elsewhere.map.params["r_ein"]) != float(first.map.params["r_ein"])
    with pytest.raises(ValueError, match="started from another MAP"):
        elsewhere.sample(6, warmup=6, chains=2, progress=False, checkpoint=path)
    with pytest.raises(ValueError, match="MAP of another model"):
        fit_lens(obs, lens_light=1, **kw)                 # before any MAP work
    kept.write_bytes(b"not a MAP")
    with pytest.raises(ValueError, match="cannot be read"):
        fit_lens(obs, steps=3, **kw)

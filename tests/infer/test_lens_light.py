"""Lens light: the simulator adds it before the PSF, and a joint fit recovers light and mass."""
from pathlib import Path

import pyro
import pytest
import torch

from difflens.datasets.observation import Observation
from difflens.fitting import fit_lens
from difflens.instrument import convolve, gaussian_psf, pixel_grid
from difflens.model import LensModel, Priors, q_phi_to_ellipticity
from difflens.simulate import Simulator
from difflens.sources import Sersic, sersic

LENS = dict(r_ein=1.0, q=0.8, phi=0.5, gamma=2.0, x0=0.02, y0=-0.03, g1=0.02, g2=0.01)
LIGHT = dict(amp=0.4, r_e=0.5, n=3.0, q=0.7, phi=0.4)
SRC = dict(amp=1.5, r_e=0.15, n=1.0, q=0.8, phi=0.2, x0=0.05, y0=0.02)


def test_lens_light_is_added_before_the_psf():
    sim = Simulator(npix=33, pixel_scale=0.08, psf_sigma=0.1, dtype=torch.float64)
    light = Sersic(x0=LENS["x0"], y0=LENS["y0"], **LIGHT)
    both = sim.image(LENS, Sersic(**SRC), [light])
    lensed = sim.image(LENS, Sersic(**SRC))
    # independent route: evaluate the profile on a wide grid, convolve "same", crop
    psf = gaussian_psf(0.1, 0.08, dtype=torch.float64)
    pad = psf.shape[0] // 2
    x, y = pixel_grid(33 + 2 * pad, 0.08, dtype=torch.float64)
    wide = sersic(x, y, x0=LENS["x0"], y0=LENS["y0"], **LIGHT)
    ref = convolve(wide, psf, mode="same")[pad:-pad, pad:-pad]
    torch.testing.assert_close(both - lensed, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="nothing to image"):
        sim.image(LENS, None, [])


def _sites():
    e1, e2 = q_phi_to_ellipticity(LENS["q"], LENS["phi"])
    le1, le2 = q_phi_to_ellipticity(LIGHT["q"], LIGHT["phi"])
    se1, se2 = q_phi_to_ellipticity(SRC["q"], SRC["phi"])
    t = {k: torch.tensor(float(LENS[k]), dtype=torch.float64)
         for k in ("r_ein", "gamma", "x0", "y0", "g1", "g2")}
    t.update(e1=e1, e2=e2, light0_e1=le1, light0_e2=le2, src_e1=se1, src_e2=se2)
    t.update({f"light0_{k}": torch.tensor(float(LIGHT[k]), dtype=torch.float64)
              for k in ("amp", "r_e", "n")})
    t.update({f"src_{k}": torch.tensor(float(SRC[k]), dtype=torch.float64)
              for k in ("amp", "r_e", "n", "x0", "y0")})
    return t


def test_lens_light_sites_and_masked_pixels():
    sim = Simulator(npix=16, pixel_scale=0.2, psf_sigma=0.1, dtype=torch.float64)
    truth_img = sim.image(LENS, Sersic(**SRC), [Sersic(x0=LENS["x0"], y0=LENS["y0"], **LIGHT)])
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[3, 4] = False
    changed = truth_img.clone()
    changed[3, 4] += 1e3
    priors = Priors.default("sersic", lens_light=1)
    lps = []
    for data in (truth_img, changed):
        model = LensModel(data, 0.01, sim, source="sersic", priors=priors, mask=mask)
        tr = pyro.poutine.trace(pyro.poutine.condition(model, data=_sites())).get_trace()
        torch.testing.assert_close(tr.nodes["model_image"]["value"], truth_img)  # tied centre
        lps.append(float(tr.log_prob_sum()))
        assert "light0_x0" not in tr.nodes and "light0_amp" in tr.nodes
    assert lps[0] == lps[1]


@pytest.mark.slow
@pytest.mark.parametrize("marginalise", [False, True], ids=["sampled", "amplitudes-integrated"])
def test_joint_fit_recovers_lens_light_and_mass(marginalise):
    """Within 2% for mass and light; with the amplitudes integrated out (Priors.
    with_amplitudes_marginalised) the source amplitude, solved analytically, within 5%."""
    sim = Simulator(npix=64, pixel_scale=0.06, psf_sigma=0.08, dtype=torch.float64)
    clean = sim.image(LENS, Sersic(**SRC), [Sersic(x0=LENS["x0"], y0=LENS["y0"], **LIGHT)])
    g = torch.Generator().manual_seed(3)
    sigma = 0.01
    data = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    obs = Observation(data.numpy(), sigma, 0.06, psf=sim.psf.numpy())
    fit = fit_lens(obs, source="sersic", lens_light=1, steps=1500, restarts=3, seed=0,
                   marginalise_amplitudes=marginalise, progress=False)
    got = fit.summary()["map"]
    for k in ("r_ein", "q", "gamma"):
        assert got[k] == pytest.approx(LENS[k], rel=0.02), k
    for k in ("amp", "r_e", "n"):
        assert got[f"light0_{k}"] == pytest.approx(LIGHT[k], rel=0.02), k
    assert fit.map.reduced_chi2 < 1.1
    if marginalise:
        assert got["src_amp"] == pytest.approx(SRC["amp"], rel=0.05)
        assert "src_amp" not in fit.map.sample_sites()


def test_a_bad_lens_light_value_is_named_as_lens_light():
    """The lens light is drawn by the same Sersic profile as a source; its errors must name the
    lens light (they once said "source amp" in a fit whose source was the VAE)."""
    sim = Simulator(npix=16, pixel_scale=0.2, psf_sigma=0.1, dtype=torch.float64)
    model = LensModel(torch.zeros(16, 16, dtype=torch.float64), 0.01, sim, source="sersic",
                      priors=Priors.default("sersic", lens_light=1))
    sites = _sites()
    sites["light0_amp"] = torch.tensor(float("inf"), dtype=torch.float64)
    with pytest.raises(ValueError, match="lens light 0 amp"):
        pyro.poutine.condition(model, data=sites)()


def test_fixed_lens_light_is_not_sampled_and_images_unchanged():
    sim = Simulator(npix=16, pixel_scale=0.2, psf_sigma=0.1, dtype=torch.float64)
    priors = Priors.default("sersic", lens_light=1)
    model = LensModel(torch.zeros(16, 16, dtype=torch.float64), 0.01, sim, source="sersic",
                      priors=priors)
    sites = _sites()
    light = {k: v for k, v in sites.items() if k.startswith("light")}
    held = model.with_fixed(light)
    assert held.priors is not model.priors and model.fixed_values() == {}  # original untouched
    assert set(held.fixed_values()) == set(light)
    rest = {k: v for k, v in sites.items() if k not in light}
    tr_full = pyro.poutine.trace(pyro.poutine.condition(model, data=sites)).get_trace()
    tr_held = pyro.poutine.trace(pyro.poutine.condition(held, data=rest)).get_trace()
    assert not any(k.startswith("light") for k in tr_held.stochastic_nodes)
    torch.testing.assert_close(tr_held.nodes["model_image"]["value"],
                               tr_full.nodes["model_image"]["value"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not a site"):
        model.with_fixed({"light3_n": 2.0})
    with pytest.raises(ValueError, match="only scalar"):
        model.with_fixed({"r_ein": torch.ones(2)})


def test_priors_object_is_not_silently_overridden():
    """A Priors object fixes the light components and amplitude scale; a count or scale given
    beside it that disagrees is an error, not ignored."""
    from difflens.fitting import build_model
    obs = Observation(torch.zeros(16, 16).numpy() + 1.0, 0.1, 0.2, psf=None)
    two = Priors.default("sersic", lens_light=2)
    model = build_model(obs, source="sersic", priors=two, psf_sigma=0.1)
    assert len(model.priors.lens_light) == 2
    assert len(build_model(obs, source="sersic", priors=two, psf_sigma=0.1,
                           lens_light=2).priors.lens_light) == 2
    with pytest.raises(ValueError, match="lens_light=1 but the Priors given have 2"):
        build_model(obs, source="sersic", priors=two, psf_sigma=0.1, lens_light=1)
    with pytest.raises(ValueError, match="flux_scale"):
        build_model(obs, source="sersic", priors=two, psf_sigma=0.1, flux_scale=3.0)


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not available")
def test_the_lens_light_prefit_of_a_real_lens_does_not_depend_on_precision():
    """HST lens 3: the light-only prefit is chaotic there (one start lands in another basin for
    a 1e-9 change of the noise map) and in float32 its L-BFGS stage stalled, so float32 and
    float64 models once started their MAPs from different light (Sersic index 7.9 against
    0.7).  With several starts, run in float64, both precisions reach the same light."""
    from difflens.datasets.observation import read_observation
    from difflens.fitting import build_model
    from difflens.infer.initialise import fit_lens_light

    d = SHARED / "lens_dolphin_hst" / "lens_system3"
    obs = read_observation(d / "image_lens_system3_F600LP.h5",
                           psf=d / "psf_lens_system3_F600LP.h5")
    obs = obs.excluding_discs([(2.18, -0.70), (-2.22, 1.94)], [0.45, 0.30])
    fits = [fit_lens_light(build_model(obs, source="sersic", lens_light=2, dtype=dtype))[0]
            for dtype in (torch.float64, torch.float32)]
    assert fits[1]["light0_n"].dtype == torch.float32          # returned in the model's dtype
    for k, v in fits[0].items():
        assert float(fits[1][k]) == pytest.approx(float(v), rel=1e-2, abs=1e-3), k


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not available")
def test_the_lens_light_prefit_survives_an_overflowing_line_search():
    """JWST ring: from a start at r_e = 1", n = 4 the L-BFGS line search of the prefit tries a
    step whose amplitude exp(log_amp) overflows to inf.  That stage must be undone, not end the
    fit (it once raised "parameter 'source amp' is not finite: inf" out of fit_lens)."""
    import json

    from difflens.datasets.observation import read_observation
    from difflens.fitting import build_model
    from difflens.infer.initialise import fit_lens_light

    d = SHARED / "lens_cosmosweb_ring_jwst" / "F150W"
    pixel_scale = json.loads((d / "info.json").read_text())["pixel_scale"]
    obs = read_observation(d / "data.fits", noise_map=d / "noise_map.fits", psf=d / "psf.fits",
                           exclude=d / "mask_extra_galaxies.fits",
                           pixel_scale=pixel_scale).cutout(141)
    values, image = fit_lens_light(build_model(obs, source="sersic", lens_light=2),
                                   starts=((1.0, 4.0),))
    assert all(bool(torch.isfinite(v).all()) for v in values.values())
    assert bool(torch.isfinite(image).all())

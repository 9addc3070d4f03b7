"""COOLEST export: conventions against the lenstronomy reader's formulas, and the written model."""
import json

import numpy as np
import pytest
import torch
from astropy.io import fits

import difflens.coolest as coolest
from difflens.datasets.observation import Observation
from difflens.fitting import LensFit, build_model
from difflens.infer import MAPResult
from difflens.infer.mcmc import _posterior_from_draws
from difflens.lensing import (from_coolest_pemd, from_coolest_shear, to_coolest_pemd,
                              to_coolest_shear, to_lenstronomy_epl)
from difflens.model import q_phi_to_ellipticity


def _lenstronomy_reader(pemd, shear):
    """lenstronomy's COOLEST reader (its frame: x along RA, to the left), written out by hand:
    angle_L = 90 deg - phi_C, e1 + i e2 = (1-q)/(1+q) exp(2 i angle_L), center_x_L = -center_x;
    then mirrored into the difflens frame (x -> -x: e2 -> -e2, gamma2 -> -gamma2)."""
    a = np.deg2rad(90.0 - pemd["phi"])
    e = (1 - pemd["q"]) / (1 + pemd["q"])
    b = np.deg2rad(90.0 - shear["phi_ext"])
    return dict(e1=e * np.cos(2 * a), e2=-e * np.sin(2 * a), center_x=-(-pemd["center_x"]),
                gamma1=shear["gamma_ext"] * np.cos(2 * b), gamma2=-shear["gamma_ext"] * np.sin(2 * b))


def test_coolest_conventions_agree_with_the_lenstronomy_reader():
    rng = np.random.default_rng(0)
    for _ in range(200):
        r_ein, q, phi = rng.uniform(0.5, 2), rng.uniform(0.2, 1), rng.uniform(-4, 4)
        g1, g2, x0 = rng.normal(0, 0.05), rng.normal(0, 0.05), rng.normal(0, 0.1)
        pemd, shear = to_coolest_pemd(r_ein, q, phi, 2.1, x0, 0.0), to_coolest_shear(g1, g2)
        assert -90 <= pemd["phi"] < 90 and -90 <= shear["phi_ext"] < 90
        ref, ours = _lenstronomy_reader(pemd, shear), to_lenstronomy_epl(r_ein, q, phi, 2.1, x0)
        for k in ("e1", "e2", "center_x"):
            assert ref[k] == pytest.approx(ours[k], abs=1e-12)
        assert (ref["gamma1"], ref["gamma2"]) == pytest.approx((g1, g2), abs=1e-12)
        assert pemd["theta_E"] == pytest.approx(np.sqrt(q) * r_ein, rel=1e-14)
        back = from_coolest_pemd(**pemd)
        assert back["r_ein"] == pytest.approx(r_ein, rel=1e-12)
        assert np.sin(2 * (back["phi"] - phi)) == pytest.approx(0.0, abs=1e-12)
        assert tuple(from_coolest_shear(**shear).values()) == pytest.approx((g1, g2), abs=1e-12)
    # a major axis along +y (North in a north-up image) has position angle 0
    assert float(to_coolest_pemd(1.0, 0.5, np.pi / 2, 2.0)["phi"]) == pytest.approx(0.0, abs=1e-12)


LENS = dict(r_ein=1.2, q=0.8, phi=0.0, gamma=2.05, x0=0.03, y0=-0.02, g1=0.02, g2=0.01)
LIGHT = dict(amp=0.4, r_e=0.5, n=3.0, q=0.7, phi=0.4)
SRC = dict(amp=1.5, r_e=0.15, n=1.0, q=0.8, phi=0.2, x0=0.05, y0=0.02)


def _known_fit(sd=0.02, chains=2, draws=300):
    """A LensFit whose MAP is LENS/LIGHT/SRC and whose posterior draws are Gaussian around it
    (lens phi = 0 puts the COOLEST angle on its +-90 deg wrap)."""
    rng = np.random.default_rng(1)
    obs = Observation(rng.normal(0, 0.05, (24, 24)) + 0.5, 0.05, 0.16)
    model = build_model(obs, source="sersic", lens_light=1, psf_sigma=0.1)
    sites = dict(e1=q_phi_to_ellipticity(LENS["q"], LENS["phi"])[0],
                 e2=q_phi_to_ellipticity(LENS["q"], LENS["phi"])[1])
    sites.update({k: LENS[k] for k in ("r_ein", "gamma", "x0", "y0", "g1", "g2")})
    le1, le2 = q_phi_to_ellipticity(LIGHT["q"], LIGHT["phi"])
    se1, se2 = q_phi_to_ellipticity(SRC["q"], SRC["phi"])
    sites.update(light0_amp=LIGHT["amp"], light0_r_e=LIGHT["r_e"], light0_n=LIGHT["n"],
                 light0_e1=le1, light0_e2=le2, src_e1=se1, src_e2=se2,
                 **{f"src_{k}": SRC[k] for k in ("amp", "r_e", "n", "x0", "y0")})
    sites = {k: torch.as_tensor(float(v), dtype=torch.float64) for k, v in sites.items()}
    params = dict(sites, q=torch.tensor(LENS["q"], dtype=torch.float64),
                  phi=torch.tensor(LENS["phi"], dtype=torch.float64))
    zero = torch.zeros(24, 24, dtype=torch.float64)
    result = MAPResult(params=params, loss_history=np.zeros(1), model_image=zero,
                       normalised_residuals=zero, source_image=None, reduced_chi2=1.01,
                       log_posterior=0.0)
    post = {k: float(v) + sd * rng.standard_normal((chains, draws)) for k, v in sites.items()}
    posterior = _posterior_from_draws(model, sites, post)
    return LensFit(obs, model, result, posterior), post


def test_written_model_holds_the_fit_in_coolest_conventions(tmp_path):
    fit, post = _known_fit()
    path = coolest.write_coolest(fit, tmp_path / "c")
    doc = json.loads(path.read_text())
    shear, lens, source = doc["lensing_entities"]
    pemd = lens["mass_model"][0]["parameters"]
    point = {k: v["point_estimate"]["value"] for k, v in pemd.items()}
    assert point["theta_E"] == pytest.approx(np.sqrt(0.8) * 1.2, rel=1e-12)
    assert point["phi"] == pytest.approx(-90.0)                # major axis along +x
    assert (point["center_x"], point["center_y"], point["gamma"]) == pytest.approx((0.03, -0.02, 2.05))
    sh = {k: v["point_estimate"]["value"] for k, v in shear["mass_model"][0]["parameters"].items()}
    assert sh["gamma_ext"] == pytest.approx(np.hypot(0.02, 0.01))
    assert sh["phi_ext"] == pytest.approx(np.degrees(0.5 * np.arctan2(0.01, 0.02)) - 90.0)
    light = {k: v["point_estimate"]["value"]
             for k, v in lens["light_model"][0]["parameters"].items()}
    assert light["theta_eff"] == pytest.approx(np.sqrt(0.7) * 0.5, rel=1e-6)
    assert light["phi"] == pytest.approx(np.degrees(0.4) - 90.0, abs=1e-4)
    assert (light["center_x"], light["center_y"]) == pytest.approx((0.03, -0.02))  # tied centre
    assert source["light_model"][0]["type"] == "Sersic"
    # posterior statistics from the draws, computed here from the raw site draws
    stats = pemd["gamma"]["posterior_stats"]
    assert stats["median"] == pytest.approx(np.median(post["gamma"]), rel=1e-12)
    assert stats["percentile_84th"] - stats["percentile_16th"] == pytest.approx(0.04, rel=0.15)
    # the angle straddles +-90 deg: summarised on the branch of the MAP, not averaged to ~0
    phi = pemd["phi"]["posterior_stats"]
    assert abs(abs(phi["mean"]) - 90.0) < 2.0 and abs(abs(phi["median"]) - 90.0) < 2.0
    draws = np.degrees(fit.posterior.idata.posterior["phi"].values.reshape(-1)) - 90.0
    for k, q in (("percentile_16th", 16), ("percentile_84th", 84), ("median", 50)):
        assert np.sin(np.radians(2 * (phi[k] - np.percentile(draws, q)))) == pytest.approx(
            0.0, abs=1e-9)
    assert np.remainder(phi["percentile_84th"] - phi["percentile_16th"], 180.0) < 20.0
    # the FITS files are the data and the PSF of the fit
    assert np.array_equal(fits.getdata(path.parent / "image.fits"), fit.observation.image)
    assert fits.getdata(path.parent / "psf.fits").sum() == pytest.approx(1.0)
    assert doc["observation"]["noise"]["type"] == "NoiseMap"
    assert np.all(fits.getdata(path.parent / "noise_map.fits") == 0.05)
    assert doc["observation"]["pixels"]["field_of_view_x"] == pytest.approx([-1.92, 1.92])


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    fit, _ = _known_fit(draws=20)

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(coolest, "_source_entity", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        fit.save(tmp_path / "out", coolest=True)
    assert list(tmp_path.iterdir()) == []


def test_vae_source_noise_map_and_mask_are_written_as_fits(tmp_path):
    rng = np.random.default_rng(2)
    noise = rng.uniform(0.04, 0.06, (24, 24))
    mask = np.ones((24, 24), bool)
    mask[:3] = False
    obs = Observation(rng.normal(0, 0.05, (24, 24)) + 0.5, noise, 0.16, mask=mask)
    model = build_model(obs, source="vae", psf_sigma=0.1)
    params = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in LENS.items()}
    params.update(src_x0=torch.tensor(0.1), src_y0=torch.tensor(-0.2), src_s=torch.tensor(0.8),
                  src_amp=torch.tensor(2.0), z=torch.zeros(64))
    stamp = torch.rand(64, 64, dtype=torch.float64)
    zero = torch.zeros(24, 24, dtype=torch.float64)
    result = MAPResult(params=params, loss_history=np.zeros(1), model_image=zero,
                       normalised_residuals=zero, source_image=stamp, reduced_chi2=1.0,
                       log_posterior=0.0)
    path = coolest.write_coolest(LensFit(obs, model, result), tmp_path)
    doc = json.loads(path.read_text())
    grid = doc["lensing_entities"][2]["light_model"][0]["parameters"]["pixels"]
    assert grid["field_of_view_x"] == pytest.approx([0.1 - 0.8, 0.1 + 0.8])
    assert grid["field_of_view_y"] == pytest.approx([-0.2 - 0.8, -0.2 + 0.8])
    assert np.array_equal(fits.getdata(tmp_path / grid["fits_file"]["path"]), stamp.numpy())
    assert doc["observation"]["noise"]["type"] == "NoiseMap"
    assert np.array_equal(fits.getdata(tmp_path / "noise_map.fits"), noise)
    likelihood_mask = doc["likelihoods"][0]["mask"]["fits_file"]["path"]
    assert np.array_equal(fits.getdata(tmp_path / likelihood_mask).astype(bool), mask)
    pemd = doc["lensing_entities"][1]["mass_model"][0]["parameters"]
    assert pemd["theta_E"]["posterior_stats"]["median"] is None        # MAP only


def test_lenstronomy_reads_the_export(tmp_path):
    """Where lenstronomy (with the coolest package) is installed: its COOLEST reader recovers
    our lens in its own frame (x along RA: centre_x and e2, gamma2 mirrored)."""
    reader = pytest.importorskip("lenstronomy.Util.coolest_interface")
    fit, _ = _known_fit(draws=20)
    path = coolest.write_coolest(fit, tmp_path, z_lens=0.5, z_source=2.0)
    out = reader.create_lenstronomy_from_coolest(str(path)[:-5])
    shear, epl = out["kwargs_result"]["kwargs_lens"]
    ours = to_lenstronomy_epl(*(LENS[k] for k in ("r_ein", "q", "phi", "gamma", "x0", "y0")))
    assert epl["theta_E"] == pytest.approx(ours["theta_E"])
    assert (epl["e1"], epl["e2"]) == pytest.approx((ours["e1"], -ours["e2"]), abs=1e-12)
    assert (epl["center_x"], epl["center_y"]) == pytest.approx((-LENS["x0"], LENS["y0"]))
    assert (shear["gamma1"], shear["gamma2"]) == pytest.approx((LENS["g1"], -LENS["g2"]))

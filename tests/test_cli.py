"""CLI contract: simulate -> fit round trip on a small image, and bad input."""
import json

import numpy as np
import pytest

from difflens.cli import main
from difflens.datasets.observation import Observation, read_observation, write_observation


def test_observation_fits_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    obs = Observation(rng.normal(size=(10, 12)), np.full((10, 12), 0.2), 0.05,
                      psf=np.outer([1, 2, 1], [1, 2, 1]), mask=rng.uniform(size=(10, 12)) > 0.2,
                      truth=dict(r_ein=1.3, z=[0.1, 0.2]))
    write_observation(obs, tmp_path / "o.fits")
    back = read_observation(tmp_path / "o.fits")
    np.testing.assert_array_equal(back.image, obs.image)
    np.testing.assert_array_equal(back.noise_sigma, obs.noise_sigma)
    np.testing.assert_allclose(back.psf.sum(), 1.0)
    np.testing.assert_array_equal(back.mask, obs.mask)
    assert back.pixel_scale == 0.05 and back.truth == dict(r_ein=1.3, z=[0.1, 0.2])


def test_observation_validation(tmp_path):
    img = np.zeros((5, 5))
    with pytest.raises(ValueError, match="noise map shape"):
        Observation(img, np.ones((4, 5)), 0.1)
    with pytest.raises(ValueError, match="positive"):
        Observation(img, -1.0, 0.1)
    with pytest.raises(ValueError, match="pixel_scale"):
        Observation(img, 1.0, 0.0)
    bad = img.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="not masked"):
        Observation(bad, 1.0, 0.1)
    m = np.ones((5, 5), bool)
    m[1, 1] = False
    Observation(bad, 1.0, 0.1, mask=m)                 # masked NaN is fine
    with pytest.raises(ValueError, match="not centred"):
        off = np.zeros((5, 5))
        off[0, 4] = 1
        Observation(img, 1.0, 0.1, psf=off)


def test_simulate_then_fit_round_trip(tmp_path, capsys):
    obs_path = tmp_path / "obs.fits"
    assert main(["simulate", "--out", str(obs_path), "--source", "sersic", "--npix", "40",
                 "--pixel-scale", "0.1", "--seed", "2", "--noise-sigma", "0.05"]) == 0
    obs = read_observation(obs_path, noise_sigma=0.05)
    assert obs.shape == (40, 40) and obs.pixel_scale == pytest.approx(0.1)
    out = tmp_path / "fit"
    assert main(["fit", str(obs_path), "--noise-sigma", "0.05", "--psf-sigma", "0.05",
                 "--source", "sersic", "--steps", "150", "--restarts", "2", "--samples", "0",
                 "--coolest", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for k in ("r_ein", "q", "phi", "gamma", "x0", "y0", "g1", "g2"):
        assert np.isfinite(summary["map"][k])
    assert 0.1 <= summary["map"]["q"] <= 1.0 and 1.0 < summary["map"]["gamma"] < 3.0
    assert "theta_E" in summary["map_lenstronomy"] and summary["reduced_chi2"] > 0
    assert (out / "fit.png").exists() and "posterior" not in summary
    lens = json.loads((out / "coolest.json").read_text())["lensing_entities"][1]
    pemd = lens["mass_model"][0]["parameters"]
    assert pemd["theta_E"]["point_estimate"]["value"] == pytest.approx(
        summary["map_lenstronomy"]["theta_E"])


@pytest.mark.parametrize("args,message", [
    (["fit", "{missing}", "--noise-sigma", "0.1"], "not found"),
    (["fit", "{junk}", "--noise-sigma", "0.1"], "not a readable FITS"),
    (["fit", "{obs}", "--noise-sigma", "-0.1"], "positive"),
    (["fit", "{obs}"], "noise"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--mask", "{small}"], "mask shape"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--exclude", "{small}"], "exclusion mask shape"),
    (["fit", "{obs}", "--noise-map", "{small}"], "noise map shape"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--cutout", "40"], "cutout size"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--sampler", "nuts", "--checkpoint", "{junk}"],
     "sampler='hmc' only"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--sampler", "nuts", "--pilot", "{junk}"],
     "sampler='hmc' only"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--pilot", "{missing}"], "does not exist"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--pilot-flow"], "pass pilot"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--source-correction", "-0.05"],
     "source correction sigma must be a positive"),
    (["fit", "{obs}", "--noise-sigma", "0.1", "--source-correction", "0.05"], "needs the VAE"),
])
def test_fit_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, args, message):
    from astropy.io import fits

    paths = dict(missing=tmp_path / "nope.fits", junk=tmp_path / "junk.fits",
                 obs=tmp_path / "obs.fits", small=tmp_path / "small.fits")
    paths["junk"].write_text("not a fits file")
    write_observation(Observation(np.zeros((16, 16)), 0.1, 0.1), paths["obs"])
    fits.PrimaryHDU(np.ones((3, 3))).writeto(paths["small"])
    out = tmp_path / "out"
    argv = [a.format(**paths) for a in args] + ["--out", str(out), "--source", "sersic"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_fit_with_lens_light_and_exclusion_mask(tmp_path):
    import torch
    from astropy.io import fits

    from difflens.simulate import Simulator
    from difflens.sources import Sersic

    lens = dict(r_ein=0.9, q=0.85, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
    sim = Simulator(npix=40, pixel_scale=0.08, psf_sigma=0.08, dtype=torch.float64)
    img = sim.image(lens, Sersic(amp=0.5, r_e=0.15, n=1.0, x0=0.05),
                    [Sersic(amp=0.3, r_e=0.5, n=2.5, q=0.8, phi=0.2)])
    img = img + 0.01 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)
    img[3:6, 30:34] += 50.0                       # a "neighbour" that the exclusion mask removes
    exclude = np.zeros((40, 40))
    exclude[3:6, 30:34] = 1
    write_observation(Observation(img.numpy(), 0.01, 0.08), tmp_path / "obs.fits")
    fits.PrimaryHDU(exclude).writeto(tmp_path / "ex.fits")
    out = tmp_path / "fit"
    assert main(["fit", str(tmp_path / "obs.fits"), "--noise-sigma", "0.01", "--psf-sigma", "0.08",
                 "--source", "sersic", "--lens-light", "sersic", "--exclude",
                 str(tmp_path / "ex.fits"), "--steps", "300", "--restarts", "2", "--samples", "0",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pixels"] == 40 * 40 - 12
    assert summary["map"]["light0_r_e"] == pytest.approx(0.5, rel=0.1)
    assert summary["map"]["r_ein"] == pytest.approx(0.9, rel=0.05)
    assert summary["reduced_chi2"] < 1.5


def test_fit_checkpoint_resumes_with_the_same_draws(tmp_path):
    obs_path = tmp_path / "obs.fits"
    assert main(["simulate", "--out", str(obs_path), "--source", "sersic", "--npix", "32",
                 "--pixel-scale", "0.12", "--seed", "3", "--noise-sigma", "0.05"]) == 0
    state = tmp_path / "hmc.pt"
    argv = ["fit", str(obs_path), "--noise-sigma", "0.05", "--source", "sersic", "--steps", "100",
            "--restarts", "1", "--samples", "6", "--warmup", "6", "--chains", "2",
            "--checkpoint", str(state)]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert state.exists()
    # a rerun finds the finished state and returns its draws instead of sampling again
    state_time = state.stat().st_mtime_ns
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab"]
    a, b = (s["posterior"] for s in summaries)
    assert a["r_ein"]["mean"] == b["r_ein"]["mean"] and a["gamma"]["sd"] == b["gamma"]["sd"]
    # the sampler's wall times are reported beside the MAP's
    assert {"map", "warmup", "sampling"} <= set(summaries[0]["seconds"])
    assert state.stat().st_mtime_ns == state_time


@pytest.mark.filterwarnings("ignore:poor convergence")        # 6 draws: only the plumbing
def test_fit_from_an_earlier_fit_with_a_site_held_and_amplitudes_marginalised(tmp_path, capsys):
    obs_path = tmp_path / "obs.fits"
    assert main(["simulate", "--out", str(obs_path), "--source", "sersic", "--npix", "32",
                 "--pixel-scale", "0.12", "--seed", "3", "--noise-sigma", "0.05"]) == 0
    base = ["fit", str(obs_path), "--noise-sigma", "0.05", "--source", "sersic", "--restarts",
            "1"]
    assert main(base + ["--steps", "100", "--samples", "0", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--steps", "5", "--samples", "6", "--warmup", "6", "--chains", "2",
                        "--init-from", str(tmp_path / "a"), "--hold", "g1",
                        "--marginalise-amplitudes", "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "summary.json").read_text())
    # the amplitude was integrated out: solved at the MAP, drawn per posterior draw
    assert second["map"]["src_amp"] > 0
    import arviz as az
    amp = az.from_netcdf(str(tmp_path / "b" / "posterior.nc")).posterior["src_amp"].values
    assert amp.shape == (2, 6) and amp.std() > 0
    g1 = second["posterior"]["g1"]
    assert g1["sd"] < 1e-12 and g1["mean"] == pytest.approx(second["map"]["g1"], rel=1e-12)
    assert second["posterior"]["gamma"]["sd"] > 0
    assert main(base + ["--init-from", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "c")]) == 2
    assert "summary.json" in capsys.readouterr().err
    assert main(base + ["--samples", "2", "--hold", "src_size", "--out", str(tmp_path / "d")]) == 2
    assert "src_size" in capsys.readouterr().err
    assert main(base + ["--samples", "2", "--hold", "src_amp", "--marginalise-amplitudes",
                        "--out", str(tmp_path / "e")]) == 2
    assert "src_amp" in capsys.readouterr().err


def test_fit_finals_accepts_a_count_or_all():
    from difflens.cli import build_parser

    def finals(*extra):
        return build_parser().parse_args(["fit", "image.fits", "--out", "fit", *extra]).finals

    assert finals() == 1 and finals("--finals", "3") == 3 and finals("--finals", "all") == "all"
    with pytest.raises(SystemExit):
        finals("--finals", "most")


def test_fit_tempering_takes_a_count_or_the_inverse_temperatures():
    from difflens.cli import build_parser

    def tempering(*extra):
        return build_parser().parse_args(["fit", "image.fits", "--out", "fit",
                                          *extra]).tempering

    assert tempering() is None and tempering("--tempering", "4") == 4
    assert tempering("--tempering", "1,0.7,0.5") == [1.0, 0.7, 0.5]
    with pytest.raises(SystemExit):
        tempering("--tempering", "hot")


def test_fit_source_correction_options():
    from difflens.cli import _correction, build_parser

    def correction(*extra):
        return _correction(build_parser().parse_args(["fit", "image.fits", "--out", "fit",
                                                      *extra]))

    assert correction() is None
    default = correction("--source-correction", "0.05")
    assert (default.sigma, default.pixels) == (0.05, 64)
    coarse = correction("--source-correction", "0.1", "--correction-pixels", "32")
    assert (coarse.sigma, coarse.pixels, coarse.size) == (0.1, 32, 1024)
    assert coarse.smoothing == 0.0 and coarse.flux is None        # flux: from the priors
    assert correction("--source-correction", "0.1", "--correction-smoothing", "1.5").smoothing == 1.5
    assert default.regularisation == "identity" and default.frame is None
    fixed = correction("--source-correction", "0.03", "--correction-regularisation", "gradient",
                       "--correction-frame", "0.1", "-0.2", "1.5")
    assert (fixed.regularisation, fixed.frame) == ("gradient", (0.1, -0.2, 1.5))


def test_fit_sampler_choices_include_laplace():
    from difflens.cli import build_parser

    def sampler(*extra):
        return build_parser().parse_args(["fit", "image.fits", "--out", "fit", *extra]).sampler

    assert sampler() == "hmc" and sampler("--sampler", "laplace") == "laplace"
    with pytest.raises(SystemExit):
        sampler("--sampler", "mh")

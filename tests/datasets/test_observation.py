"""Real-data handling: noise maps from exposure, PSF files, masks, cutouts, lenstronomy HDF5."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits

from difflens.datasets.observation import (Observation, load_psf, read_lenstronomy_hdf5,
                                           read_observation, write_observation)
from difflens.instrument import aperture_mask, noise_map_from_exposure

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_noise_map_matches_simulated_poisson_plus_background():
    """Independent truth: draw counts ~ Poisson(I t) plus Gaussian background, convert to
    counts/s, and compare the empirical scatter with the formula."""
    rng = np.random.default_rng(1)
    rate = np.array([0.0, 0.5, 3.0, 20.0])              # counts/s
    t_exp, rms = np.array([400.0, 1000.0, 250.0, 2000.0]), 0.01
    draws = rng.poisson(rate * t_exp, size=(200000, 4)) / t_exp + rng.normal(0, rms, (200000, 4))
    sigma = noise_map_from_exposure(torch.tensor(rate), rms, torch.tensor(t_exp)).numpy()
    np.testing.assert_allclose(draws.std(0), sigma, rtol=0.01)
    # negative pixels carry background noise only
    assert float(noise_map_from_exposure(torch.tensor([-5.0]), 0.3, 10.0)) == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(background_rms=0.0, exposure_time=1.0), "background_rms"),
    (dict(background_rms=0.1, exposure_time=np.zeros((3, 3))), "exposure_time"),
    (dict(background_rms=0.1, exposure_time=np.ones((2, 3))), "exposure map shape"),
])
def test_noise_map_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        noise_map_from_exposure(np.ones((3, 3)), **kwargs)


def test_psf_files_are_normalised_and_checked(tmp_path):
    k = np.outer([1.0, 4.0, 1.0], [1.0, 4.0, 1.0])      # sums to 36
    fits.PrimaryHDU(k).writeto(tmp_path / "psf.fits")
    with pytest.warns(RuntimeWarning, match="sums to 36"):
        psf = load_psf(tmp_path / "psf.fits")
    assert psf.sum() == pytest.approx(1.0) and psf[1, 1] == pytest.approx(16 / 36)
    with h5py.File(tmp_path / "psf.h5", "w") as h:
        h["kernel_point_source"] = k / 36
    np.testing.assert_allclose(load_psf(tmp_path / "psf.h5"), k / 36)
    off = np.zeros((5, 5))
    off[1, 3] = 1.0
    with pytest.raises(ValueError, match="not centred"):
        load_psf(off)
    with pytest.raises(ValueError, match="odd"), pytest.warns(RuntimeWarning):
        load_psf(np.ones((4, 4)))
    with pytest.raises(FileNotFoundError):
        load_psf(tmp_path / "nope.fits")


def test_exclusion_mask_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    obs = Observation(rng.normal(size=(12, 12)), np.full((12, 12), 0.3), 0.05,
                      psf=np.outer([1, 2, 1], [1, 2, 1]))
    write_observation(obs, tmp_path / "o.fits")
    exclude = np.zeros((12, 12))
    exclude[2:4, 5:9] = 1
    fits.PrimaryHDU(exclude).writeto(tmp_path / "ex.fits")
    use = np.ones((12, 12))
    use[0] = 0
    fits.PrimaryHDU(use).writeto(tmp_path / "use.fits")
    back = read_observation(tmp_path / "o.fits", exclude=tmp_path / "ex.fits",
                            mask=tmp_path / "use.fits")
    assert back.mask.sum() == 144 - 8 - 12
    assert not back.mask[0].any() and not back.mask[2:4, 5:9].any()
    write_observation(back, tmp_path / "o2.fits")
    again = read_observation(tmp_path / "o2.fits")
    np.testing.assert_array_equal(again.mask, back.mask)
    np.testing.assert_array_equal(again.noise_sigma, back.noise_sigma)
    np.testing.assert_allclose(again.psf, back.psf)
    fits.PrimaryHDU(np.zeros((5, 5))).writeto(tmp_path / "bad.fits")
    with pytest.raises(ValueError, match="exclusion mask shape"):
        read_observation(tmp_path / "o.fits", exclude=tmp_path / "bad.fits")


def test_cutout_and_aperture_mask():
    img = np.arange(100.0).reshape(10, 10)
    obs = Observation(img, np.full((10, 10), 1.0) + img, 0.1, mask=img % 2 == 0)
    cut = obs.cutout(4, centre=(5, 6))
    np.testing.assert_array_equal(cut.image, img[3:7, 4:8])
    np.testing.assert_array_equal(cut.noise_sigma, 1.0 + img[3:7, 4:8])
    np.testing.assert_array_equal(cut.mask, img[3:7, 4:8] % 2 == 0)
    with pytest.raises(ValueError, match="leaves"):
        obs.cutout(6, centre=(1, 1))
    m = aperture_mask(41, 0.1, 1.5, inner_radius=0.5).numpy()
    # pixel count approximates the annulus area pi (1.5^2 - 0.5^2) / 0.1^2 = 628
    assert abs(m.sum() - 628.3) < 25


def test_lenstronomy_hdf5_reader(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.uniform(-0.01, 0.5, size=(20, 24))
    exposure = rng.uniform(100, 500, size=(20, 24))
    with h5py.File(tmp_path / "img.h5", "w") as h:
        h["image_data"] = img
        h["background_rms"] = 0.02
        h["exposure_time"] = exposure
        h["transform_pix2angle"] = np.array([[-0.05, 0.0], [0.0, 0.05]])
    psf = np.outer([1, 3, 1], [1, 3, 1]) / 25.0
    with h5py.File(tmp_path / "psf.h5", "w") as h:
        h["kernel_point_source"] = psf
    obs = read_lenstronomy_hdf5(tmp_path / "img.h5", tmp_path / "psf.h5")
    assert obs.pixel_scale == pytest.approx(0.05)
    np.testing.assert_allclose(obs.noise_sigma, np.sqrt(0.02 ** 2 + np.maximum(img, 0) / exposure))
    np.testing.assert_allclose(obs.psf, psf)
    via_generic = read_observation(tmp_path / "img.h5", psf=tmp_path / "psf.h5", noise_sigma=0.1)
    assert via_generic.noise_sigma == 0.1
    with h5py.File(tmp_path / "partial.h5", "w") as h:
        h["image_data"] = img
    with pytest.raises(ValueError, match="lacks the lenstronomy datasets"):
        read_lenstronomy_hdf5(tmp_path / "partial.h5")


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not available")
def test_real_lens_files_load():
    d = SHARED / "lens_dolphin_hst" / "lens_system1"
    obs = read_observation(d / "image_lens_system1_F390W.h5", psf=d / "psf_lens_system1_F390W.h5")
    assert obs.shape == (120, 120) and obs.pixel_scale == pytest.approx(0.04, rel=1e-4)
    assert obs.psf.shape == (41, 41) and np.all(obs.noise_sigma > 0)
    j = SHARED / "lens_cosmosweb_ring_jwst" / "F277W"
    obs = read_observation(j / "data.fits", noise_map=j / "noise_map.fits", psf=j / "psf.fits",
                           exclude=j / "mask_extra_galaxies.fits", pixel_scale=0.06)
    assert obs.shape == (209, 209) and 0 < obs.mask.mean() < 1


def test_excluding_discs_leaves_out_the_pixels_within_the_radius():
    # 30 x 20 image, 0.05"/px: pixel (row i, col j) sits at x = (j - 9.5) 0.05, y = (i - 14.5) 0.05
    obs = Observation(np.ones((30, 20)), 0.1, 0.05, mask=np.arange(600).reshape(30, 20) % 7 != 0)
    out = obs.excluding_discs([(0.3, -0.4), (-0.2, 0.5)], [0.21, 0.12])
    i, j = np.indices((30, 20))
    x, y = (j - 9.5) * 0.05, (i - 14.5) * 0.05
    inside = (np.hypot(x - 0.3, y + 0.4) <= 0.21) | (np.hypot(x + 0.2, y - 0.5) <= 0.12)
    np.testing.assert_array_equal(out.mask, obs.mask & ~inside)
    assert 40 < inside.sum() < 80                           # ~ pi (0.21^2 + 0.12^2) / 0.05^2 = 73
    np.testing.assert_array_equal(obs.mask, np.arange(600).reshape(30, 20) % 7 != 0)  # unchanged
    with pytest.raises(ValueError, match="radii"):
        obs.excluding_discs([(0.0, 0.0)], -0.1)
    with pytest.raises(ValueError, match="finite"):
        obs.excluding_discs([(np.nan, 0.0)], 0.1)

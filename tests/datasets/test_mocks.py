"""Mock generator: the galaxy-source option and the held-out galaxies it is meant for."""
import json
from pathlib import Path

import numpy as np
import pytest

from difflens.datasets.mocks import apodise_stamp, held_out_galaxies, simulate_mock

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "hst_galaxy_stamps"
CARD = Path(__file__).resolve().parents[2] / "data" / "vae_card.json"


def _two_galaxies():
    y, x = np.mgrid[:64, :64] - 31.5
    round_ = np.exp(-(x ** 2 + y ** 2) / 50.0)
    offset = np.exp(-((x - 12) ** 2 + y ** 2 / 4) / 20.0)   # off-centre, elongated along y
    return np.stack([round_, offset])


def test_galaxy_source_cycles_and_rotates_the_stamps():
    gal = _two_galaxies()
    kw = dict(noise_sigma=1e-6, npix=32, pixel_scale=0.2, source="galaxy", galaxies=gal)
    a, b = simulate_mock(1, **kw), simulate_mock(3, **kw)      # stamp 1, rotated 0 and 90 deg
    assert (a.truth["galaxy"], a.truth["rotation_deg"]) == (1, 0)
    assert (b.truth["galaxy"], b.truth["rotation_deg"]) == (1, 90)
    # same stamp, same flux scale: the lensed images differ only through the rotation
    assert not np.allclose(a.image, b.image, atol=1e-3)
    c = simulate_mock(0, **kw)
    assert c.truth["galaxy"] == 0 and np.isfinite(c.image).all()


def test_apodise_stamp_is_the_stated_cosine_window():
    # on a flat stamp the output is the window itself: check it at radii where it is known
    n = 64
    out = apodise_stamp(np.ones((n, n)), inner=0.5)
    c = np.arange(n) - (n - 1) / 2.0
    r = np.hypot(c[:, None], c[None, :]) / ((n - 1) / 2.0)
    np.testing.assert_allclose(out[r <= 0.5], 1.0)
    assert (out[r >= 1.0] == 0.0).all()                  # corners and border: nothing left
    mid = (r > 0.5) & (r < 1.0)
    np.testing.assert_allclose(out[mid], np.cos(np.pi * (r[mid] - 0.5)) ** 2, atol=1e-12)
    # round window: a stamp rotated by 90 degrees apodises to the rotated result
    gal = _two_galaxies()[1] + 0.1
    np.testing.assert_allclose(apodise_stamp(np.rot90(gal)), np.rot90(apodise_stamp(gal)),
                               atol=1e-12)
    # a galaxy well inside the window is untouched (after renormalisation to peak 1)
    y, x = np.mgrid[:n, :n] - 31.5
    small = np.exp(-(x ** 2 + y ** 2) / 8.0)
    np.testing.assert_allclose(apodise_stamp(small), small / small.max(), atol=1e-12)
    with pytest.raises(ValueError, match="inner"):
        apodise_stamp(np.ones((8, 8)), inner=1.0)
    with pytest.raises(ValueError, match="square"):
        apodise_stamp(np.ones((8, 9)))


def test_galaxy_source_needs_stamps():
    with pytest.raises(ValueError, match="galaxies="):
        simulate_mock(0, npix=16, pixel_scale=0.2, source="galaxy")
    with pytest.raises(ValueError, match="'vae', 'galaxy' or 'sersic'"):
        simulate_mock(0, npix=16, pixel_scale=0.2, source="hubble")


@pytest.mark.skipif(not ROOT.exists(), reason="../shared/data not available")
def test_held_out_galaxies_are_the_ones_never_trained_on():
    images, ident = held_out_galaxies(ROOT)
    card = json.loads(CARD.read_text())
    assert sorted(ident) == sorted(card["real_test_held_out"])
    assert not set(ident) & (set(card["real_train"]) | set(card["real_val"]))
    assert images.shape == (len(ident), 64, 64)
    np.testing.assert_allclose(images.max(axis=(1, 2)), 1.0)
    assert (images >= 0).all()


@pytest.mark.skipif(not ROOT.exists(), reason="../shared/data not available")
def test_apodised_held_out_galaxies_have_no_edge():
    plain, _ = held_out_galaxies(ROOT)
    images, _ = held_out_galaxies(ROOT, apodise=True)
    assert images.shape == plain.shape
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    assert border.max() == 0.0 < 1e-3 < plain[:, 0].max()       # the square cut is gone
    np.testing.assert_allclose(images.max(axis=(1, 2)), 1.0)


def test_mock_source_drawn_with_the_interpolation_asked_for():
    """A smooth galaxy drawn through its stamp's pixels: the cubic and bilinear readings agree
    to a few per cent of the peak (they share every pixel value) but not exactly; a bad name is
    refused."""
    gal = _two_galaxies()
    kw = dict(noise_sigma=1e-9, npix=48, pixel_scale=0.1, source="galaxy", galaxies=gal)
    lin = simulate_mock(0, **kw).image
    cub = simulate_mock(0, source_interpolation="cubic", **kw).image
    diff = np.abs(cub - lin).max() / np.abs(lin).max()
    assert 1e-5 < diff < 0.05
    with pytest.raises(ValueError, match="interpolation"):
        simulate_mock(0, source_interpolation="nearest", **kw)

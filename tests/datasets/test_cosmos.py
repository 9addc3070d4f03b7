"""The COSMOS loader on the real files in ../shared/data (skipped where they are absent)."""
from pathlib import Path

import numpy as np
import pytest

from difflens.datasets.cosmos import (Selection, crop_and_downscale, load_cosmos, pad_with_noise,
                                      read_catalog, split)

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "hst_galaxy_stamps"
pytestmark = pytest.mark.skipif(not ROOT.exists(), reason="../shared/data not available")


def header_shapes(catalog):
    """Stamp shapes read straight from the FITS headers (independent of the loader)."""
    from astropy.io import fits

    with fits.open(catalog) as h:
        cat = h[1].data
        shapes = []
        for name, hdu in zip(cat["GAL_FILENAME"], cat["GAL_HDU"]):
            with fits.open(catalog.parent / name.strip()) as g:
                hd = g[int(hdu)].header
                shapes.append((hd["NAXIS2"], hd["NAXIS1"]))
    return shapes


def test_counts_after_each_cut_match_the_headers():
    cat = ROOT / "paltas_cosmos23.5_n1" / "real_galaxy_catalog_23.5.fits"
    shapes = header_shapes(cat)
    stamps = read_catalog(cat, Selection(snr_range=None), verbose=False)
    assert stamps.counts["catalogue"] == len(shapes) == 10
    assert stamps.counts["size"] == sum(min(s) >= 64 for s in shapes)
    assert len(stamps) == stamps.counts["snr"] == stamps.counts["size"]
    assert stamps.images.shape[1:] == (64, 64)
    np.testing.assert_allclose(stamps.images.max(axis=(1, 2)), 1.0)
    # the S/N window only ever removes galaxies, and a looser cut never keeps fewer
    strict = read_catalog(cat, Selection(), verbose=False)
    loose = read_catalog(cat, Selection(snr_range=(1.0, 1e6)), verbose=False)
    assert len(strict) <= len(loose) == len(stamps)


def test_duplicate_stamps_counted_once_and_totals_add_up():
    from astropy.io import fits

    s = load_cosmos(ROOT, Selection(snr_range=None), verbose=False)
    assert s.counts["catalogue"] == 112
    assert s.counts["unique"] == 111        # the slsim test catalogue lists one HDU twice
    expected = 0
    for cat in ROOT.rglob("real_galaxy_catalog*.fits"):
        if cat.name.endswith("_fits.fits"):
            continue
        with fits.open(cat) as h:
            keys = {(n.strip(), int(k)) for n, k in zip(h[1].data["GAL_FILENAME"],
                                                       h[1].data["GAL_HDU"])}
        for name, hdu in keys:
            with fits.open(cat.parent / name) as g:
                expected += min(g[hdu].data.shape) >= 64
    assert s.counts["size"] == len(s) == expected
    assert len(s) == len(set(s.ident))


def test_split_is_disjoint_and_reproducible():
    s = load_cosmos(ROOT, Selection(snr_range=None), verbose=False)
    a = split(s, (0.6, 0.15, 0.25), seed=3)
    b = split(s, (0.6, 0.15, 0.25), seed=3)
    ids = [set(p.ident) for p in a]
    assert sum(len(i) for i in ids) == len(s)
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert [list(p.ident) for p in a] == [list(p.ident) for p in b]


def test_crop_and_downscale_preserves_mean_and_scales_noise():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1.0, (256, 300))
    out, sigma = crop_and_downscale(img, 1.0, 64)
    assert out.shape == (64, 64)
    assert sigma == pytest.approx(0.25)
    assert out.std() == pytest.approx(0.25, rel=0.05)   # averaging 4x4 blocks of unit noise


def test_missing_catalogue_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue"):
        read_catalog(tmp_path / "real_galaxy_catalog_x.fits")
    with pytest.raises(FileNotFoundError, match="no real_galaxy_catalog"):
        load_cosmos(tmp_path)


def test_training_mix_holds_out_test_galaxies_and_repeats_real_ones():
    from difflens.sources.vae_training import prepare_training_data

    sel = Selection(snr_range=None)
    one = prepare_training_data(ROOT, n_synthetic=0, selection=sel)
    three = prepare_training_data(ROOT, n_synthetic=0, selection=sel, real_repeat=3)
    card = one["card"]
    n_train = len(card["real_train"])
    assert len(one["train"]) == 8 * n_train                  # the 8 dihedral symmetries
    assert len(three["train"]) == 3 * 8 * n_train
    np.testing.assert_array_equal(three["train"][8 * n_train:16 * n_train], one["train"])
    # no held-out galaxy, in any orientation, is among the training stamps
    test = one["test"].images
    for k in range(4):
        for flip in (False, True):
            t = np.rot90(test, k, axes=(1, 2))
            t = t[:, :, ::-1] if flip else t
            gap = np.abs(one["train"][:, None] - t[None]).max(axis=(2, 3))
            assert gap.min() > 1e-3
    assert set(card["real_test_held_out"]).isdisjoint(card["real_train"] + card["real_val"])
    with pytest.raises(ValueError, match="real_repeat"):
        prepare_training_data(ROOT, n_synthetic=0, selection=sel, real_repeat=0)


def test_pad_with_noise_keeps_the_galaxy_and_its_noise_level():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:30, :31] - 15.0
    stamp = np.exp(-(xx ** 2 + yy ** 2) / 20.0) + rng.normal(0, 0.1, (30, 31))
    out, sigma = pad_with_noise(stamp, 0.1, 64, np.random.default_rng(2))
    assert out.shape == (64, 64) and sigma == 0.1
    np.testing.assert_array_equal(out[17:47, 17:47], stamp[:, :30])     # central square, unresampled
    border = np.concatenate([out[:17].ravel(), out[47:].ravel()])
    assert border.std() == pytest.approx(0.1, rel=0.05) and abs(border.mean()) < 0.01
    with pytest.raises(ValueError, match="exceeds out_size"):
        pad_with_noise(np.zeros((70, 70)), 0.1, 64, rng)
    with pytest.raises(ValueError, match="max_size"):
        Selection(min_size=40, max_size=30)


def test_padded_small_stamps_are_a_training_only_pool():
    """``pad_small_from``: the stamps the size cut drops (counted from the FITS headers) join
    the training set only; validation, held-out galaxies and the split are unchanged, and the
    padding noise is the same in every run."""
    from astropy.io import fits

    from difflens.sources.vae_training import prepare_training_data

    sel = Selection(snr_range=None)
    base = prepare_training_data(ROOT, n_synthetic=0, selection=sel)
    more = prepare_training_data(ROOT, n_synthetic=0, selection=sel, pad_small_from=32)
    again = prepare_training_data(ROOT, n_synthetic=0, selection=sel, pad_small_from=32)
    card = more["card"]
    in_range = 0
    for cat in ROOT.rglob("real_galaxy_catalog*.fits"):
        if not cat.name.endswith("_fits.fits"):
            with fits.open(cat) as h:
                keys = {(n.strip(), int(k)) for n, k in zip(h[1].data["GAL_FILENAME"],
                                                           h[1].data["GAL_HDU"])}
            for name, hdu in keys:
                with fits.open(cat.parent / name) as g:
                    in_range += 32 <= min(g[hdu].data.shape) < 64
    assert card["real_counts_padded"]["size"] == in_range
    padded = card["real_train_padded"]
    assert 0 < len(padded) <= in_range              # the S/N > 15 cut only removes
    assert card["real_train"] == base["card"]["real_train"] + padded
    assert card["real_val"] == base["card"]["real_val"]
    assert card["real_test_held_out"] == base["card"]["real_test_held_out"]
    assert set(padded).isdisjoint(card["real_test_held_out"] + card["real_val"])
    np.testing.assert_array_equal(more["val"], base["val"])
    n0 = len(base["card"]["real_train"])
    assert len(more["train"]) == 8 * (n0 + len(padded))
    n1 = n0 + len(padded)
    for k in range(8):          # each symmetry block: the selected galaxies, then the padded ones
        np.testing.assert_array_equal(more["train"][k * n1:k * n1 + n0],
                                      base["train"][k * n0:(k + 1) * n0])
    np.testing.assert_array_equal(more["train"], again["train"])
    with pytest.raises(ValueError, match="pad_small_from"):
        prepare_training_data(ROOT, n_synthetic=0, selection=sel, pad_small_from=64)

"""Reader for GalSim RealGalaxyCatalog / COSMOSCatalog files and the paper's selection (Sec. 2.2).

Works unchanged on the full GalSim COSMOS samples that users download with

    galsim_download_cosmos -s 23.5          # or -s 25.2; files land in galsim's share dir

and on the small subsets in ``../shared/data/hst_galaxy_stamps``.  A catalogue file
``real_galaxy_catalog_*.fits`` (HDU 1: IDENT, GAL_FILENAME, GAL_HDU, PIXEL_SCALE, NOISE_VARIANCE,
...) points at stamps stored one per HDU; the optional ``*_fits.fits`` file next to it holds the
parametric (Sersic / bulge+disk) fits used for the quality cut.

Selection, each step configurable and counted (:class:`Selection`):

1. ``fits``: drop galaxies whose Sersic fit failed (``fit_status`` of the Sersic fit in {0, 5}) or is
   flagged unphysical (``viable_sersic == 0``), where the parametric catalogue has those columns
   (the GalSim COSMOSCatalog convention);
2. ``size``: drop stamps smaller than ``min_size`` (64) pixels on either side;
3. crop the central square and downscale to ``out_size`` (64) by area averaging;
4. ``snr``: keep ``snr_range[0] < max(I_1/4) / sigma_1/4 < snr_range[1]`` (15, 50), where
   ``I_1/4`` is the 64x64 stamp block-averaged by 4 and ``sigma_1/4`` its pixel noise (the
   catalogue's NOISE_VARIANCE propagated through both averagings);
5. divide by the maximum; the per-stamp noise sigma is kept (same units) for chi^2 tests.

Off the paper's path, for small samples: ``pad_small=True`` keeps stamps smaller than
``out_size`` at their own pixel scale, centred in an ``out_size`` square of fresh noise at the
catalogue level (:func:`pad_with_noise`), instead of dropping them; ``max_size`` selects only
stamps up to a side, so that such a pool can be read apart from the paper's selection
(``prepare_training_data(pad_small_from=)``).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class GalaxyStamps:
    """Selected, normalised galaxy stamps.

    Attributes
    ----------
    images : ndarray (N, 64, 64), float32, maximum 1.
    noise_sigma : ndarray (N,), pixel noise of each normalised stamp.
    ident : ndarray (N,), catalogue IDENT (as strings ``"<catalogue>:<ident>"``).
    counts : dict, galaxies left after each step.

    Examples
    --------
    >>> import numpy as np
    >>> st = GalaxyStamps(np.zeros((3, 64, 64), np.float32), np.full(3, 0.05), np.array(["a", "b", "c"]))
    >>> len(st), len(st.subset([0, 2]))
    (3, 2)
    """

    images: np.ndarray
    noise_sigma: np.ndarray
    ident: np.ndarray
    counts: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.images)

    def subset(self, index) -> "GalaxyStamps":
        return GalaxyStamps(self.images[index], self.noise_sigma[index], self.ident[index],
                            dict(self.counts))


@dataclass(frozen=True)
class Selection:
    """The paper's cuts (Sec. 2.2); set a field to None to skip that cut.

    Examples
    --------
    >>> Selection(snr_range=None)            # keep every S/N, the other cuts as in the paper
    Selection(drop_bad_fits=True, min_size=64, out_size=64, snr_range=None, max_size=None, pad_small=False)
    """

    drop_bad_fits: bool = True
    min_size: int | None = 64
    out_size: int = 64
    snr_range: tuple | None = (15.0, 50.0)
    max_size: int | None = None      # drop stamps whose smaller side exceeds this (pixels)
    pad_small: bool = False          # pad stamps smaller than out_size with noise (not the paper)

    def __post_init__(self):
        if self.min_size and self.max_size and self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} is below min_size {self.min_size}")


def _bad_fit_mask(fits_table, n) -> np.ndarray | None:
    names = {c.lower(): c for c in fits_table.columns.names}
    bad = np.zeros(n, dtype=bool)
    found = False
    if "fit_status" in names:
        status = np.asarray(fits_table[names["fit_status"]])
        sersic = status[:, 4] if status.ndim == 2 and status.shape[1] > 4 else status.reshape(n, -1)[:, -1]
        bad |= (sersic == 0) | (sersic == 5)
        found = True
    if "viable_sersic" in names:
        bad |= np.asarray(fits_table[names["viable_sersic"]]) == 0
        found = True
    return bad if found else None


def read_catalog(catalog_path, selection: Selection = Selection(), verbose=True) -> GalaxyStamps:
    """Read one RealGalaxyCatalog and apply the selection.

    Parameters
    ----------
    catalog_path : path
        ``real_galaxy_catalog_*.fits``; stamp files are looked up in the same folder.
    selection : Selection
        Which cuts to apply.
    verbose : bool
        Print the count after each step.

    Raises
    ------
    FileNotFoundError
        If the catalogue or a stamp file it names is missing.

    Examples
    --------
    >>> stamps = read_catalog("real_galaxy_catalog_23.5.fits", Selection())   # doctest: +SKIP
    """
    from astropy.io import fits

    catalog_path = Path(catalog_path)
    if not catalog_path.exists():
        raise FileNotFoundError(f"galaxy catalogue not found: {catalog_path}")
    folder = catalog_path.parent
    with fits.open(catalog_path) as hdul:
        cat = hdul[1].data
        n = len(cat)
        counts = {"catalogue": n}
        keep = np.ones(n, dtype=bool)
        fits_path = catalog_path.with_name(catalog_path.stem + "_fits.fits")
        if selection.drop_bad_fits and fits_path.exists():
            with fits.open(fits_path) as fh:
                bad = _bad_fit_mask(fh[1].data, n)
            if bad is not None:
                keep &= ~bad
        counts["fits"] = int(keep.sum())
        # the same stamp may be listed twice (e.g. trimmed test catalogues): keep it once
        seen = set()
        for i in range(n):
            key = (cat["GAL_FILENAME"][i].strip(), int(cat["GAL_HDU"][i]))
            if key in seen:
                keep[i] = False
            seen.add(key)
        counts["unique"] = int(keep.sum())
        images, sigmas, idents = [], [], []
        n_size = 0
        open_files: dict = {}
        try:
            for i in np.flatnonzero(keep):
                name = cat["GAL_FILENAME"][i].strip()
                if name not in open_files:
                    path = folder / name
                    if not path.exists():
                        raise FileNotFoundError(f"stamp file {path} named by {catalog_path} is missing")
                    open_files[name] = fits.open(path, memmap=True)
                stamp = np.asarray(open_files[name][int(cat["GAL_HDU"][i])].data, dtype=np.float64)
                if selection.min_size and min(stamp.shape) < selection.min_size:
                    continue
                if selection.max_size and min(stamp.shape) > selection.max_size:
                    continue
                n_size += 1
                ident = f"{catalog_path.stem}:{cat['IDENT'][i]}"
                noise = math.sqrt(float(cat["NOISE_VARIANCE"][i]))
                if selection.pad_small and min(stamp.shape) < selection.out_size:
                    # fresh noise from the galaxy's name: the same stamp in any run or order
                    rng = np.random.default_rng(zlib.crc32(ident.encode()))
                    img, sigma = pad_with_noise(stamp, noise, selection.out_size, rng)
                else:
                    img, sigma = crop_and_downscale(stamp, noise, selection.out_size)
                if selection.snr_range is not None:
                    lo, hi = selection.snr_range
                    quarter = img.reshape(img.shape[0] // 4, 4, img.shape[1] // 4, 4).mean((1, 3))
                    snr = quarter.max() / (sigma / 4.0)
                    if not lo < snr < hi:
                        continue
                peak = img.max()
                images.append((img / peak).astype(np.float32))
                sigmas.append(sigma / peak)
                idents.append(ident)
        finally:
            for f in open_files.values():
                f.close()
    counts["size"] = n_size
    counts["snr"] = len(images)
    if verbose:
        print(f"{catalog_path.name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    shape = (0, selection.out_size, selection.out_size)
    return GalaxyStamps(np.stack(images) if images else np.zeros(shape, np.float32),
                        np.asarray(sigmas, dtype=np.float32), np.asarray(idents), counts)


def _central_square(stamp: np.ndarray) -> np.ndarray:
    """The central square of a stamp, side = its smaller side."""
    side = min(stamp.shape)
    y0 = (stamp.shape[0] - side) // 2
    x0 = (stamp.shape[1] - side) // 2
    return stamp[y0:y0 + side, x0:x0 + side]


def crop_and_downscale(stamp: np.ndarray, noise_sigma: float, out_size: int = 64):
    """Crop the central square and area-average to ``out_size``; return the stamp and its noise.

    Averaging ``f x f`` independent pixels (f = side / out_size) divides the noise by f.

    Examples
    --------
    >>> import numpy as np
    >>> small, sigma = crop_and_downscale(np.ones((128, 140)), 0.2)   # 2x2 averaging halves the noise
    >>> small.shape, round(float(sigma), 6)
    ((64, 64), 0.1)
    """
    square = _central_square(stamp)
    side = square.shape[0]
    square = torch.from_numpy(np.ascontiguousarray(square))
    out = F.interpolate(square[None, None], size=(out_size, out_size), mode="area")[0, 0]
    return out.numpy(), noise_sigma * out_size / side


def pad_with_noise(stamp: np.ndarray, noise_sigma: float, out_size: int, rng):
    """Centre a small stamp (its central square) in an ``out_size`` square of Gaussian noise.

    The galaxy keeps its pixel scale (no resampling); the new pixels get fresh noise of sd
    ``noise_sigma``, the stamp's own level, so the whole square has one white-noise level.

    Parameters
    ----------
    stamp : ndarray (ny, nx), both sides <= out_size after the square crop
    noise_sigma : float, pixel noise of ``stamp`` (its units)
    out_size : int, side of the result (pixels)
    rng : numpy Generator

    Returns
    -------
    image : ndarray (out_size, out_size)
    noise_sigma : float, unchanged

    Examples
    --------
    >>> import numpy as np
    >>> img, sigma = pad_with_noise(np.ones((30, 31)), 0.1, 64, np.random.default_rng(0))
    >>> img.shape, float(img[17:47, 17:47].min()), sigma
    ((64, 64), 1.0, 0.1)
    """
    square = _central_square(stamp)
    side = square.shape[0]
    if side > out_size:
        raise ValueError(f"stamp side {side} exceeds out_size {out_size}: downscale it instead")
    out = rng.normal(0.0, noise_sigma, (out_size, out_size))
    o = (out_size - side) // 2
    out[o:o + side, o:o + side] = square
    return out, noise_sigma


def find_catalogs(root) -> list[Path]:
    """All ``real_galaxy_catalog*.fits`` files (not the ``*_fits.fits`` ones) below ``root``.

    Examples
    --------
    >>> find_catalogs("/nonexistent")
    []
    """
    root = Path(root)
    return sorted(p for p in root.rglob("real_galaxy_catalog*.fits")
                  if not p.name.endswith("_fits.fits"))


def load_cosmos(root, selection: Selection = Selection(), verbose=True) -> GalaxyStamps:
    """Read and select every catalogue below ``root``; counts are summed per step.

    Examples
    --------
    >>> stamps = load_cosmos("~/COSMOS_23.5_training_sample")            # doctest: +SKIP
    >>> stamps.counts                                                     # doctest: +SKIP
    """
    parts = [read_catalog(p, selection, verbose) for p in find_catalogs(root)]
    if not parts:
        raise FileNotFoundError(f"no real_galaxy_catalog*.fits below {root}")
    counts = {k: sum(p.counts[k] for p in parts) for k in parts[0].counts}
    if verbose:
        print("total: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return GalaxyStamps(np.concatenate([p.images for p in parts]),
                        np.concatenate([p.noise_sigma for p in parts]),
                        np.concatenate([p.ident for p in parts]), counts)


def split(stamps: GalaxyStamps, fractions=(0.8, 0.1, 0.1), seed=0):
    """Random train / validation / test split (reproducible from ``seed``).

    Examples
    --------
    >>> import numpy as np
    >>> st = GalaxyStamps(np.zeros((10, 64, 64), np.float32), np.ones(10), np.arange(10).astype(str))
    >>> [len(p) for p in split(st, (0.6, 0.2, 0.2))]
    [6, 2, 2]
    """
    if not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(stamps))
    n_train = int(round(fractions[0] * len(stamps)))
    n_val = int(round(fractions[1] * len(stamps)))
    return (stamps.subset(order[:n_train]), stamps.subset(order[n_train:n_train + n_val]),
            stamps.subset(order[n_train + n_val:]))

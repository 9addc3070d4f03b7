"""An observed image with everything needed to fit it, and FITS input/output.

FITS layout written by :func:`write_observation` (and read back by :func:`read_observation`):
the image in the primary HDU with ``PIXSCALE`` (arcsec/pixel) in its header; optional extensions
``NOISE`` (per-pixel sigma), ``PSF`` (kernel) and ``MASK`` (1 = used), and a ``TRUTH`` binary table
of true parameters for mocks.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import atomic_path

from ..instrument import pixel_psf


@dataclass
class Observation:
    """Image, noise, PSF, mask and pixel scale of one lens.

    Parameters
    ----------
    image : ndarray (ny, nx)
    noise_sigma : float or ndarray (ny, nx)
        Pixel noise, image units, > 0.
    pixel_scale : float
        arcsec per pixel.
    psf : ndarray (kh, kw), optional
        PSF kernel (odd sides; normalised on use).
    mask : ndarray (ny, nx) of bool, optional
        True for pixels used in the likelihood.
    truth : dict, optional
        True parameters (mocks).

    Examples
    --------
    >>> import numpy as np
    >>> obs = Observation(image=np.zeros((100, 100)), noise_sigma=0.02, pixel_scale=0.04)
    >>> obs.cutout(64).shape
    (64, 64)
    """

    image: np.ndarray
    noise_sigma: object
    pixel_scale: float
    psf: np.ndarray | None = None
    mask: np.ndarray | None = None
    truth: dict | None = None

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float64)
        if self.image.ndim != 2:
            raise ValueError(f"image must be 2-d, got shape {self.image.shape}")
        if not (isinstance(self.pixel_scale, (int, float)) and self.pixel_scale > 0
                and math.isfinite(self.pixel_scale)):
            raise ValueError(f"pixel_scale must be a positive number of arcsec, got "
                             f"{self.pixel_scale!r}")
        sigma = np.asarray(self.noise_sigma, dtype=np.float64)
        if sigma.ndim == 2 and sigma.shape != self.image.shape:
            raise ValueError(f"noise map shape {sigma.shape} does not match image shape "
                             f"{self.image.shape}")
        if sigma.ndim not in (0, 2):
            raise ValueError("noise_sigma must be a number or a 2-d noise map")
        if not np.isfinite(sigma).all() or (sigma <= 0).any():
            raise ValueError("noise_sigma must be finite and positive everywhere")
        self.noise_sigma = float(sigma) if sigma.ndim == 0 else sigma
        if self.mask is not None:
            self.mask = np.asarray(self.mask).astype(bool)
            if self.mask.shape != self.image.shape:
                raise ValueError(f"mask shape {self.mask.shape} does not match image shape "
                                 f"{self.image.shape}")
        bad = ~np.isfinite(self.image)
        if bad.any() and (self.mask is None or self.mask[bad].any()):
            raise ValueError(f"{int(bad.sum())} image pixels are NaN/inf and not masked")
        if self.psf is not None:
            self.psf = pixel_psf(np.asarray(self.psf, dtype=np.float64)).numpy()

    @property
    def shape(self):
        return self.image.shape

    def cutout(self, size, centre=None) -> "Observation":
        """A square ``size`` x ``size`` pixel cutout (image, noise map and mask; the PSF is kept).

        Parameters
        ----------
        size : int
            Side in pixels.
        centre : (row, col), optional
            Central pixel of the cutout; default the image centre.
        """
        ny, nx = self.shape
        if not (isinstance(size, int) and 1 <= size <= min(ny, nx)):
            raise ValueError(f"cutout size must be an integer in [1, {min(ny, nx)}], got {size!r}")
        row, col = (ny // 2, nx // 2) if centre is None else (int(centre[0]), int(centre[1]))
        r0, c0 = row - size // 2, col - size // 2
        if r0 < 0 or c0 < 0 or r0 + size > ny or c0 + size > nx:
            raise ValueError(f"a {size}-pixel cutout around ({row}, {col}) leaves the "
                             f"{ny}x{nx} image")
        cut = (slice(r0, r0 + size), slice(c0, c0 + size))
        noise = self.noise_sigma if np.ndim(self.noise_sigma) == 0 else self.noise_sigma[cut]
        return Observation(image=self.image[cut], noise_sigma=noise, pixel_scale=self.pixel_scale,
                           psf=self.psf, mask=None if self.mask is None else self.mask[cut],
                           truth=self.truth)

    def excluding_discs(self, centres, radius) -> "Observation":
        """This observation with the pixels inside discs left out of the likelihood (e.g.
        neighbouring galaxies where no mask file exists).

        Parameters
        ----------
        centres : sequence of (x, y)
            Disc centres, arcsec, in the fit's frame: x along columns, y along rows, from the
            image centre (:func:`difflens.instrument.pixel_grid`).
        radius : float or sequence of float
            Disc radius (one, or one per disc), arcsec, > 0.  A pixel is excluded when its
            centre lies inside or on the rim (:func:`difflens.instrument.aperture_mask`).

        Examples
        --------
        >>> import numpy as np
        >>> obs = Observation(image=np.zeros((10, 10)), noise_sigma=0.02, pixel_scale=0.1)
        >>> int((~obs.excluding_discs([(0.25, -0.25)], 0.11).mask).sum())  # 1 px + 4 neighbours
        5
        """
        from ..instrument import aperture_mask

        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        radii = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(centres),))
        if not (np.isfinite(centres).all() and np.isfinite(radii).all() and (radii > 0).all()):
            raise ValueError(f"disc centres must be finite and radii finite and > 0 arcsec, got "
                             f"centres {centres.tolist()}, radius {radius}")
        inside = np.zeros(self.shape, bool)
        for centre, r in zip(centres, radii):
            inside |= aperture_mask(self.shape, self.pixel_scale, r, centre=centre).numpy()
        use = np.ones(self.shape, bool) if self.mask is None else self.mask
        return Observation(image=self.image, noise_sigma=self.noise_sigma,
                           pixel_scale=self.pixel_scale, psf=self.psf, mask=use & ~inside,
                           truth=self.truth)


def write_observation(obs: Observation, path, overwrite=True) -> None:
    """Write ``obs`` to a FITS file (atomically: a temporary file renamed into place).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/obs.fits"
    >>> write_observation(Observation(np.zeros((8, 8)), 0.1, 0.05), path)
    >>> read_observation(path, noise_sigma=0.1).pixel_scale
    0.05
    """
    from astropy.io import fits

    path = Path(path)
    hdr = fits.Header()
    hdr["PIXSCALE"] = (obs.pixel_scale, "arcsec per pixel")
    hdr["BUNIT"] = "image units"
    hdus = [fits.PrimaryHDU(obs.image.astype(np.float64), header=hdr)]
    if np.ndim(obs.noise_sigma) == 0:
        hdus[0].header["NOISESIG"] = (float(obs.noise_sigma), "pixel noise sigma")
    else:
        hdus.append(fits.ImageHDU(np.asarray(obs.noise_sigma), name="NOISE"))
    if obs.psf is not None:
        hdus.append(fits.ImageHDU(obs.psf, name="PSF"))
    if obs.mask is not None:
        hdus.append(fits.ImageHDU(obs.mask.astype(np.uint8), name="MASK"))
    if obs.truth:
        scalars = {k: v for k, v in obs.truth.items() if np.ndim(v) == 0}
        cols = [fits.Column(name=k, format="D", array=np.array([float(v)]))
                for k, v in scalars.items()]
        table = fits.BinTableHDU.from_columns(cols, name="TRUTH")
        vectors = {k: np.asarray(v).tolist() for k, v in obs.truth.items() if np.ndim(v) > 0}
        if vectors:
            table.header["VECTORS"] = json.dumps(vectors)[:60000]
        hdus.append(table)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)


def read_observation(path, *, noise_sigma=None, noise_map=None, psf=None, mask=None,
                     exclude=None, pixel_scale=None) -> Observation:
    """Read an observation from FITS; explicit arguments override what the file holds.

    A lenstronomy-style HDF5 image (``.h5``/``.hdf5``) is read by
    :func:`read_lenstronomy_hdf5` instead (noise map from background rms and exposure map).

    Parameters
    ----------
    path : FITS file with the image in the primary HDU (or the first image HDU).
    noise_sigma : float, optional
    noise_map, psf, mask : path or array, optional
        FITS files (first data HDU) or arrays; a PSF may also be an HDF5 file (:func:`load_psf`).
        ``mask``: nonzero = pixel used.
    exclude : path or array, optional
        Pixels to leave out of the likelihood (nonzero = excluded, e.g. other galaxies; the
        PyAutoLens ``mask_extra_galaxies`` convention); combined with ``mask``.
    pixel_scale : float, optional
        arcsec/pixel; else the header's ``PIXSCALE`` (or ``CDELT2`` in degrees).

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or malformed input, with the reason.

    Examples
    --------
    >>> obs = read_observation("lens.fits", noise_map="noise.fits", psf="psf.fits",
    ...                        exclude="neighbours.fits")       # doctest: +SKIP
    >>> obs = read_observation("image.h5", psf="psf.h5")        # lenstronomy HDF5  # doctest: +SKIP
    """
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"observation file not found: {path}")
    if path.suffix.lower() in (".h5", ".hdf5"):
        obs = read_lenstronomy_hdf5(path, psf)
        return _override(obs, noise_sigma, noise_map, mask, exclude, pixel_scale)
    try:
        hdul = fits.open(path)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable FITS file: {exc}") from exc
    with hdul:
        img_hdu = next((h for h in hdul if getattr(h, "data", None) is not None
                        and getattr(h.data, "ndim", 0) == 2), None)
        if img_hdu is None:
            raise ValueError(f"{path} holds no 2-d image")
        image = np.asarray(img_hdu.data, dtype=np.float64)
        hdr = img_hdu.header
        names = {h.name for h in hdul}
        file_noise = np.asarray(hdul["NOISE"].data, np.float64) if "NOISE" in names else \
            hdr.get("NOISESIG")
        file_psf = np.asarray(hdul["PSF"].data, np.float64) if "PSF" in names else None
        file_mask = np.asarray(hdul["MASK"].data).astype(bool) if "MASK" in names else None
        truth = None
        if "TRUTH" in names:
            t = hdul["TRUTH"].data
            truth = {c: float(t[c][0]) for c in t.columns.names}
            if "VECTORS" in hdul["TRUTH"].header:
                truth.update(json.loads(hdul["TRUTH"].header["VECTORS"]))
    if pixel_scale is None:
        if "PIXSCALE" in hdr:
            pixel_scale = float(hdr["PIXSCALE"])
        elif "CDELT2" in hdr:
            pixel_scale = abs(float(hdr["CDELT2"])) * 3600.0
        else:
            raise ValueError(f"{path}: no PIXSCALE in the header; pass --pixel-scale")
    noise = noise_sigma if noise_sigma is not None else (
        _load_array(noise_map, "noise map") if noise_map is not None else file_noise)
    if noise is None:
        raise ValueError("no noise given: pass noise_sigma (--noise-sigma) or a noise map")
    use = _load_array(mask, "mask") != 0 if mask is not None else file_mask
    return Observation(image=image, noise_sigma=noise, pixel_scale=pixel_scale,
                       psf=load_psf(psf) if psf is not None else file_psf,
                       mask=_combine_masks(use, exclude, image.shape), truth=truth)


def _combine_masks(use, exclude, shape):
    """Pixels used = ``use`` (default all) and not ``exclude``; None if everything is used."""
    if exclude is None:
        return use
    excl = np.asarray(_load_array(exclude, "exclusion mask")) != 0
    if excl.shape != tuple(shape):
        raise ValueError(f"exclusion mask shape {excl.shape} does not match the image {shape}")
    return (np.ones(shape, bool) if use is None else np.asarray(use, bool)) & ~excl


def _override(obs, noise_sigma, noise_map, mask, exclude, pixel_scale):
    noise = noise_sigma if noise_sigma is not None else (
        _load_array(noise_map, "noise map") if noise_map is not None else obs.noise_sigma)
    use = _load_array(mask, "mask") != 0 if mask is not None else obs.mask
    return Observation(image=obs.image, noise_sigma=noise,
                       pixel_scale=pixel_scale if pixel_scale is not None else obs.pixel_scale,
                       psf=obs.psf, mask=_combine_masks(use, exclude, obs.shape), truth=obs.truth)


def load_psf(source, *, max_sum_error=0.1):
    """A pixel PSF kernel from a FITS file (first data HDU), an HDF5 file (dataset
    ``kernel_point_source``, lenstronomy's name, else the only 2-d dataset) or an array.

    The kernel is validated (odd sides, finite, centred; :func:`difflens.instrument.pixel_psf`) and
    normalised to unit sum.  A kernel whose sum differs from 1 by more than ``max_sum_error`` is
    normalised too, with a warning: it was cut from a wider PSF or is in other units, and a
    truncated PSF loses the light of its wings.

    Returns
    -------
    ndarray (kh, kw), summing to 1.

    Examples
    --------
    >>> import numpy as np
    >>> k = load_psf(np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0)
    >>> k.shape, round(float(k.sum()), 6)
    ((3, 3), 1.0)
    """
    import warnings

    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in (".h5", ".hdf5"):
        kernel = _read_hdf5_array(Path(source), "kernel_point_source", "PSF")
    else:
        kernel = _load_array(source, "PSF")
    kernel = np.asarray(kernel, dtype=np.float64)
    total = float(kernel.sum()) if np.isfinite(kernel).all() else float("nan")
    if np.isfinite(total) and total > 0 and abs(total - 1.0) > max_sum_error:
        warnings.warn(f"PSF kernel sums to {total:.4g}, not 1; normalising it", RuntimeWarning,
                      stacklevel=2)
    return pixel_psf(kernel).numpy()


def _read_hdf5_array(path: Path, name, what):
    import h5py

    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with h5py.File(path, "r") as h:
            if name in h:
                return np.asarray(h[name][()], dtype=np.float64)
            arrays = [k for k in h if getattr(h[k], "ndim", 0) == 2]
            if len(arrays) != 1:
                raise ValueError(f"{path}: no dataset {name!r} and {len(arrays)} 2-d datasets")
            return np.asarray(h[arrays[0]][()], dtype=np.float64)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file: {exc}") from exc


def read_lenstronomy_hdf5(image_path, psf_path=None) -> Observation:
    """Read an image saved as lenstronomy ``kwargs_data`` in HDF5 (e.g. the dolphin pipeline).

    Expected datasets: ``image_data`` (counts/s), ``background_rms`` (scalar, counts/s),
    ``exposure_time`` (seconds, scalar or map) and ``transform_pix2angle`` (arcsec per pixel; its
    determinant gives the pixel scale).  The noise map follows lenstronomy,
    ``sqrt(background_rms^2 + max(I, 0)/t_exp)`` (:func:`difflens.instrument.
    noise_map_from_exposure`).  ``psf_path``: an HDF5/FITS PSF (:func:`load_psf`).

    Note that difflens works in the pixel frame (x along columns, y along rows); lenstronomy's RA
    axis usually runs the other way (a negative ``transform_pix2angle[0, 0]``), which mirrors
    position angles.

    Examples
    --------
    >>> obs = read_lenstronomy_hdf5("image_lens_system1_F390W.h5",
    ...                             "psf_lens_system1_F390W.h5")   # doctest: +SKIP
    """
    import h5py

    from ..instrument import noise_map_from_exposure

    path = Path(image_path)
    if not path.exists():
        raise FileNotFoundError(f"observation file not found: {path}")
    try:
        with h5py.File(path, "r") as h:
            missing = [k for k in ("image_data", "background_rms", "exposure_time",
                                   "transform_pix2angle") if k not in h]
            if missing:
                raise ValueError(f"{path} lacks the lenstronomy datasets {missing}")
            image = np.asarray(h["image_data"][()], dtype=np.float64)
            rms = float(h["background_rms"][()])
            exposure = np.asarray(h["exposure_time"][()], dtype=np.float64)
            transform = np.asarray(h["transform_pix2angle"][()], dtype=np.float64)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file: {exc}") from exc
    noise = noise_map_from_exposure(image, rms, exposure).numpy()
    pixel_scale = float(math.sqrt(abs(np.linalg.det(transform))))
    return Observation(image=image, noise_sigma=noise, pixel_scale=pixel_scale,
                       psf=load_psf(psf_path) if psf_path is not None else None)


def _load_array(value, what):
    if isinstance(value, (str, os.PathLike)):
        from astropy.io import fits

        p = Path(value)
        if not p.exists():
            raise FileNotFoundError(f"{what} file not found: {p}")
        with fits.open(p) as h:
            data = next((x.data for x in h if getattr(x, "data", None) is not None), None)
            data = None if data is None else np.asarray(data)
        if data is None:
            raise ValueError(f"{what} file {p} holds no data")
        return np.asarray(data, dtype=np.float64)
    return np.asarray(value)

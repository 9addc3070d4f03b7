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


def write_observation(obs: Observation, path, overwrite=True) -> None:
    """Write ``obs`` to a FITS file (atomically: a temporary file renamed into place)."""
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
    tmp = path.with_name(path.name + ".tmp")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    if path.exists() and not overwrite:
        os.remove(tmp)
        raise FileExistsError(path)
    os.replace(tmp, path)


def read_observation(path, *, noise_sigma=None, noise_map=None, psf=None, mask=None,
                     pixel_scale=None) -> Observation:
    """Read an observation from FITS; explicit arguments override what the file holds.

    Parameters
    ----------
    path : FITS file with the image in the primary HDU (or the first image HDU).
    noise_sigma : float, optional
    noise_map, psf, mask : path or array, optional
        FITS files (primary HDU) or arrays.
    pixel_scale : float, optional
        arcsec/pixel; else the header's ``PIXSCALE`` (or ``PIXSCAL1`` / ``CDELT2`` in degrees).

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or malformed input, with the reason.
    """
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"observation file not found: {path}")
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
    return Observation(image=image, noise_sigma=noise, pixel_scale=pixel_scale,
                       psf=_load_array(psf, "PSF") if psf is not None else file_psf,
                       mask=_load_array(mask, "mask") if mask is not None else file_mask,
                       truth=truth)


def _load_array(value, what):
    if isinstance(value, (str, os.PathLike)):
        from astropy.io import fits

        p = Path(value)
        if not p.exists():
            raise FileNotFoundError(f"{what} file not found: {p}")
        with fits.open(p) as h:
            data = next((x.data for x in h if getattr(x, "data", None) is not None), None)
        if data is None:
            raise ValueError(f"{what} file {p} holds no data")
        return np.asarray(data, dtype=np.float64)
    return np.asarray(value)

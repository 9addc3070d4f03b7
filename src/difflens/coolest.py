"""Export a fitted lens in the COOLEST lens-model standard (Galan et al. 2023, JOSS 8, 5567).

COOLEST describes a lens model as one JSON file plus FITS files for pixelated things.  For a
:class:`difflens.fitting.LensFit`, :func:`write_coolest` writes into a folder::

    coolest.json     mode "MAP": point estimates (the MAP) and, when sampled, posterior statistics
                     (mean, median, 16th and 84th percentiles) of every parameter
    image.fits       the observed image
    noise_map.fits   the per-pixel noise sigma (a scalar noise is written as a constant map)
    psf.fits         the PSF kernel used in the fit (data pixels)
    mask.fits        1 = pixel used in the likelihood (only with a mask)
    source.fits      the MAP source stamp (VAE sources), on the source-plane grid it spans

Entities: an ``ExternalShear`` mass field, the lens ``Galaxy`` (``PEMD`` mass, ``Sersic`` light
components) and the source ``Galaxy`` (``PixelatedRegularGrid`` for the VAE, ``Sersic`` otherwise).
Conventions (see :mod:`difflens.lensing.conventions`): x to the right (image columns) and y up
(rows), arcsec from the image centre, as in difflens; angles in degrees East of North
(counter-clockwise from +y) in [-90, 90); ``theta_E = sqrt(q) r_ein`` and Sersic
``theta_eff = sqrt(q) r_e`` (radii of the circle of equal area, lenstronomy's convention).  difflens
is WCS-free: the file's coordinate origin is the image centre (written as RA = Dec = 0, a
placeholder) and the sky orientation is that of the image.  Redshifts are recorded when given
(:func:`write_coolest`), cosmology is left ``null``.  The files load with the ``coolest`` package's
``JSONSerializer.load_simple`` (checked with coolest 0.1.x).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._io import atomic_directory
from .lensing.conventions import coolest_angle, to_coolest_pemd, to_coolest_shear
from .model import ellipticity_to_q_phi

#: Parameters that are angles in COOLEST (degrees, period 180).
_ANGLES = ("phi", "phi_ext")
_UNITS = dict(theta_E="arcsec", theta_eff="arcsec", center_x="arcsec", center_y="arcsec",
              phi="deg", phi_ext="deg")


def write_coolest(fit, out_dir, *, z_lens=None, z_source=None) -> Path:
    """Write ``fit`` as a COOLEST model (``coolest.json`` and its FITS files) into ``out_dir``.

    Parameters
    ----------
    fit : difflens.fitting.LensFit
    out_dir : str or Path
        Created if needed; files are moved in only when all are written.
    z_lens, z_source : float, optional
        Redshifts, recorded for readers that need them (lenstronomy's COOLEST reader orders
        lens planes by redshift and refuses ``null``); the fit itself does not use them.

    Returns
    -------
    Path to ``coolest.json``.

    Examples
    --------
    >>> fit = fit_lens(obs, samples=200)                          # doctest: +SKIP
    >>> write_coolest(fit, "out/coolest")                          # doctest: +SKIP
    >>> fit.save("out", coolest=True)                              # the same, beside summary.json  # doctest: +SKIP
    """
    with atomic_directory(out_dir) as tmp:
        write_coolest_files(fit, tmp, z_lens=z_lens, z_source=z_source)
    return Path(out_dir) / "coolest.json"


def write_coolest_files(fit, directory, *, z_lens=None, z_source=None) -> None:
    """Write ``coolest.json`` and its FITS files into an existing ``directory`` (not atomic;
    see :func:`write_coolest`)."""
    from astropy.io import fits

    directory = Path(directory)
    obs, model, result = fit.observation, fit.model, fit.map
    ps = obs.pixel_scale
    draws = _draws(fit)

    def grid(array, name, pixel_size):
        ny, nx = array.shape
        fits.PrimaryHDU(np.asarray(array, dtype=np.float64)).writeto(directory / name)
        return {"field_of_view_x": [-nx * pixel_size / 2, nx * pixel_size / 2],
                "field_of_view_y": [-ny * pixel_size / 2, ny * pixel_size / 2],
                "num_pix_x": nx, "num_pix_y": ny, "fits_file": {"path": name}}

    observation = {"pixels": grid(obs.image, "image.fits", ps), "exposure_time": None,
                   "mag_zero_point": None, "mag_sky_brightness": None}
    # always a map (a scalar noise is broadcast): lenstronomy's COOLEST reader takes no other type
    noise = np.broadcast_to(np.asarray(obs.noise_sigma, dtype=np.float64), obs.image.shape)
    observation["noise"] = {"type": "NoiseMap", "noise_map": grid(noise, "noise_map.fits", ps)}
    psf = model.simulator.psf.detach().cpu().numpy()
    document = {
        "standard": "COOLEST",
        "mode": "MAP",
        "meta": {"modeling_code": f"difflens {__version__}",
                 "model_choice": _model_choice(model),
                 "frame": "image pixel frame: x along columns (right), y along rows (up), "
                          "arcsec from the image centre; no WCS",
                 "reduced_chi2": float(result.reduced_chi2),
                 "point_estimate": "MAP",
                 "posterior": ("HMC/NUTS draws" if draws else None)},
        # difflens is WCS-free: the origin is the image centre, whose sky position is unknown here
        "coordinates_origin": {"ra": "00h00m00s", "dec": "+00d00m00s"},
        "cosmology": None,
        "lensing_entities": [_shear_entity(result.params, draws, z_lens),
                             _lens_entity(model, result.params, draws, z_lens),
                             _source_entity(model, result, draws, directory, z_source)],
        "observation": observation,
        "instrument": {"name": None, "band": None, "pixel_size": ps, "readout_noise": None,
                       "psf": {"type": "PixelatedPSF", "description": "PSF kernel of the fit",
                               "pixels": grid(psf, "psf.fits", ps)}},
    }
    if obs.mask is not None:
        document["likelihoods"] = [{"type": "ImagingDataLikelihood",
                                    "mask": grid(obs.mask.astype(np.float64), "mask.fits", ps)}]
    (directory / "coolest.json").write_text(json.dumps(document, indent=1))


def _parameter(name, value, draws=None):
    """One COOLEST parameter entry: point estimate and (when draws are given) posterior stats."""
    value = float(value)
    stats = dict(mean=None, median=None, percentile_16th=None, percentile_84th=None)
    if draws is not None:
        x = np.asarray(draws, dtype=np.float64).reshape(-1)
        if name in _ANGLES:          # period 180 deg: summarise on the branch around the estimate
            x = value + np.remainder(x - value + 90.0, 180.0) - 90.0
        p16, p50, p84 = np.percentile(x, [16, 50, 84])
        stats = dict(mean=float(x.mean()), median=float(p50), percentile_16th=float(p16),
                     percentile_84th=float(p84))
        if name in _ANGLES:
            stats = {k: float(np.remainder(v + 90.0, 180.0) - 90.0) for k, v in stats.items()}
    return {"point_estimate": {"value": value}, "posterior_stats": stats,
            "prior": {"type": None}, "units": _UNITS.get(name), "fixed": False}


def _profile(kind, point: dict, draws: dict | None):
    return {"type": kind, "parameters": {
        k: _parameter(k, v, None if draws is None else draws[k]) for k, v in point.items()}}


def _shear_entity(params, draws, redshift):
    point = to_coolest_shear(float(params["g1"]), float(params["g2"]))
    post = to_coolest_shear(draws["g1"], draws["g2"]) if draws else None
    return {"type": "MassField", "name": "external shear", "redshift": redshift,
            "mass_model": [_profile("ExternalShear", point, post)]}


def _pemd(values):
    return to_coolest_pemd(*(values[k] for k in ("r_ein", "q", "phi", "gamma", "x0", "y0")))


def _sersic(values):
    """COOLEST Sersic parameters from difflens Sersic sites ``amp, r_e, n, e1, e2, x0, y0``."""
    q, phi = ellipticity_to_q_phi(*(torch.as_tensor(values[k], dtype=torch.float64, device="cpu")
                                    for k in ("e1", "e2")))
    q, phi = q.numpy(), phi.numpy()
    return dict(I_eff=values["amp"], theta_eff=np.sqrt(q) * values["r_e"], n=values["n"], q=q,
                phi=coolest_angle(phi), center_x=values["x0"], center_y=values["y0"])


def _component(values: dict, prefix: str):
    """Sites of one Sersic component (``prefix`` + name); a centre tied to the mass is the lens
    ``x0, y0`` in the same ``values``."""
    keys = ("amp", "r_e", "n", "e1", "e2", "x0", "y0")
    return {k: values[prefix + k] if prefix + k in values else values[k] for k in keys}


def _lens_entity(model, params, draws, redshift):
    values = {k: _numpy(v) for k, v in params.items()}
    light = []
    for i in range(len(model.priors.lens_light)):
        point = _sersic(_component(values, f"light{i}_"))
        post = _sersic(_component(draws, f"light{i}_")) if draws else None
        light.append(_profile("Sersic", point, post))
    return {"type": "Galaxy", "name": "lens", "redshift": redshift,
            "mass_model": [_profile("PEMD", _pemd(values), _pemd(draws) if draws else None)],
            "light_model": light}


def _source_entity(model, result, draws, directory, redshift):
    from astropy.io import fits

    values = {k: _numpy(v) for k, v in result.params.items()}
    src = {k[4:]: v for k, v in values.items() if k.startswith("src_")}
    if model.source_kind == "vae":
        stamp = result.source_image.detach().cpu().numpy()
        fits.PrimaryHDU(stamp.astype(np.float64)).writeto(directory / "source.fits")
        x0, y0, s = float(src["x0"]), float(src["y0"]), float(src["s"])
        light = {"type": "PixelatedRegularGrid", "parameters": {"pixels": {
            "field_of_view_x": [x0 - s, x0 + s], "field_of_view_y": [y0 - s, y0 + s],
            "num_pix_x": stamp.shape[1], "num_pix_y": stamp.shape[0],
            "fits_file": {"path": "source.fits"}}},
            "description": "MAP decode of the VAE source (amplitude included)"}
    else:
        post = _sersic(_component(draws, "src_")) if draws else None
        light = _profile("Sersic", _sersic(src), post)
    return {"type": "Galaxy", "name": "source", "redshift": redshift, "mass_model": [],
            "light_model": [light]}


def _draws(fit):
    """Flattened posterior draws of every site, or None without a posterior."""
    if fit.posterior is None:
        return None
    post = fit.posterior.idata.posterior
    return {k: post[k].values.reshape(-1) for k in post.data_vars
            if post[k].values.ndim == 2}


def _numpy(v):
    return v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)


def _model_choice(model) -> str:
    source = "VAE source (PixelatedRegularGrid of the MAP decode)" if model.source_kind == "vae" \
        else "Sersic source"
    n_light = len(model.priors.lens_light)
    light = f", {n_light} Sersic lens-light component(s)" if n_light else ", lens light subtracted"
    return f"SPLE (PEMD) + external shear; {source}{light}"

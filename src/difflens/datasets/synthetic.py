"""Synthetic HST-like galaxy stamps rendered with GalSim, to supplement scarce real galaxies.

Each galaxy is a bulge (de Vaucouleurs-like Sersic, n in [2.5, 4.5]) plus an exponential disk with
star-forming knots (``galsim.RandomKnots``), half-light radii 0.2"-0.8", random bulge fraction, sizes, ellipticities (intrinsic
shear ``|g| <= 0.6``) and orientation, convolved with an HST-like PSF (Airy of F814W on a 2.4 m mirror
plus a little Gaussian jitter), drawn on 64x64 pixels so that the galaxy fills the stamp as a
COSMOS cutout does, given Gaussian noise at a peak S/N drawn log-uniformly in ``snr_range`` and
normalised to a maximum of 1 — the same format as :func:`difflens.datasets.cosmos.read_catalog`.
"""
from __future__ import annotations

import numpy as np

from .cosmos import GalaxyStamps

#: Pixel scale of the rendered 64x64 stamps, arcsec (a ~2.6" COSMOS cutout downscaled to 64 px).
STAMP_PIXEL_SCALE = 0.04


def render_galaxy(rng: np.random.Generator, snr_range=(6.0, 80.0), size=64):
    """Render one normalised synthetic galaxy; returns (image, noise_sigma).

    Examples
    --------
    >>> import numpy as np
    >>> image, sigma = render_galaxy(np.random.default_rng(0))
    >>> image.shape, bool(float(image.max()) == 1.0 and sigma > 0)
    ((64, 64), True)
    """
    import galsim

    seed = int(rng.integers(1, 2 ** 31 - 1))
    hlr_disk = float(np.exp(rng.uniform(np.log(0.2), np.log(0.8))))
    bulge_frac = float(rng.beta(1.0, 4.0))
    n_bulge = float(rng.uniform(2.5, 4.5))
    hlr_bulge = hlr_disk * float(rng.uniform(0.3, 0.8))
    disk = galsim.Exponential(half_light_radius=hlr_disk)
    knot_frac = float(rng.uniform(0.0, 0.4))
    n_knots = int(rng.integers(5, 60))
    knots = galsim.RandomKnots(n_knots, half_light_radius=hlr_disk,
                               rng=galsim.BaseDeviate(seed))
    disk = (1 - knot_frac) * disk + knot_frac * knots
    bulge = galsim.Sersic(n_bulge, half_light_radius=hlr_bulge, trunc=8 * hlr_bulge)
    gal = (1 - bulge_frac) * disk + bulge_frac * bulge
    g = float(rng.uniform(0, 0.6)) * np.sqrt(rng.uniform())
    beta = float(rng.uniform(0, np.pi))
    gal = gal.shear(g=g, beta=beta * galsim.radians)
    gal = gal.shift(*rng.normal(0, 0.03, 2))
    psf = galsim.Convolve(galsim.Airy(lam=814.0, diam=2.4, obscuration=0.33,
                                      scale_unit=galsim.arcsec),
                          galsim.Gaussian(sigma=float(rng.uniform(0.01, 0.03))))
    obj = galsim.Convolve(gal, psf)
    img = obj.drawImage(nx=size, ny=size, scale=STAMP_PIXEL_SCALE).array.astype(np.float64)
    peak = img.max()
    snr = float(np.exp(rng.uniform(*np.log(snr_range))))
    sigma = peak / snr
    img = img + rng.normal(0, sigma, img.shape)
    peak = img.max()
    return (img / peak).astype(np.float32), sigma / peak


def synthetic_galaxies(n: int, seed: int = 0, snr_range=(6.0, 80.0), progress=True):
    """Render ``n`` synthetic galaxies (reproducible from ``seed``).

    Returns
    -------
    GalaxyStamps

    Examples
    --------
    >>> gals = synthetic_galaxies(3, seed=0, progress=False)
    >>> gals.images.shape
    (3, 64, 64)
    """
    rng = np.random.default_rng(seed)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="GalSim galaxies")
    imgs, sig = [], []
    for _ in it:
        a, s = render_galaxy(rng, snr_range)
        imgs.append(a)
        sig.append(s)
    return GalaxyStamps(np.stack(imgs), np.asarray(sig, np.float32),
                        np.asarray([f"synthetic:{seed}:{i}" for i in range(n)]),
                        {"synthetic": n})

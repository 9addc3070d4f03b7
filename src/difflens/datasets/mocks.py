"""Mock lens observations (paper Sec. 5.1).

Sources are held-out galaxy stamps denoised with non-local means (Buades et al. 2005; scikit-image
``denoise_nl_means``) or VAE decodes, placed with half-width ``s`` so they fill roughly the central
third of the source plane; lens parameters are drawn from a prior preset; the image is ray-traced on
the 256 x 256 grid, convolved with the PSF and given Gaussian noise at one of the paper's levels.
"""
from __future__ import annotations

import numpy as np
import torch

from ..instrument import add_noise, signal_to_noise
from ..model import Priors, lens_from_sites
from ..simulate import LENS_PARAMS, Simulator
from ..sources import PixelSource
from .observation import Observation

#: The paper's three noise levels (low, medium, high S/N) for sources of peak ~1.
NOISE_LEVELS = {"low": 0.333, "medium": 0.1, "high": 0.0333}


def denoise_stamp(stamp: np.ndarray, noise_sigma: float) -> np.ndarray:
    """Non-local-means denoising of a normalised stamp (negative pixels set to 0 afterwards).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> clean = np.exp(-((np.arange(64) - 32.0) ** 2)[:, None] / 50 - ((np.arange(64) - 32.0) ** 2) / 50)
    >>> out = denoise_stamp(clean + 0.05 * rng.standard_normal((64, 64)), 0.05)
    >>> bool(np.abs(out - clean).std() < 0.05), float(out.max())
    (True, 1.0)
    """
    from skimage.restoration import denoise_nl_means

    out = denoise_nl_means(np.asarray(stamp, dtype=np.float64), h=0.8 * noise_sigma,
                           sigma=noise_sigma, patch_size=5, patch_distance=6, fast_mode=False)
    return np.clip(out, 0.0, None) / max(out.max(), 1e-12)


def apodise_stamp(stamp: np.ndarray, inner=0.75) -> np.ndarray:
    """Taper a stamp to zero at its edge with a circular cosine window, then renormalise to peak 1.

    The window is 1 inside ``inner`` times the stamp half-width, falls as ``cos^2`` to 0 at the
    half-width and is 0 in the corners:

        w(r) = 1                                      r <= inner * R
        w(r) = cos^2(pi/2 (r - inner R) / ((1 - inner) R))   inner R < r < R
        w(r) = 0                                      r >= R,      R = (N - 1) / 2 pixels,

    with r measured from the stamp centre, so the whole border row and column is 0.

    Real stamps are cut square from a larger image: a galaxy whose light reaches the border (or a
    denoised background pedestal) then has a sharp square edge in the source plane, which no
    smooth source model reproduces and which lensing stretches across the image.  Apodised, the
    mock source keeps the galaxy and loses the cut.  The window is round, so 90-degree rotations
    of an apodised stamp are apodised stamps.

    Parameters
    ----------
    stamp : ndarray (N, N)
        Non-negative stamp.
    inner : float
        Fraction of the half-width kept untouched, in (0, 1).

    Examples
    --------
    >>> import numpy as np
    >>> out = apodise_stamp(np.ones((64, 64)))
    >>> float(out.max()), float(out[0, 0]), float(out[32, 32])
    (1.0, 0.0, 1.0)
    """
    stamp = np.asarray(stamp, dtype=np.float64)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1]:
        raise ValueError(f"apodise_stamp needs a square 2-d stamp, got shape {stamp.shape}")
    if not 0.0 < inner < 1.0:
        raise ValueError(f"inner must lie in (0, 1), got {inner}")
    half = (stamp.shape[0] - 1) / 2.0
    c = np.arange(stamp.shape[0]) - half
    r = np.hypot(c[:, None], c[None, :]) / half                   # in units of the half-width
    t = np.clip((r - inner) / (1.0 - inner), 0.0, 1.0)
    out = stamp * np.where(t < 1.0, np.cos(0.5 * np.pi * t) ** 2, 0.0)
    if out.max() <= 0:
        raise ValueError("the stamp has no positive flux inside the apodisation window")
    return out / out.max()


def draw_lens(seed: int, priors: Priors | None = None, min_r_ein=0.8, max_r_ein=2.0) -> dict:
    """Lens parameters from a prior preset (default ``Priors.default``), as floats.

    Draws are repeated until r_ein lies in [min_r_ein, max_r_ein] arcsec, so the ring sits well
    inside a 10" field.

    Examples
    --------
    >>> lens = draw_lens(0)
    >>> 0.8 <= lens["r_ein"] <= 2.0 and 0.1 <= lens["q"] <= 1.0 and lens == draw_lens(0)
    True
    """
    priors = priors or Priors.default()
    with torch.random.fork_rng():          # seeded draws without touching the caller's RNG
        torch.manual_seed(seed)
        for _ in range(1000):
            sites = {k: d.sample() for k, d in priors.lens.items()}
            lens = lens_from_sites(sites)
            if min_r_ein <= float(lens["r_ein"]) <= max_r_ein:
                break
    return {k: float(v) for k, v in lens.items()} | {
        "e1": float(sites["e1"]), "e2": float(sites["e2"])}


def make_mock(source_stamp, *, lens: dict, noise_sigma=0.1, s=None, amp=1.0, src_x0=0.0,
              src_y0=0.0, npix=256, pixel_scale=0.04, psf_sigma=0.05, seed=0,
              source_interpolation="bilinear"):
    """Simulate an observation of a stamp lensed by ``lens``.

    Parameters
    ----------
    source_stamp : ndarray (64, 64)
        Source stamp (peak ~1).
    lens : dict
        ``r_ein, q, phi, gamma, x0, y0, g1, g2`` (arcsec, radians).
    noise_sigma : float
        Pixel noise; the paper's 0.333 / 0.1 / 0.0333.
    s : float, optional
        Stamp half-width, arcsec; default fills the central third of the field (field / 6).
    source_interpolation : "bilinear" or "cubic"
        How the stamp is read between its pixels (:class:`difflens.sources.PixelSource`):
        "cubic" draws the smooth galaxy through the stamp's pixel values.

    Returns
    -------
    Observation with ``truth`` (lens, source placement, S/N).

    Examples
    --------
    >>> import numpy as np
    >>> lens = dict(r_ein=1.0, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
    >>> obs, clean = make_mock(np.ones((64, 64)), lens=lens, s=0.3, npix=32, pixel_scale=0.2)
    >>> obs.image.shape, obs.truth["r_ein"]
    ((32, 32), 1.0)
    """
    sim = Simulator(npix=npix, pixel_scale=pixel_scale, psf_sigma=psf_sigma,
                    dtype=torch.float64)
    s = s if s is not None else npix * pixel_scale / 6.0
    stamp = torch.as_tensor(np.asarray(source_stamp), dtype=torch.float64)
    lens_t = {k: lens[k] for k in LENS_PARAMS}
    clean = sim.image(lens_t, PixelSource(stamp, x0=src_x0, y0=src_y0, s=s, amp=amp,
                                          interpolation=source_interpolation))
    noisy = add_noise(clean, noise_sigma, generator=torch.Generator().manual_seed(seed))
    sn = float(signal_to_noise(noisy, noise_sigma, pixel_scale))
    truth = dict(lens_t, src_x0=src_x0, src_y0=src_y0, src_s=s, src_amp=amp, snr=sn,
                 noise_sigma=noise_sigma, psf_sigma=psf_sigma)
    return Observation(noisy.numpy(), noise_sigma, pixel_scale,
                       psf=sim.psf.numpy(), truth=truth), clean.numpy()


def held_out_galaxies(root, vae=None, apodise=False):
    """The real COSMOS galaxies the shipped VAE never saw, denoised for use as mock sources.

    Reads the GalSim-format catalogues below ``root`` (e.g. ``../shared/data/hst_galaxy_stamps``),
    keeps the stamps listed as held out in the VAE's model card (``real_test_held_out``) and
    denoises each with :func:`denoise_stamp` at its own noise level (paper Sec. 5.1).  With
    ``apodise=True`` each is then tapered to zero at its edge (:func:`apodise_stamp`): three of
    the seven keep 15-21% of their flux beyond 28 px from the centre and up to 0.2 of the peak on
    the border, i.e. a square cut in the source plane.

    Returns
    -------
    images : ndarray (N, 64, 64), peak 1
    ident : ndarray (N,) of str, catalogue identifiers

    Examples
    --------
    >>> images, ident = held_out_galaxies("../shared/data/hst_galaxy_stamps")  # doctest: +SKIP
    >>> images.shape                                                           # doctest: +SKIP
    (7, 64, 64)
    """
    from ..sources.vae import load_default_vae
    from .cosmos import Selection, load_cosmos

    vae = vae or load_default_vae()
    held = set(vae.card.get("real_test_held_out", []))
    if not held:
        raise ValueError("the VAE's model card lists no held-out galaxies")
    stamps = load_cosmos(root, Selection(snr_range=None), verbose=False)
    test = stamps.subset(np.array([i in held for i in stamps.ident]))
    if len(test) == 0:
        raise FileNotFoundError(f"none of the VAE's held-out galaxies were found below {root}")
    images = np.stack([denoise_stamp(im, float(sig))
                       for im, sig in zip(test.images, test.noise_sigma)])
    if apodise:
        images = np.stack([apodise_stamp(im) for im in images])
    return images, test.ident


def galaxy_stamp(galaxies, seed):
    """The source stamp of mock ``seed`` with ``source="galaxy"``: stamp ``seed % N`` of
    ``galaxies`` (N, 64, 64), rotated by ``90 * ((seed // N) % 4)`` degrees, peak 1.

    Returns
    -------
    (ndarray (64, 64), int, int) : the stamp, the galaxy index, the rotation (degrees).

    Examples
    --------
    >>> import numpy as np
    >>> stamp, index, rotation = galaxy_stamp(np.arange(2 * 4.0).reshape(2, 2, 2), 3)
    >>> index, rotation, float(stamp.max())
    (1, 90, 1.0)
    """
    n = len(galaxies)
    index, rotation = seed % n, 90 * ((seed // n) % 4)
    stamp = np.rot90(np.asarray(galaxies[index], dtype=np.float64), rotation // 90)
    return np.ascontiguousarray(stamp / stamp.max()), index, rotation


def simulate_mock(seed=0, *, noise_sigma=0.1, npix=256, pixel_scale=0.04, psf_sigma=0.05,
                  source="vae", vae=None, galaxies=None,
                  source_interpolation="bilinear") -> Observation:
    """A complete mock: lens from the default priors, source a VAE decode, a real galaxy or a
    Sersic stamp.

    The VAE source is the decode of ``z`` drawn from the fitted latent distribution without the
    x9 prior inflation (a typical galaxy), placed with half-width ``field / 6`` so it fills the
    central third of the source plane (paper Sec. 5.1).  ``truth`` holds the lens parameters (and
    e1, e2), the source placement, ``z`` and the S/N.

    Parameters
    ----------
    seed : int
        Fixes the lens, the source and the noise.
    noise_sigma : float
        Pixel noise (the paper's 0.333 / 0.1 / 0.0333).
    npix, pixel_scale, psf_sigma : grid size, arcsec per pixel, Gaussian PSF sigma (arcsec).
    source : "vae", "galaxy" or "sersic"
        ``"galaxy"``: stamp ``seed % N`` of ``galaxies``, rotated by ``90 * (seed // N)``
        degrees -- with :func:`held_out_galaxies`, real galaxies the VAE never saw, so a fit
        with the VAE source meets a source it cannot reproduce exactly, as on the sky.
    vae : VAESource, optional
        Defaults to the shipped one.
    galaxies : ndarray (N, 64, 64), optional
        Source stamps for ``source="galaxy"`` (peak ~1, noise-free).
    source_interpolation : "bilinear" or "cubic"
        How the source stamp is read between its pixels (:func:`make_mock`).

    Examples
    --------
    >>> obs = simulate_mock(1, noise_sigma=0.1, npix=64, pixel_scale=0.16, source="sersic")
    >>> obs.image.shape, sorted(obs.truth)[:4]
    ((64, 64), ['e1', 'e2', 'g1', 'g2'])
    """
    lens = draw_lens(seed)
    field = npix * pixel_scale
    if source == "vae":
        from ..sources.vae import load_default_vae

        vae = vae or load_default_vae()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            z = torch.distributions.MultivariateNormal(
                vae.prior.mean, scale_tril=vae.prior.scale_tril / 3.0).sample()
        with torch.no_grad():
            stamp = vae.decode(z).numpy()
    elif source == "sersic":
        from ..instrument import pixel_grid
        from ..sources import sersic

        x, y = pixel_grid(64, 2 * (field / 6.0) / 64, dtype=torch.float64)
        stamp = sersic(x, y, amp=1.0, r_e=field / 30, n=1.5, q=0.8, phi=1.0).numpy()
        stamp = stamp / stamp.max()
        z = None
    elif source == "galaxy":
        if galaxies is None or np.ndim(galaxies) != 3 or len(galaxies) == 0:
            raise ValueError("source='galaxy' needs galaxies=, stamps of shape (N, 64, 64), "
                             "e.g. held_out_galaxies(root)[0]")
        stamp, index, rotation = galaxy_stamp(galaxies, seed)
        z = None
    else:
        raise ValueError(f"source must be 'vae', 'galaxy' or 'sersic', got {source!r}")
    obs, _ = make_mock(stamp, lens=lens, noise_sigma=noise_sigma, s=field / 6.0, npix=npix,
                       pixel_scale=pixel_scale, psf_sigma=psf_sigma, seed=seed,
                       source_interpolation=source_interpolation)
    obs.truth.update(e1=lens["e1"], e2=lens["e2"])
    if source == "galaxy":
        obs.truth.update(galaxy=int(index), rotation_deg=rotation)
    if z is not None:
        obs.truth["z"] = z.numpy().tolist()
    return obs

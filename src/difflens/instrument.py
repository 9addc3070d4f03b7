"""The instrument: pixel grids, supersampling, PSF kernels and convolution, noise, S/N.

Conventions (method.md): ``img[..., i, j]`` has row i along +y and column j along +x; pixel centres
sit at ``x_j = (j - (N - 1)/2) * pixel_scale`` (arcsec), likewise in y.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from difflens._params import checking


def pixel_grid(npix, pixel_scale, *, supersample=1, pad=0, dtype=None, device=None):
    """Coordinates of pixel (or sub-pixel) centres.

    Parameters
    ----------
    npix : int or (int, int)
        Number of pixels (ny, nx); an int means square.
    pixel_scale : float
        Pixel size, arcsec.
    supersample : int
        Sub-pixels per pixel along each axis (>= 1).
    pad : int
        Extra pixels on every side (for PSF edge handling).

    Returns
    -------
    x, y : Tensor, shape ((ny + 2 pad) * ss, (nx + 2 pad) * ss)
        Positions in arcsec.

    Examples
    --------
    >>> x, y = pixel_grid(4, 0.5)
    >>> x[0].tolist()
    [-0.75, -0.25, 0.25, 0.75]
    """
    ny, nx = (npix, npix) if isinstance(npix, int) else npix
    if ny < 1 or nx < 1:
        raise ValueError(f"npix must be positive, got {npix}")
    if not pixel_scale > 0 or not math.isfinite(pixel_scale):
        raise ValueError(f"pixel_scale must be a positive number of arcsec, got {pixel_scale}")
    if int(supersample) != supersample or supersample < 1:
        raise ValueError(f"supersample must be a positive integer, got {supersample}")
    dtype = dtype or torch.get_default_dtype()

    def axis(n):
        m = (n + 2 * pad) * supersample
        k = torch.arange(m, dtype=dtype, device=device)
        return (k - (m - 1) / 2.0) * (pixel_scale / supersample)

    y, x = torch.meshgrid(axis(ny), axis(nx), indexing="ij")
    return x, y


def bin_pixels(image, factor):
    """Average ``factor x factor`` blocks: sub-pixel surface brightness -> pixel values.

    Examples
    --------
    >>> import torch
    >>> bin_pixels(torch.arange(16.0).reshape(4, 4), 2)    # means of 2x2 blocks
    tensor([[ 2.5000,  4.5000],
            [10.5000, 12.5000]])
    """
    if factor == 1:
        return image
    lead = image.shape[:-2]
    out = F.avg_pool2d(image.reshape(-1, 1, *image.shape[-2:]), factor)
    return out.reshape(*lead, *out.shape[-2:])


def gaussian_psf(sigma, pixel_scale, size=None, *, dtype=None, device=None):
    """A normalised, pixel-integrated circular Gaussian PSF kernel.

    Parameters
    ----------
    sigma : float
        Standard deviation, arcsec (> 0).
    pixel_scale : float
        Pixel size, arcsec.
    size : int, optional
        Odd kernel width in pixels; default covers +-5 sigma.

    Returns
    -------
    Tensor (size, size), summing to 1.

    Examples
    --------
    >>> k = gaussian_psf(0.05, 0.04)
    >>> round(float(k.sum()), 6), k.shape[0] % 2
    (1.0, 1)
    """
    if not sigma > 0:
        raise ValueError(f"PSF sigma must be positive (arcsec), got {sigma}")
    s = sigma / pixel_scale
    if size is None:
        size = 2 * int(math.ceil(5.0 * s)) + 1
    if size % 2 != 1 or size < 1:
        raise ValueError(f"PSF size must be a positive odd number of pixels, got {size}")
    dtype = dtype or torch.get_default_dtype()
    edges = ((torch.arange(size + 1, dtype=torch.float64, device=device) - size / 2.0)
             / (s * math.sqrt(2.0)))
    mass = torch.diff(torch.special.erf(edges)) / 2.0
    kernel = torch.outer(mass, mass)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def _as_tensor(value) -> torch.Tensor:
    """A tensor as it is (its device kept); anything else (numpy, lists) on the host."""
    return value if torch.is_tensor(value) else torch.as_tensor(value, device="cpu")


def pixel_psf(kernel, *, normalise=True, centre_tolerance=0.5):
    """Validate (and normalise) a pixel PSF kernel, e.g. read from a FITS file.

    Parameters
    ----------
    kernel : array_like (ny, nx)
        Odd-sized, finite kernel; its centroid must lie within ``centre_tolerance`` pixels of the
        central pixel.
    normalise : bool
        Divide by the sum so the PSF conserves flux.

    Returns
    -------
    Tensor (ny, nx)

    Examples
    --------
    >>> import torch
    >>> k = pixel_psf(torch.tensor([[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]]))
    >>> float(k.sum()), float(k[1, 1])
    (1.0, 0.5)
    """
    k = _as_tensor(kernel)
    if not k.is_floating_point():
        k = k.to(torch.get_default_dtype())
    if k.ndim != 2 or k.shape[0] % 2 != 1 or k.shape[1] % 2 != 1:
        raise ValueError(f"PSF kernel must be 2-d with odd sides, got shape {tuple(k.shape)}")
    if not torch.isfinite(k).all():
        raise ValueError("PSF kernel contains non-finite values")
    total = k.sum()
    if not total > 0:
        raise ValueError(f"PSF kernel must have a positive sum, got {float(total)}")
    iy, ix = torch.meshgrid(*(torch.arange(n, dtype=k.dtype, device=k.device) - n // 2
                              for n in k.shape), indexing="ij")
    cy, cx = float((iy * k).sum() / total), float((ix * k).sum() / total)
    if math.hypot(cx, cy) > centre_tolerance:
        raise ValueError(f"PSF kernel is not centred: centroid offset ({cx:.2f}, {cy:.2f}) px")
    return k / total if normalise else k


def convolve(image, kernel, *, mode="same", method="auto"):
    """Convolve images with a PSF kernel (true convolution, kernel flipped).

    Parameters
    ----------
    image : Tensor (..., H, W)
    kernel : Tensor (kh, kw), odd sides
    mode : {"same", "valid"}
        "same" pads with zeros (light beyond the edge is lost); "valid" returns
        (H - kh + 1, W - kw + 1) and is exact when the caller ray-traced a border of
        kh // 2, kw // 2 pixels, which is what :class:`difflens.simulate.Simulator` does.
    method : {"auto", "direct", "fft", "separable"}
        Direct ``conv2d``, FFT, or (for a kernel that is an outer product of two 1-d kernels,
        such as a Gaussian; see :func:`separable_factors`) two 1-d passes written as sums of
        shifted slices, which ``torch.compile`` fuses with the surrounding elementwise work.
        "auto" picks direct only for kernels up to 7x7: on CPU the FFT is faster from 13x13 up,
        already for one image (``benchmarks/psf_convolution.py``).

    Returns
    -------
    Tensor (..., H', W')

    Examples
    --------
    >>> import torch
    >>> img = torch.zeros(5, 5); img[2, 2] = 1.0            # a point source
    >>> k = torch.tensor([[0.0, 0.1, 0.0], [0.1, 0.6, 0.1], [0.0, 0.1, 0.0]])
    >>> bool(torch.allclose(convolve(img, k)[1:4, 1:4], k, atol=1e-6))
    True
    """
    kh, kw = kernel.shape
    if method == "auto":
        method = "direct" if max(kh, kw) <= 7 else "fft"
    if method == "separable":
        factors = separable_factors(kernel)
        if factors is None:
            raise ValueError("method='separable' needs a kernel that is an outer product of two "
                             "1-d kernels (rank 1); this one is not")
        return convolve_separable(image, *factors, mode=mode)
    lead = image.shape[:-2]
    h, w = image.shape[-2:]
    img = image.reshape(-1, 1, h, w)
    ker = kernel.to(image.dtype)
    if method == "direct":
        pad = (kh // 2, kw // 2) if mode == "same" else 0
        out = F.conv2d(img, ker.flip(-1, -2)[None, None], padding=pad)
    elif method == "fft":
        fh, fw = h + kh - 1, w + kw - 1
        spec = torch.fft.rfft2(img, s=(fh, fw)) * torch.fft.rfft2(ker, s=(fh, fw))
        full = torch.fft.irfft2(spec, s=(fh, fw))
        if mode == "same":
            out = full[..., kh // 2:kh // 2 + h, kw // 2:kw // 2 + w]
        else:
            out = full[..., kh - 1:h, kw - 1:w]
    else:
        raise ValueError(f"method must be 'auto', 'direct' or 'fft', got {method!r}")
    return out.reshape(*lead, *out.shape[-2:])


def separable_factors(kernel, rtol=1e-7):
    """Split a rank-1 kernel into 1-d factors: ``kernel = outer(column, row)``.

    Parameters
    ----------
    kernel : Tensor (kh, kw)
    rtol : float
        The kernel counts as rank 1 when its second singular value is below ``rtol`` times the
        first (a pixel-integrated Gaussian: ~1e-16; a measured HST or JWST PSF: not rank 1).

    Returns
    -------
    (Tensor (kh,), Tensor (kw,)) or None
        The column and row factors in the kernel's dtype, or None if the kernel is not rank 1.

    Examples
    --------
    >>> col, row = separable_factors(gaussian_psf(0.05, 0.04, size=7))
    >>> bool(torch.allclose(torch.outer(col, row), gaussian_psf(0.05, 0.04, size=7)))
    True
    """
    k = _as_tensor(kernel).to(torch.float64)
    u, sv, vh = torch.linalg.svd(k)
    if sv.numel() > 1 and sv[1] > rtol * sv[0]:
        return None
    col, row = u[:, 0] * sv[0].sqrt(), vh[0] * sv[0].sqrt()
    if col.sum() < 0:
        col, row = -col, -row
    return col.to(kernel.dtype), row.to(kernel.dtype)


def convolve_separable(image, col, row, *, mode="same"):
    """Convolve with the rank-1 kernel ``outer(col, row)`` as two 1-d passes.

    Each pass is a sum of shifted slices, ``sum_a col[kh-1-a] * image[..., a:a+h, :]``, pure
    elementwise work that ``torch.compile`` fuses into one loop (no FFT, no conv2d call).

    Parameters
    ----------
    image : Tensor (..., H, W)
    col, row : Tensor (kh,), (kw,)
        The 1-d factors (:func:`separable_factors`).
    mode : {"same", "valid"}
        As in :func:`convolve`.

    Returns
    -------
    Tensor (..., H', W')
    """
    kh, kw = col.numel(), row.numel()
    col, row = col.to(image.dtype).flip(0), row.to(image.dtype).flip(0)
    if mode == "same":
        image = F.pad(image, (kw // 2, kw // 2, kh // 2, kh // 2))
    elif mode != "valid":
        raise ValueError(f"mode must be 'same' or 'valid', got {mode!r}")
    h, w = image.shape[-2] - kh + 1, image.shape[-1] - kw + 1
    rows = sum(col[a] * image[..., a:a + h, :] for a in range(kh))
    return sum(row[b] * rows[..., :, b:b + w] for b in range(kw))


def add_noise(image, noise_sigma, *, generator=None):
    """Add Gaussian pixel noise.

    Parameters
    ----------
    image : Tensor (..., H, W)
    noise_sigma : float or Tensor broadcastable to the image (a noise map)
        Standard deviation per pixel, image units, >= 0.
    generator : torch.Generator, optional
        For reproducible noise.

    Examples
    --------
    >>> import torch
    >>> noisy = add_noise(torch.zeros(200, 200), 0.1, generator=torch.Generator().manual_seed(0))
    >>> bool(abs(float(noisy.std()) - 0.1) < 0.002)
    True
    """
    sigma = torch.as_tensor(noise_sigma, dtype=image.dtype, device=image.device)
    if not torch.isfinite(sigma).all() or (sigma < 0).any():
        raise ValueError("noise_sigma must be finite and non-negative")
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    return image + sigma * noise


def noise_map_from_exposure(image, background_rms, exposure_time):
    """Per-pixel noise of a drizzled image in counts/s (the HST-pipeline / lenstronomy convention).

        sigma = sqrt(background_rms^2 + max(I, 0) / t_exp),

    background (sky + read noise) plus the Poisson noise of the source counts ``I t_exp``, divided
    by ``t_exp``.  Negative pixels carry background noise only.

    Parameters
    ----------
    image : Tensor or array (..., H, W)
        Image in counts per second (electrons/s).
    background_rms : float
        Background noise per pixel, counts/s, > 0.
    exposure_time : float or Tensor/array broadcastable to the image
        Effective exposure time per pixel (an exposure map for drizzled frames), seconds, > 0.

    Returns
    -------
    Tensor (..., H, W), counts/s.

    Examples
    --------
    >>> round(float(noise_map_from_exposure(torch.tensor([[4.0]]), 3.0, 1.0)[0, 0]), 4)
    3.6056
    """
    img = _as_tensor(image)
    if not img.is_floating_point():
        img = img.to(torch.get_default_dtype())
    t = torch.as_tensor(exposure_time, dtype=img.dtype, device=img.device)
    if not (math.isfinite(float(background_rms)) and float(background_rms) > 0):
        raise ValueError(f"background_rms must be positive and finite, got {background_rms!r}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError("exposure_time must be positive and finite everywhere (seconds)")
    try:
        torch.broadcast_shapes(t.shape, img.shape)
    except RuntimeError as exc:
        raise ValueError(f"exposure map shape {tuple(t.shape)} does not match the image "
                         f"{tuple(img.shape)}") from exc
    return torch.sqrt(float(background_rms) ** 2 + img.clamp_min(0.0) / t)


def aperture_mask(npix, pixel_scale, radius, *, inner_radius=0.0, centre=(0.0, 0.0)):
    """Boolean mask (True = pixel used) of an annulus ``inner_radius <= r <= radius`` (arcsec)
    around ``centre`` (arcsec, pixel-frame x along columns, y along rows).

    Examples
    --------
    >>> int(aperture_mask(5, 1.0, 1.0).sum())
    5
    """
    if not (radius > 0 and 0 <= inner_radius < radius):
        raise ValueError(f"need 0 <= inner_radius < radius, got {inner_radius}, {radius}")
    x, y = pixel_grid(npix, pixel_scale, dtype=torch.float64)
    r = torch.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
    return (r <= radius) & (r >= inner_radius)


def signal_to_noise(image, noise_sigma, pixel_scale, *, blur_sigma=0.16):
    """The paper's S/N of an observation (Chianese et al. 2019, eqs. 24-25).

    The image is blurred with a Gaussian of ``blur_sigma`` arcsec; the mask ``m`` keeps pixels
    where the blurred image is >= ``noise_sigma``; ``S/N = sum(m I) / (noise_sigma sqrt(sum m))``.

    Parameters
    ----------
    image : Tensor (..., H, W)
        Observed image.
    noise_sigma : float
        Pixel noise, image units, > 0.
    pixel_scale : float
        arcsec per pixel.

    Returns
    -------
    Tensor (...)

    Examples
    --------
    >>> import torch
    >>> img = torch.zeros(64, 64); img[24:40, 24:40] = 1.0  # 256 pixels of 1 at sigma 0.5
    >>> snr = float(signal_to_noise(img, 0.5, 0.04, blur_sigma=0.001))
    >>> round(snr, 3)                                          # 256 / (0.5 * sqrt(256))
    32.0
    """
    if not noise_sigma > 0:
        raise ValueError(f"noise_sigma must be positive, got {noise_sigma}")
    kernel = gaussian_psf(blur_sigma, pixel_scale, dtype=image.dtype, device=image.device)
    blurred = convolve(image, kernel, mode="same")
    mask = (blurred >= noise_sigma).to(image.dtype)
    n = mask.sum(dim=(-2, -1))
    return (mask * image).sum(dim=(-2, -1)) / (noise_sigma * torch.sqrt(n.clamp_min(1.0)))


def gaussian_log_likelihood(model, data, noise_sigma, mask=None):
    """Gaussian pixel log-likelihood (Chianese et al. 2019, eq. 9).

        log L = -1/2 sum_i m_i [((d_i - model_i) / sigma_i)^2 + log(2 pi sigma_i^2)]

    Parameters
    ----------
    model : Tensor (..., H, W)
        Predicted image(s); a leading batch gives one value per image.
    data : Tensor (H, W)
        Observed image.
    noise_sigma : float or Tensor (H, W)
        Pixel noise (scalar or noise map), image units, > 0.
    mask : Tensor (H, W) of bool, optional
        True for pixels that enter the likelihood.

    Returns
    -------
    Tensor (...)

    Examples
    --------
    >>> import math, torch
    >>> ll = gaussian_log_likelihood(torch.zeros(2, 2), torch.ones(2, 2), 1.0)
    >>> round(float(ll), 6) == round(4 * (-0.5 - 0.5 * math.log(2 * math.pi)), 6)
    True
    """
    sigma = torch.as_tensor(noise_sigma, dtype=model.dtype, device=model.device)
    if checking() and (not torch.isfinite(sigma).all() or (sigma <= 0).any()):
        raise ValueError("noise_sigma must be finite and positive")
    return _unchecked_log_likelihood(model, data, sigma, mask)


def _unchecked_log_likelihood(model, data, sigma, mask=None):
    """:func:`gaussian_log_likelihood` without its check of ``sigma`` (a tensor of the model's
    dtype, already known finite and > 0), for callers that validated the observation once."""
    chi = (data - model) / sigma
    terms = chi * chi + torch.log(2.0 * math.pi * sigma * sigma)
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    return -0.5 * terms.sum(dim=(-2, -1))


def marginal_log_likelihood(templates, data, noise_sigma, prior_mean, prior_sd, mask=None):
    """Gaussian likelihood with linear amplitudes integrated out analytically.

    The model image is linear in K amplitudes, ``m = sum_k a_k T_k``, with a Gaussian prior
    ``a ~ N(mu, diag(sd^2))``.  With ``W = diag(mask / sigma^2)``, ``A = T^T W T + diag(1/sd^2)``
    and ``b = T^T W d + mu / sd^2``, the amplitudes given the data are ``N(A^-1 b, A^-1)`` and::

        log p(d) = -1/2 [chi^2(a*) + (a* - mu)^T diag(1/sd^2) (a* - mu)]
                   -1/2 sum_i m_i log(2 pi sigma_i^2) - 1/2 log det A - sum_k log sd_k,

    ``a* = A^-1 b`` (the "linear inversion" of lens modelling, here with a proper Gaussian prior so
    the evidence is exact; cf. Suyu et al. 2006 for pixelated sources).  chi^2 is
    summed from the residual at ``a*`` (no cancellation of large terms); the K x K solve runs in
    float64.

    Parameters
    ----------
    templates : Tensor (..., K, H, W)
        Images per unit amplitude (PSF-convolved), one per amplitude.
    data : Tensor (H, W) or (..., H, W)
        Observed image, less any part of the model not scaled by these amplitudes.
    noise_sigma : float or Tensor, () / (H, W) / like ``data``
        Pixel noise, image units, > 0.
    prior_mean, prior_sd : Tensor (K,)
        Gaussian prior of the amplitudes (image units per template unit); ``prior_sd > 0``.
    mask : Tensor of bool, (H, W) or like ``data``, optional
        True for pixels that enter the likelihood.

    Returns
    -------
    log_evidence : Tensor (...)
    mean : Tensor (..., K)
        Posterior mean of the amplitudes, ``a*``.
    cov : Tensor (..., K, K)
        Posterior covariance of the amplitudes, ``A^-1`` (float64).

    Examples
    --------
    >>> import torch
    >>> t = torch.ones(1, 2, 2, dtype=torch.float64)          # one template, 4 pixels
    >>> logz, mean, cov = marginal_log_likelihood(t, 3.0 * t[0], 1.0, torch.zeros(1),
    ...                                           torch.full((1,), 1e6))
    >>> round(float(mean[0]), 6), round(float(cov[0, 0]), 6)  # a = 3 +- 1/sqrt(4)
    (3.0, 0.25)
    """
    dtype = templates.dtype
    sigma = torch.as_tensor(noise_sigma, dtype=dtype, device=templates.device)
    mu = torch.as_tensor(prior_mean, dtype=torch.float64, device=templates.device)
    sd = torch.as_tensor(prior_sd, dtype=torch.float64, device=templates.device)
    if templates.ndim < 3 or mu.shape != templates.shape[-3:-2] or sd.shape != mu.shape:
        raise ValueError(f"templates (..., K, H, W) {tuple(templates.shape)} need prior_mean and "
                         f"prior_sd of shape (K,), got {tuple(mu.shape)} and {tuple(sd.shape)}")
    if checking() and not (torch.isfinite(sd).all() and (sd > 0).all()
                           and torch.isfinite(mu).all()):
        raise ValueError("amplitude prior: mean must be finite and sd finite and > 0")
    weight = 1.0 / (sigma * sigma) * torch.ones_like(data)
    if mask is not None:
        weight = torch.where(mask, weight, torch.zeros_like(weight))
    weighted = templates * weight.unsqueeze(-3)
    precision = 1.0 / (sd * sd)
    gram = torch.einsum("...kyx,...lyx->...kl", weighted, templates).to(torch.float64)
    proj = (weighted * data.unsqueeze(-3)).sum(dim=(-2, -1)).to(torch.float64)
    chol = torch.linalg.cholesky(gram + torch.diag_embed(precision.expand_as(proj)))
    mean = torch.cholesky_solve((proj + mu * precision)[..., None], chol)[..., 0]
    resid = data - (mean.to(dtype)[..., None, None] * templates).sum(-3)
    chi2 = (weight * resid * resid).sum(dim=(-2, -1)).to(torch.float64)
    chi2 = chi2 + ((mean - mu) ** 2 * precision).sum(-1)
    norm = torch.log(2.0 * math.pi * sigma * sigma) * torch.ones_like(data)
    if mask is not None:
        norm = torch.where(mask, norm, torch.zeros_like(norm))
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_evidence = (-0.5 * (chi2 + norm.sum(dim=(-2, -1)).to(torch.float64) + log_det)
                    - torch.log(sd).sum())
    return log_evidence.to(dtype), mean.to(dtype), torch.cholesky_inverse(chol)

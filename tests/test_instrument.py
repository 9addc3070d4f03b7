import math

import pytest
import torch

from difflens.instrument import (add_noise, bin_pixels, convolve, gaussian_log_likelihood,
                                 gaussian_psf, pixel_grid, pixel_psf, separable_factors,
                                 signal_to_noise)


def test_pixel_grid_convention():
    x, y = pixel_grid((3, 4), 0.1)
    assert x.shape == (3, 4)
    torch.testing.assert_close(x[0], torch.tensor([-0.15, -0.05, 0.05, 0.15]))
    torch.testing.assert_close(y[:, 0], torch.tensor([-0.1, 0.0, 0.1]))   # row i along +y
    xs, _ = pixel_grid(2, 1.0, supersample=2)
    torch.testing.assert_close(xs[0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    for bad in (dict(pixel_scale=-0.1), dict(pixel_scale=float("nan")), dict(supersample=0)):
        kw = dict(npix=4, pixel_scale=0.1)
        kw.update(bad)
        with pytest.raises(ValueError):
            pixel_grid(**kw)


def test_gaussian_psf_normalised_with_right_width():
    k = gaussian_psf(0.05, 0.01, dtype=torch.float64)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-14)
    c = (torch.arange(k.shape[0], dtype=torch.float64) - k.shape[0] // 2) * 0.01
    var = float((k.sum(0) * c ** 2).sum())
    # pixel-integrated Gaussian: sigma^2 + pixel^2 / 12 (up to the +-5 sigma truncation)
    assert var == pytest.approx(0.05 ** 2 + 0.01 ** 2 / 12, rel=1e-4)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_psf(-0.1, 0.04)
    with pytest.raises(ValueError, match="odd"):
        gaussian_psf(0.1, 0.04, size=10)


def test_pixel_psf_validation():
    k = pixel_psf(torch.ones(5, 5) * 3.0)
    assert float(k.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="odd"):
        pixel_psf(torch.ones(4, 5))
    with pytest.raises(ValueError, match="non-finite"):
        pixel_psf(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="positive sum"):
        pixel_psf(torch.zeros(3, 3))
    off = torch.zeros(7, 7)
    off[3, 6] = 1.0
    with pytest.raises(ValueError, match="not centred"):
        pixel_psf(off)


@pytest.mark.parametrize("method", ["direct", "fft", "separable"])
def test_convolution_conserves_flux_and_places_kernel(method):
    img = torch.zeros(2, 41, 41, dtype=torch.float64)
    img[0, 20, 20] = 1.0
    img[1, 10, 25] = 2.0
    gen = torch.Generator().manual_seed(3)
    # an asymmetric kernel (a mirrored kernel would fail); rank 1 so every method applies
    k = torch.outer(torch.rand(7, dtype=torch.float64, generator=gen),
                    torch.rand(5, dtype=torch.float64, generator=gen))
    k /= k.sum()
    out = convolve(img, k, method=method)
    torch.testing.assert_close(out.sum(dim=(-2, -1)), img.sum(dim=(-2, -1)))
    # a delta reproduces the kernel, not its mirror image
    torch.testing.assert_close(out[0, 17:24, 18:23], k)
    valid = convolve(img, k, mode="valid", method=method)
    assert valid.shape == (2, 35, 37)
    torch.testing.assert_close(valid, out[:, 3:-3, 2:-2])


def test_fft_and_direct_agree():
    img = torch.rand(64, 64, dtype=torch.float64)
    k = gaussian_psf(0.1, 0.04, dtype=torch.float64)
    torch.testing.assert_close(convolve(img, k, method="fft"), convolve(img, k, method="direct"))


def test_separable_factors_detect_rank_one_kernels():
    g = gaussian_psf(0.08, 0.04, dtype=torch.float64)
    col, row = separable_factors(g)
    torch.testing.assert_close(torch.outer(col, row), g)
    # an elliptical (rotated) Gaussian is not a product of 1-d kernels
    yy, xx = torch.meshgrid(torch.arange(-4.0, 5.0), torch.arange(-4.0, 5.0), indexing="ij")
    u, v = (xx + yy) / 2**0.5, (yy - xx) / 2**0.5
    tilted = torch.exp(-u**2 / 8.0 - v**2 / 2.0).double()
    assert separable_factors(tilted) is None
    with pytest.raises(ValueError, match="rank 1"):
        convolve(torch.ones(20, 20, dtype=torch.float64), tilted, method="separable")


def test_separable_convolution_gradient_matches_fft():
    img = torch.rand(2, 30, 33, dtype=torch.float64, requires_grad=True)
    k = gaussian_psf(0.1, 0.04, dtype=torch.float64)
    w = torch.rand(2, 30 - k.shape[0] + 1, 33 - k.shape[1] + 1, dtype=torch.float64)
    g_sep, = torch.autograd.grad((w * convolve(img, k, mode="valid", method="separable")).sum(),
                                 img)
    g_fft, = torch.autograd.grad((w * convolve(img, k, mode="valid", method="fft")).sum(), img)
    torch.testing.assert_close(g_sep, g_fft)


def test_bin_pixels_averages():
    img = torch.arange(16.0).reshape(4, 4)
    torch.testing.assert_close(bin_pixels(img, 2), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_noise_statistics_and_reproducibility():
    img = torch.zeros(200, 200, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    noisy = add_noise(img, 0.1, generator=g)
    assert float(noisy.std()) == pytest.approx(0.1, rel=0.02)
    again = add_noise(img, 0.1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy, again)
    with pytest.raises(ValueError, match="non-negative"):
        add_noise(img, -0.1)


def test_log_likelihood_by_hand_and_mask():
    data = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    model = torch.tensor([[0.5, 2.0], [1.0, -1.0]], dtype=torch.float64)
    sigma = torch.tensor([[0.5, 1.0], [2.0, 1.0]], dtype=torch.float64)
    expect = sum(-0.5 * ((d - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
                 for d, m, s in zip(data.flatten().tolist(), model.flatten().tolist(),
                                    sigma.flatten().tolist()))
    assert float(gaussian_log_likelihood(model, data, sigma)) == pytest.approx(expect)
    mask = torch.tensor([[True, True], [False, True]])
    changed = data.clone()
    changed[1, 0] = 100.0
    assert float(gaussian_log_likelihood(model, changed, sigma, mask)) == pytest.approx(
        float(gaussian_log_likelihood(model, data, sigma, mask)))
    with pytest.raises(ValueError, match="positive"):
        gaussian_log_likelihood(model, data, 0.0)


def test_signal_to_noise_of_a_flat_disk():
    """Flat disk of brightness A, radius R: the blurred image crosses sigma_noise a distance d
    outside the edge with Phi(-d / 0.16") = sigma / A (straight-edge approximation), so
    S/N = A N_disk / (sigma sqrt(N_mask)) with N = pi r^2 / pixel^2."""
    from scipy.stats import norm

    x, y = pixel_grid(160, 0.04, dtype=torch.float64)
    amp, radius, sigma = 2.0, 1.5, 0.1
    disk = ((x ** 2 + y ** 2) < radius ** 2).to(torch.float64) * amp
    d = -norm.ppf(sigma / amp) * 0.16
    n_disk = math.pi * radius ** 2 / 0.04 ** 2
    n_mask = math.pi * (radius + d) ** 2 / 0.04 ** 2
    expect = amp * n_disk / (sigma * math.sqrt(n_mask))
    assert float(signal_to_noise(disk, sigma, 0.04)) == pytest.approx(expect, rel=0.02)

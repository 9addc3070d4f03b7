import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from difflens.sources import PixelSource, Sersic, image_source, sersic, sersic_b


@pytest.mark.parametrize("n,tol", [(0.5, 2e-4), (1.0, 2e-5), (4.0, 1e-6)])
def test_sersic_b_encloses_half_the_light(n, tol):
    b = float(sersic_b(n))
    inner = quad(lambda r: r * math.exp(-b * (r ** (1 / n) - 1)), 0, 1, limit=200)[0]
    total = quad(lambda r: r * math.exp(-b * (r ** (1 / n) - 1)), 0, np.inf, limit=400)[0]
    assert inner / total == pytest.approx(0.5, abs=tol)


def test_sersic_profile_shape_and_orientation():
    # on the major axis at r_e the brightness is amp; on the minor axis at q r_e too
    phi, q = 0.7, 0.4
    pts = torch.tensor([[math.cos(phi), math.sin(phi)],
                        [-q * math.sin(phi), q * math.cos(phi)]], dtype=torch.float64) * 0.3
    v = sersic(pts[:, 0] + 0.1, pts[:, 1] - 0.2, amp=2.5, r_e=0.3, n=2.0, q=q, phi=phi,
               x0=0.1, y0=-0.2)
    torch.testing.assert_close(v, torch.full((2,), 2.5, dtype=torch.float64))


def test_sersic_gradients_finite_at_centre_and_gradcheck():
    x = torch.tensor([0.0, 0.1, -0.3], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 0.2, 0.05], dtype=torch.float64, requires_grad=True)
    v = sersic(x, y, amp=1.0, r_e=0.2, n=1.5, q=0.7, phi=0.3)
    gx, gy = torch.autograd.grad(v.sum(), (x, y))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for v in (1.2, 0.25, 1.5, 0.8, 1.0, 0.1, 0.05)]
    names = ("amp", "r_e", "n", "q", "phi", "x0", "y0")
    xs, ys = x.detach()[1:], y.detach()[1:]
    assert torch.autograd.gradcheck(lambda *p: sersic(xs, ys, **dict(zip(names, p))), params)


@pytest.mark.parametrize("kw,match", [(dict(r_e=0.0), "'r_e'"), (dict(n=0.1), "'n'"),
                                      (dict(q=1.5), "'q'"), (dict(amp=float("nan")), "'amp'")])
def test_sersic_bad_input(kw, match):
    base = dict(amp=1.0, r_e=0.2, n=1.0)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        sersic(torch.zeros(2), torch.zeros(2), **base)


def test_image_source_reproduces_pixel_values_and_is_zero_outside():
    stamp = torch.rand(8, 8, dtype=torch.float64)
    s, x0, y0 = 0.4, 0.1, -0.2
    centres = (torch.arange(8, dtype=torch.float64) - 3.5) / 4.0 * s
    yy, xx = torch.meshgrid(centres + y0, centres + x0, indexing="ij")
    v = image_source(xx, yy, stamp, x0=x0, y0=y0, s=s, amp=3.0)
    torch.testing.assert_close(v, 3.0 * stamp)   # row i along +y, column j along +x
    # zero-valued pixels beyond the border: brightness reaches 0 half a pixel outside [-s, s]
    out = image_source(torch.tensor([x0 + 1.13 * s, x0]), torch.tensor([y0, y0 - 1.2 * s]),
                       stamp, x0=x0, y0=y0, s=s, amp=3.0)
    assert (out == 0).all()


def test_image_source_conserves_flux():
    # a stamp that is zero on its border: the bilinear interpolant integrates to the pixel sum
    stamp = torch.zeros(16, 16, dtype=torch.float64)
    stamp[3:13, 5:11] = torch.rand(10, 6, dtype=torch.float64)
    s = 0.5
    n = 400
    axis = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * (2.4 * s / n)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    v = image_source(xx, yy, stamp, x0=0.0, y0=0.0, s=s, amp=1.0)
    flux = v.sum() * (2.4 * s / n) ** 2
    expected = stamp.sum() * (2 * s / 16) ** 2
    assert float(flux) == pytest.approx(float(expected), rel=1e-3)


def test_source_objects_match_functions_and_batch():
    bx = torch.randn(3, 5, 5, dtype=torch.float64) * 0.3
    by = torch.randn(3, 5, 5, dtype=torch.float64) * 0.3
    amps = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    v = Sersic(amp=amps, r_e=0.2, n=1.0, q=0.8)(bx, by)
    for i in range(3):
        torch.testing.assert_close(v[i], sersic(bx[i], by[i], amp=float(amps[i]), r_e=0.2, n=1.0,
                                                q=0.8))
    stamp = torch.rand(8, 8, dtype=torch.float64)
    w = PixelSource(stamp, x0=0.05, y0=0.0, s=0.5, amp=amps)(bx, by)
    for i in range(3):
        torch.testing.assert_close(w[i], image_source(bx[i], by[i], stamp, x0=0.05, y0=0.0,
                                                      s=0.5, amp=float(amps[i])))
    with pytest.raises(ValueError, match="source s"):
        PixelSource(stamp, s=-1.0)(bx, by)


@pytest.mark.parametrize("interpolation", ["bilinear", "cubic"])
def test_pixel_source_passes_through_pixel_values(interpolation):
    n, s = 12, 1.0
    stamp = torch.rand(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    centres = -s + (2 * torch.arange(n, dtype=torch.float64) + 1) * s / n
    y, x = torch.meshgrid(centres, centres, indexing="ij")           # row i along +y
    src = PixelSource(stamp, s=s, interpolation=interpolation)
    assert torch.allclose(src(x, y), stamp, atol=1e-12)


def test_cubic_source_draws_a_smooth_galaxy_between_pixels_better_than_bilinear():
    """A round Gaussian sampled at pixel centres, read back between them, against its formula."""
    n, s, sigma = 32, 1.0, 0.15
    centres = -s + (2 * torch.arange(n, dtype=torch.float64) + 1) * s / n
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    stamp = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(400, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    y = (torch.rand(400, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    truth = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    err = {m: float((PixelSource(stamp, s=s, interpolation=m)(x, y) - truth).abs().max())
           for m in ("bilinear", "cubic")}
    assert err["cubic"] < 0.01 and err["cubic"] < err["bilinear"] / 5


def test_cubic_source_has_a_continuous_gradient_and_bilinear_does_not():
    """d brightness / d x0 just either side of a pixel centre (a node of the interpolation):
    bilinear's jumps by the change of slope between pixels, cubic's agrees to O(h)."""
    gen = torch.Generator().manual_seed(1)
    stamp = torch.rand(16, 16, generator=gen, dtype=torch.float64)
    x = torch.tensor([1 / 16], dtype=torch.float64)     # a pixel centre of the 16-pixel stamp
    y = torch.tensor([0.03], dtype=torch.float64)
    jumps = {}
    for interpolation in ("bilinear", "cubic"):
        slopes = []
        for x0 in (-1e-7, 1e-7):
            x0 = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
            value = PixelSource(stamp, x0=x0, s=1.0, interpolation=interpolation)(x, y)
            slopes.append(float(torch.autograd.grad(value.sum(), x0)[0]))
        jumps[interpolation] = abs(slopes[1] - slopes[0])
    assert jumps["bilinear"] > 0.1
    assert jumps["cubic"] < 1e-4


def test_unknown_source_interpolation_is_refused():
    with pytest.raises(ValueError, match="interpolation"):
        PixelSource(torch.ones(4, 4), interpolation="nearest")(torch.zeros(1), torch.zeros(1))
    from difflens.model import LensModel
    from difflens.simulate import Simulator

    sim = Simulator(npix=8, pixel_scale=0.2, dtype=torch.float64)
    with pytest.raises(ValueError, match="interpolation"):
        LensModel(torch.zeros(8, 8), 0.1, sim, source_interpolation="bicubic")

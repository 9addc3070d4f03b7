import math
import shutil

import pytest
import torch

from difflens.instrument import gaussian_log_likelihood
from difflens.simulate import Simulator, deflection
from difflens.sources import PixelSource, Sersic

LENS = dict(r_ein=1.2, q=0.75, phi=0.5, gamma=2.1, x0=0.05, y0=-0.03, g1=0.03, g2=-0.02)
SRC = dict(amp=1.0, r_e=0.25, n=1.5, q=0.8, phi=1.0, x0=0.1, y0=0.05)


def test_uniform_source_gives_uniform_image():
    """Surface brightness is conserved by lensing: a uniform source stays uniform, PSF included."""
    sim = Simulator(npix=48, pixel_scale=0.08, dtype=torch.float64)
    uniform = lambda bx, by: torch.full_like(bx, 0.7)  # noqa: E731
    img = sim.image(LENS, uniform)
    torch.testing.assert_close(img, torch.full_like(img, 0.7))


def test_sis_total_magnification_of_a_compact_source():
    """A small source at beta inside the SIS caustic: two images, total |mu| = 2 r_ein / beta."""
    sim = Simulator(npix=200, pixel_scale=0.016, psf_sigma=None, supersample=3,
                    dtype=torch.float64)
    lens = dict(r_ein=1.0, q=1.0, phi=0.0, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
    beta, width = 0.4, 0.01
    gauss = lambda bx, by: torch.exp(-((bx - beta) ** 2 + by ** 2) / (2 * width ** 2))  # noqa
    img = sim.image(lens, gauss)
    lensed_flux = float(img.sum()) * 0.016 ** 2
    source_flux = 2 * math.pi * width ** 2
    assert lensed_flux / source_flux == pytest.approx(2 * 1.0 / beta, rel=5e-3)


def test_batched_equals_individual_and_dtypes_agree():
    sim = Simulator(npix=64, pixel_scale=0.06, dtype=torch.float64)
    r = torch.tensor([1.0, 1.2, 1.4], dtype=torch.float64)
    batch = sim.image(dict(LENS, r_ein=r), Sersic(**SRC))
    assert batch.shape == (3, 64, 64)
    for i in range(3):
        torch.testing.assert_close(batch[i], sim.image(dict(LENS, r_ein=float(r[i])), Sersic(**SRC)))
    sim32 = Simulator(npix=64, pixel_scale=0.06, dtype=torch.float32)
    img32 = sim32.image(LENS, Sersic(**SRC))
    assert img32.dtype == torch.float32
    torch.testing.assert_close(img32.double(), batch[1], atol=2e-5 * float(batch[1].max()), rtol=0)


def test_end_to_end_gradient_matches_finite_differences():
    sim = Simulator(npix=24, pixel_scale=0.1, psf_sigma=0.1, dtype=torch.float64)
    data = sim.image(LENS, Sersic(**SRC)) + 0.01 * torch.randn(24, 24, dtype=torch.float64)
    names = list(LENS) + ["s_" + k for k in SRC]
    start = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
             for v in list(LENS.values()) + list(SRC.values())]

    def loglike(*p):
        lens = dict(zip(LENS, p[:8]))
        src = Sersic(**dict(zip(SRC, p[8:])))
        return gaussian_log_likelihood(sim.image(lens, src), data, 0.05)

    assert torch.autograd.gradcheck(loglike, start, eps=1e-6, atol=1e-4, rtol=1e-4)
    assert len(names) == 15


def test_pixel_source_and_supersampling():
    stamp = torch.zeros(32, 32, dtype=torch.float64)
    stamp[12:20, 10:22] = 1.0
    sim1 = Simulator(npix=40, pixel_scale=0.1, dtype=torch.float64)
    sim3 = Simulator(npix=40, pixel_scale=0.1, supersample=3, dtype=torch.float64)
    src = PixelSource(stamp, x0=0.05, y0=0.0, s=0.4, amp=2.0)
    a, b = sim1.image(LENS, src), sim3.image(LENS, src)
    assert a.shape == b.shape == (40, 40)
    # supersampling changes pixel values, not the flux (to within sampling error)
    assert float(b.sum()) == pytest.approx(float(a.sum()), rel=0.03)


def test_missing_lens_parameter_is_named():
    with pytest.raises(KeyError, match="g2"):
        deflection(torch.zeros(2), torch.zeros(2), {k: v for k, v in LENS.items() if k != "g2"})


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_simulator_matches_eager_and_still_checks_its_input():
    eager = Simulator(npix=32, pixel_scale=0.1, dtype=torch.float64)
    fast = Simulator(npix=32, pixel_scale=0.1, dtype=torch.float64, compile=True)
    data = eager.image(LENS, Sersic(**SRC))
    r = torch.tensor([1.1, 1.3], dtype=torch.float64)

    def value_and_grad(sim):
        n = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
        rr = r.clone().requires_grad_()
        ll = gaussian_log_likelihood(sim.image(dict(LENS, r_ein=rr), Sersic(**dict(SRC, n=n))),
                                     data, 0.05).sum()
        return (ll, *torch.autograd.grad(ll, (rr, n)))

    for a, b in zip(value_and_grad(eager), value_and_grad(fast)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)

    # the fused likelihood (one compiled graph for image + likelihood) against the eager pieces
    mask = torch.rand(32, 32, generator=torch.Generator().manual_seed(3)) > 0.3

    def fused(sim):
        n = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
        rr = r.clone().requires_grad_()
        ll = sim.log_likelihood(data, 0.05, dict(LENS, r_ein=rr), Sersic(**dict(SRC, n=n)),
                                mask=mask)
        return (ll, *torch.autograd.grad(ll.sum(), (rr, n)))

    rr, n = r.clone().requires_grad_(), torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    ll = gaussian_log_likelihood(eager.image(dict(LENS, r_ein=rr), Sersic(**dict(SRC, n=n))),
                                 data, 0.05, mask)
    reference = (ll, *torch.autograd.grad(ll.sum(), (rr, n)))
    for sim in (eager, fast):
        for a, b in zip(reference, fused(sim)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)
    with pytest.raises(ValueError, match="'q'"):
        fast.image(dict(LENS, q=1.3), Sersic(**SRC))
    with pytest.raises(ValueError, match="r_ein"):
        fast.image(dict(LENS, r_ein=float("nan")), Sersic(**SRC))
    with pytest.raises(ValueError, match="source r_e"):
        fast.image(LENS, Sersic(**dict(SRC, r_e=-0.1)))
    # the lens light alone (no source) needs no lens
    light = Sersic(**SRC)
    torch.testing.assert_close(fast.image(None, None, [light]), eager.image(None, None, [light]))


def test_log_likelihood_checks_the_observation():
    sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
    data = torch.zeros(16, 16, dtype=torch.float64)
    src = Sersic(**SRC)
    with pytest.raises(ValueError, match="does not match the simulator grid"):
        sim.log_likelihood(torch.zeros(15, 16), 0.1, LENS, src)
    with pytest.raises(ValueError, match="non-finite"):
        sim.log_likelihood(torch.full((16, 16), float("nan")), 0.1, LENS, src)
    with pytest.raises(ValueError, match="noise_sigma must be finite and positive"):
        sim.log_likelihood(data, -0.1, LENS, src)
    with pytest.raises(ValueError, match="noise map shape"):
        sim.log_likelihood(data, torch.ones(8, 8), LENS, src)
    with pytest.raises(ValueError, match="mask shape"):
        sim.log_likelihood(data, 0.1, LENS, src, mask=torch.ones(4, 4, dtype=torch.bool))
    # a batch of observations meets a batch of lenses: one value each, as two separate calls
    batch = torch.stack([data, data + 0.3])
    lens = dict(LENS, r_ein=torch.tensor([1.1, 1.3], dtype=torch.float64))
    both = sim.log_likelihood(batch, 0.1, lens, src)
    for k in range(2):
        one = sim.log_likelihood(batch[k], 0.1, dict(LENS, r_ein=float(lens["r_ein"][k])), src)
        torch.testing.assert_close(both[k], one)

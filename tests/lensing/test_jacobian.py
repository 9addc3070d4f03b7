
import numpy as np
import torch

from difflens.lensing import critical_curves_and_caustics, magnification, shear_deflection
from difflens.lensing import spl_deflection


def sis(x, y):
    return spl_deflection(x, y, r_ein=1.0, q=1.0, phi=0.0, gamma=2.0)


def test_sis_magnification_matches_theory():
    # SIS: mu = 1 / (1 - r_ein / r), for points inside and outside the Einstein ring
    r = torch.tensor([0.2, 0.45, 0.7, 1.6, 3.0], dtype=torch.float64)
    th = torch.tensor([0.3, 1.9, -2.4, 0.8, 3.0], dtype=torch.float64)
    mu = magnification(sis, r * torch.cos(th), r * torch.sin(th))
    torch.testing.assert_close(mu, 1.0 / (1.0 - 1.0 / r))


def test_power_law_magnification_matches_theory():
    # circular power law: kappa = (3-g)/2 r^(1-g), alpha = r^(2-g):
    # det A = (1 - alpha/r) (1 - d alpha/dr) = (1 - r^(1-g)) (1 - (2-g) r^(1-g))
    g = 2.4
    r = torch.tensor([0.3, 0.6, 2.0], dtype=torch.float64)
    fn = lambda x, y: spl_deflection(x, y, r_ein=1.0, q=1.0, phi=0.0, gamma=g)  # noqa: E731
    mu = magnification(fn, r, torch.zeros_like(r))
    expect = 1.0 / ((1 - r ** (1 - g)) * (1 - (2 - g) * r ** (1 - g)))
    torch.testing.assert_close(mu, expect)


def test_shear_magnification():
    fn = lambda x, y: shear_deflection(x, y, g1=0.1, g2=0.05)  # noqa: E731
    mu = magnification(fn, torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    torch.testing.assert_close(mu, torch.full_like(mu, 1 / (1 - 0.1 ** 2 - 0.05 ** 2)))


def test_sis_critical_curve_is_einstein_ring_and_caustic_a_point():
    crit, caus = critical_curves_and_caustics(sis, extent=2.0, n=201)
    pts = np.concatenate(crit)
    np.testing.assert_allclose(np.hypot(pts[:, 0], pts[:, 1]), 1.0, atol=2e-3)
    cpts = np.concatenate(caus)
    assert np.hypot(cpts[:, 0], cpts[:, 1]).max() < 5e-3

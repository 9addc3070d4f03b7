import math

import numpy as np
import pytest
import torch

from difflens.lensing import (from_caustics_epl, from_lenstronomy_epl, from_lenstronomy_shear,
                              shear_deflection, spl_deflection, to_caustics_epl,
                              to_lenstronomy_epl, to_lenstronomy_shear)


def test_shear_is_gradient_of_its_potential():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    y = torch.randn(50, dtype=torch.float64, requires_grad=True)
    g1, g2 = 0.07, -0.03
    psi = g1 * (x * x - y * y) / 2 + g2 * x * y
    gx, gy = torch.autograd.grad(psi.sum(), (x, y))
    ax, ay = shear_deflection(x, y, g1=g1, g2=g2)
    torch.testing.assert_close(ax, gx)
    torch.testing.assert_close(ay, gy)


def test_shear_batch_and_bad_input():
    ax, ay = shear_deflection(torch.ones(2, 3), torch.zeros(2, 3), g1=torch.tensor([0.1, 0.2]),
                              g2=0.0)
    assert ax.shape == (2, 2, 3)
    torch.testing.assert_close(ax[:, 0, 0], torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="'g2'"):
        shear_deflection(torch.ones(2), torch.ones(2), g1=0.1, g2=float("nan"))


def lenstronomy_epl_kappa(x, y, theta_E, e1, e2, gamma, center_x, center_y):
    """Convergence in lenstronomy's EPL convention, written from its documentation:
    kappa = (3 - gamma)/2 (theta_E / sqrt(q x'^2 + y'^2 / q))^(gamma - 1)."""
    phi = 0.5 * math.atan2(e2, e1)
    e = math.hypot(e1, e2)
    q = (1 - e) / (1 + e)
    dx, dy = x - center_x, y - center_y
    xp = math.cos(phi) * dx + math.sin(phi) * dy
    yp = -math.sin(phi) * dx + math.cos(phi) * dy
    return (3 - gamma) / 2 * (theta_E / np.sqrt(q * xp ** 2 + yp ** 2 / q)) ** (gamma - 1)


def difflens_kappa(x, y, r_ein, q, phi, gamma, x0, y0):
    dx, dy = x - x0, y - y0
    xp = math.cos(phi) * dx + math.sin(phi) * dy
    yp = -math.sin(phi) * dx + math.cos(phi) * dy
    rho = np.sqrt(xp ** 2 + yp ** 2 / q ** 2)
    return (3 - gamma) / 2 * (rho / r_ein) ** (1 - gamma)


@pytest.mark.parametrize("params", [
    dict(r_ein=1.2, q=0.75, phi=0.5, gamma=2.1, x0=0.05, y0=-0.03),
    dict(r_ein=0.6, q=0.2, phi=-1.2, gamma=1.6, x0=-0.3, y0=0.2),
])
def test_lenstronomy_epl_conversion_gives_same_convergence(params):
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1.5, 100), rng.normal(0, 1.5, 100)
    kw = to_lenstronomy_epl(**params)
    np.testing.assert_allclose(lenstronomy_epl_kappa(x, y, **kw),
                               difflens_kappa(x, y, **params), rtol=1e-12)


def test_convergence_from_deflection_divergence():
    """kappa = div(alpha)/2 by autograd reproduces the convergence we convert between codes."""
    p = dict(r_ein=1.2, q=0.6, phi=0.5, gamma=2.3, x0=0.05, y0=-0.03)
    x = torch.tensor([0.9, -0.4, 1.5], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.3, 1.1, -0.7], dtype=torch.float64, requires_grad=True)
    ax, ay = spl_deflection(x, y, method="series", **p)
    dax = torch.autograd.grad(ax.sum(), x, retain_graph=True)[0]
    day = torch.autograd.grad(ay.sum(), y)[0]
    kappa = difflens_kappa(x.detach().numpy(), y.detach().numpy(), **p)
    np.testing.assert_allclose(((dax + day) / 2).numpy(), kappa, rtol=1e-7)


def test_round_trips():
    p = dict(r_ein=1.3, q=0.55, phi=1.1, gamma=2.2, x0=0.1, y0=-0.2)
    back = from_lenstronomy_epl(**to_lenstronomy_epl(**p))
    for k in p:
        assert back[k] == pytest.approx(p[k], rel=1e-12, abs=1e-12)
    back = from_caustics_epl(**to_caustics_epl(**p))
    for k in p:
        assert back[k] == pytest.approx(p[k], rel=1e-12, abs=1e-12)
    assert from_lenstronomy_shear(**to_lenstronomy_shear(0.02, -0.01)) == dict(g1=0.02, g2=-0.01)
    # tensors keep gradients
    r = torch.tensor(1.3, requires_grad=True)
    kw = to_lenstronomy_epl(r, torch.tensor(0.55), torch.tensor(1.1), 2.2)
    kw["theta_E"].backward()
    assert r.grad == pytest.approx(math.sqrt(0.55))
    # phi is only defined modulo pi
    back = from_lenstronomy_epl(**to_lenstronomy_epl(1.0, 0.5, 1.1 + math.pi, 2.0))
    assert back["phi"] == pytest.approx(1.1)

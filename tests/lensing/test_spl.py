"""SPLE deflection against references that share no code with difflens."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from difflens.lensing import spl_deflection
from difflens.lensing.tables import unit_circle_ratios

from ..conftest import tessore_metcalf


def random_configs(n, seed, q_range=(0.1, 1.0)):
    rng = np.random.default_rng(seed)
    r = 10 ** rng.uniform(-3, 1, n)            # 1e-3" .. 10"
    theta = rng.uniform(0, 2 * np.pi, n)
    return dict(x=r * np.cos(theta), y=r * np.sin(theta),
                r_ein=rng.uniform(0.3, 3.0, n), q=rng.uniform(*q_range, n),
                phi=rng.uniform(-np.pi, np.pi, n), gamma=rng.uniform(1.1, 2.9, n),
                x0=rng.normal(0, 0.3, n), y0=rng.normal(0, 0.3, n))


def difflens_at(cfg, method):
    """Evaluate each configuration as its own lens (a batch) at its own point."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in cfg.items()}
    # position the point relative to the lens centre: shift the lens instead of the grid
    ax, ay = spl_deflection(torch.zeros((), dtype=torch.float64),
                            torch.zeros((), dtype=torch.float64), r_ein=t["r_ein"], q=t["q"],
                            phi=t["phi"], gamma=t["gamma"], x0=t["x0"] - t["x"],
                            y0=t["y0"] - t["y"], method=method)
    return ax.numpy(), ay.numpy()


def max_relative_error(cfg, method):
    ax, ay = difflens_at(cfg, method)
    rx, ry = tessore_metcalf(0.0, 0.0, cfg["r_ein"], cfg["q"], cfg["phi"], cfg["gamma"],
                             cfg["x0"] - cfg["x"], cfg["y0"] - cfg["y"])
    return np.max(np.hypot(ax - rx, ay - ry) / np.hypot(rx, ry))


def test_table_accuracy_against_tessore_metcalf():
    assert max_relative_error(random_configs(50_000, 1), "table") < 1e-5


def test_series_accuracy_against_tessore_metcalf():
    assert max_relative_error(random_configs(20_000, 2), "series") < 1e-9
    # the series also works below the table's q range
    assert max_relative_error(random_configs(2_000, 3, q_range=(0.03, 0.1)), "series") < 1e-8


def keeton_quadrature(xp, yp, q, gamma):
    """alpha in the lens frame (r_ein = 1) by direct quadrature of Keeton's (2001) integrals,
    with scipy's algebraic weight for the u^((1-gamma)/2) endpoint singularity."""
    out = []
    for n, coord in ((0, xp), (1, yp)):
        def g(u):
            w = 1.0 - (1.0 - q * q) * u
            return (3 - gamma) / 2 * (xp ** 2 + yp ** 2 / w) ** ((1 - gamma) / 2) * w ** -(n + .5)
        val, _ = quad(g, 0.0, 1.0, weight="alg", wvar=((1 - gamma) / 2, 0.0), epsabs=0,
                      epsrel=1e-13, limit=500)
        out.append(q * coord * val)
    return out


@pytest.mark.parametrize("q,gamma", [(0.15, 1.3), (0.4, 2.5), (0.8, 1.9), (0.23, 2.8)])
def test_table_against_direct_quadrature(q, gamma):
    pts = [(0.7, 0.2), (-0.05, 1.4), (2.5, -3.0), (-0.001, -0.002)]
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    ax, ay = spl_deflection(x, y, r_ein=1.0, q=q, phi=0.0, gamma=gamma)
    for i, (xp, yp) in enumerate(pts):
        rx, ry = keeton_quadrature(xp, yp, q, gamma)
        assert math.hypot(ax[i] - rx, ay[i] - ry) / math.hypot(rx, ry) < 1e-5


def test_table_builder_matches_hypergeometric_form():
    eta = np.linspace(0.05, np.pi / 2 - 0.05, 7)
    gamma = np.full_like(eta, 2.3)
    r0, r1 = unit_circle_ratios(eta, 0.2, gamma)
    rx, ry = tessore_metcalf(np.cos(eta), np.sin(eta), 1.0, 0.2, 0.0, gamma)
    np.testing.assert_allclose(r0 * np.cos(eta), rx, rtol=1e-11)
    np.testing.assert_allclose(r1 * np.sin(eta), ry, rtol=1e-11)


@pytest.mark.parametrize("method", ["table", "series"])
def test_isothermal_limit_matches_closed_form_sie(method):
    # Kormann et al. (1994): kappa = b / (2 sqrt(q^2 x^2 + y^2)), b = q r_ein
    rng = np.random.default_rng(4)
    x, y = rng.normal(0, 1.5, 500), rng.normal(0, 1.5, 500)
    for q in (0.1, 0.37, 0.9):
        ax, ay = spl_deflection(torch.tensor(x), torch.tensor(y), r_ein=1.3, q=q, phi=0.0,
                                gamma=2.0, method=method)
        e = math.sqrt(1 - q * q)
        psi = np.sqrt(q * q * x * x + y * y)
        b = q * 1.3
        sx = b / e * np.arctan(e * x / psi)
        sy = b / e * np.arctanh(e * y / psi)
        err = np.hypot(ax.numpy() - sx, ay.numpy() - sy) / np.hypot(sx, sy)
        assert err.max() < (1e-5 if method == "table" else 1e-10)


@pytest.mark.parametrize("method", ["table", "series"])
@pytest.mark.parametrize("gamma", [1.2, 2.0, 2.7])
def test_circular_limit_is_power_law(method, gamma):
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)
    y = 0.3 * x - 0.1
    r_ein, x0, y0 = 1.7, 0.2, -0.1
    ax, ay = spl_deflection(x, y, r_ein=r_ein, q=1.0, phi=0.4, gamma=gamma, x0=x0, y0=y0,
                            method=method)
    dx, dy = x - x0, y - y0
    r = torch.sqrt(dx * dx + dy * dy)
    amp = r_ein ** (gamma - 1) * r ** (1 - gamma)
    torch.testing.assert_close(ax, amp * dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ay, amp * dy, rtol=1e-10, atol=1e-12)


def test_point_on_einstein_ring_of_sis():
    ax, ay = spl_deflection(torch.tensor([1.5, 0.0]), torch.tensor([0.0, -1.5]),
                            r_ein=1.5, q=1.0, phi=0.0, gamma=2.0)
    torch.testing.assert_close(ax, torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(ay, torch.tensor([0.0, -1.5]))


@pytest.mark.parametrize("method", ["table", "series"])
def test_gradcheck_all_lens_parameters(method):
    x = torch.tensor([[0.7, -0.4, 1.9], [0.05, -1.2, 0.3]], dtype=torch.float64)
    y = torch.tensor([[0.2, 0.9, -0.6], [0.5, -0.3, -2.2]], dtype=torch.float64)
    names = ("r_ein", "q", "phi", "gamma", "x0", "y0")
    for q in (0.35, 0.999):
        start = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
                 for v in (1.2, q, 0.4, 2.15, 0.05, -0.1)]

        def f(*p):
            return spl_deflection(x, y, method=method, **dict(zip(names, p)))

        assert torch.autograd.gradcheck(f, start, eps=1e-6, atol=1e-6, rtol=1e-5)
    xs = x.clone().requires_grad_(True)
    ys = y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: spl_deflection(a, b, r_ein=1.1, q=0.5, phi=1.0, gamma=1.8, method=method),
        (xs, ys), eps=1e-6, atol=1e-6)


def test_batched_table_gradients_and_no_silent_second_derivative():
    """Per-lens gradients of a batch of lenses equal the single-lens ones (the table's gradient
    is assembled per lens, not scattered into shared coefficients); a second derivative through
    the table raises instead of returning a wrong number."""
    x = torch.tensor([0.8, -0.3, 1.7, 0.2], dtype=torch.float64)
    y = torch.tensor([0.4, 1.1, -0.9, -0.6], dtype=torch.float64)
    qs = torch.tensor([0.3, 0.85], dtype=torch.float64, requires_grad=True)
    gs = torch.tensor([1.7, 2.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, g: spl_deflection(x, y, r_ein=1.1, q=q, phi=0.7, gamma=g), (qs, gs),
        eps=1e-6, atol=1e-6, rtol=1e-5)
    ax, ay = spl_deflection(x, y, r_ein=1.1, q=qs, phi=0.7, gamma=gs)
    dq, dg = torch.autograd.grad((ax + 2 * ay).sum(), (qs, gs))
    for k in range(2):
        q = qs[k].detach().clone().requires_grad_()
        g = gs[k].detach().clone().requires_grad_()
        a1, b1 = spl_deflection(x, y, r_ein=1.1, q=q, phi=0.7, gamma=g)
        d1 = torch.autograd.grad((a1 + 2 * b1).sum(), (q, g))
        torch.testing.assert_close(torch.stack([dq[k], dg[k]]), torch.stack(d1))
    q = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    ax, _ = spl_deflection(x, y, r_ein=1.1, q=q, phi=0.7, gamma=2.2)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(ax.sum(), q, create_graph=True)


def test_table_gradients_match_exact_series_and_are_continuous():
    """d alpha / d(q, gamma, x) of the interpolated table against finite differences of the exact
    series, sampled densely enough to cross many table nodes (a piecewise-linear table fails)."""
    x = torch.tensor([0.8, -0.3, 1.7], dtype=torch.float64)
    y = torch.tensor([0.4, 1.1, -0.9], dtype=torch.float64)
    h = 1e-5
    for q0 in np.linspace(0.12, 0.99, 23):
        for g0 in (1.3, 2.05, 2.75):
            q = torch.tensor(q0, dtype=torch.float64, requires_grad=True)
            g = torch.tensor(g0, dtype=torch.float64, requires_grad=True)
            ax, _ = spl_deflection(x, y, r_ein=1.0, q=q, phi=0.3, gamma=g)
            dq, dg = torch.autograd.grad(ax.sum(), (q, g))

            def series(qq, gg):
                return spl_deflection(x, y, r_ein=1.0, q=qq, phi=0.3, gamma=gg,
                                      method="series")[0].sum()
            fq = (series(q0 + h, g0) - series(q0 - h, g0)) / (2 * h)
            fg = (series(q0, g0 + h) - series(q0, g0 - h)) / (2 * h)
            assert abs(float(dq - fq)) < 2e-4 * max(1.0, abs(float(fq)))
            assert abs(float(dg - fg)) < 2e-4 * max(1.0, abs(float(fg)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["table", "series"])
@pytest.mark.parametrize("gamma", [1.1, 2.0, 2.9])
@pytest.mark.parametrize("q", [1.0, 0.5, 0.1])
def test_finite_values_and_gradients_at_centre_and_round_lens(dtype, method, gamma, q):
    # grid containing the exact lens centre and points on the axes
    axis = torch.arange(-5, 6, dtype=dtype) * 0.2   # contains exactly 0
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    p = {k: torch.tensor(v, dtype=dtype, requires_grad=True)
         for k, v in dict(r_ein=1.0, q=q, phi=0.0, gamma=gamma, x0=0.0, y0=0.0).items()}
    xr = x.clone().requires_grad_(True)
    ax, ay = spl_deflection(xr, y, method=method, **p)
    assert torch.isfinite(ax).all() and torch.isfinite(ay).all()
    assert ax[5, 5] == 0 and ay[5, 5] == 0
    grads = torch.autograd.grad((ax + ay).sum(), [xr, *p.values()])
    for g in grads:
        assert torch.isfinite(g).all()


def test_batch_shapes_and_consistency():
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    y = torch.linspace(1, -2, 12).reshape(3, 4)
    ax, ay = spl_deflection(x, y, r_ein=1.2, q=0.7, phi=0.1, gamma=2.1)
    assert ax.shape == (3, 4)
    qb = torch.tensor([0.7, 0.3, 0.9])
    bx, by = spl_deflection(x, y, r_ein=1.2, q=qb, phi=0.1, gamma=2.1)
    assert bx.shape == (3, 3, 4)
    torch.testing.assert_close(bx[0], ax)
    for i in range(3):
        sx, _ = spl_deflection(x, y, r_ein=1.2, q=float(qb[i]), phi=0.1, gamma=2.1)
        torch.testing.assert_close(bx[i], sx)
    # 0-d tensors behave as scalars; a batch of one keeps its batch axis
    assert spl_deflection(x, y, r_ein=torch.tensor(1.0), q=0.5, phi=0.0, gamma=2.0)[0].shape == (3, 4)
    assert spl_deflection(x, y, r_ein=torch.ones(1), q=0.5, phi=0.0, gamma=2.0)[0].shape == (1, 3, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=0.0), "'q'"), (dict(q=-0.2), "'q'"), (dict(q=1.2), "'q'"),
    (dict(gamma=1.0), "'gamma'"), (dict(gamma=3.0), "'gamma'"), (dict(gamma=3.5), "'gamma'"),
    (dict(r_ein=-1.0), "'r_ein'"), (dict(r_ein=float("nan")), "'r_ein'"),
    (dict(phi=float("inf")), "'phi'"), (dict(x0=torch.ones(2, 2)), "'x0'"),
    (dict(q=torch.tensor([0.5, 0.6]), gamma=torch.tensor([2.0, 2.1, 2.2])), "batch"),
    (dict(q=0.05), "series"),
])
def test_bad_input_names_the_parameter(kwargs, match):
    base = dict(r_ein=1.0, q=0.5, phi=0.0, gamma=2.0, x0=0.0, y0=0.0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        spl_deflection(torch.zeros(3), torch.zeros(3), **base)


def test_bad_coordinates():
    with pytest.raises(ValueError, match="same shape"):
        spl_deflection(torch.zeros(3), torch.zeros(4), r_ein=1.0, q=0.5, phi=0.0, gamma=2.0)
    with pytest.raises(ValueError, match="non-finite"):
        spl_deflection(torch.tensor([float("nan")]), torch.zeros(1), r_ein=1.0, q=0.5,
                       phi=0.0, gamma=2.0)
    with pytest.raises(ValueError, match="method"):
        spl_deflection(torch.zeros(1), torch.zeros(1), r_ein=1.0, q=0.5, phi=0.0, gamma=2.0,
                       method="trilinear")

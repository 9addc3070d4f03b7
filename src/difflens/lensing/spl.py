"""Singular power-law ellipsoid (SPLE) deflection: smooth table interpolation and exact series.

Convergence (Chianese et al. 2019, eqs. 11-12), in the lens frame centred on (x0, y0) and rotated by
phi so that x' lies along the major axis:

    kappa = (3 - gamma)/2 (rho / r_ein)^(1 - gamma),   rho^2 = x'^2 + y'^2 / q^2,

with ``r_ein`` the major-axis Einstein radius (arcsec), ``q`` in (0, 1] the axis ratio, ``gamma`` in
(1, 3) the 3-d slope (2 = isothermal).

Two methods give the deflection:

``method="table"`` (default, paper Appendix A)
    The unit-circle ratios ``R_n(eta, q, gamma)`` (see :mod:`difflens.lensing.tables`) are
    interpolated with a tensor-product cubic B-spline (C2: value, gradient and curvature are
    continuous in eta, q and gamma).  The eta axis uses mirror boundaries (both ratios are even
    about eta = 0 and pi/2, eq. A5); q and gamma use not-a-knot ends.  Any point then follows from
    the symmetry and self-similarity relations (A5)-(A7) with the circular radius r:

        alpha_x' = r_ein^(gamma-1) r^(1-gamma) x' R_0(eta),
        alpha_y' = r_ein^(gamma-1) r^(1-gamma) y' R_1(eta),   eta = atan2(|y'|, |x'|),

    and is rotated back by phi.  Per lens, the (q, gamma) part of the spline is contracted first,
    so each pixel costs a single 4-tap cubic in eta.

``method="series"`` (Tessore & Metcalf 2015, eqs. 13, 22-23)
    The exact hypergeometric series in complex notation, with b = q r_ein, t = gamma - 1,
    f = (1 - q)/(1 + q), R = sqrt(q^2 x'^2 + y'^2) and e^{i phi_e} = (q x' + i y') / R:

        alpha = 2 b / (1 + q) (b / R)^(t - 1) e^{i phi_e} sum_n a_n e^{2 i n phi_e},
        a_0 = 1,  a_n = -f (2n - 2 + t) / (2n + 2 - t) a_{n-1},

    summed by Horner's rule to a truncation error below ``series_tol``.

At the exact lens centre the deflection is set to zero (its angular average); for gamma > 2 it
diverges there.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .._params import as_coords, as_param, broadcast_params, check_range
from .tables import SplTableData, load_table, q_to_f


# ----------------------------------------------------------------------------------------------
# Uniform cubic B-splines
# ----------------------------------------------------------------------------------------------
def _bspline_prefilter(n: int, boundary: str) -> np.ndarray:
    """Matrix M of shape (n + 2, n) mapping node values to padded B-spline coefficients.

    The interpolant is s(t) = sum_k c_k B3(t - k) on nodes t = 0..n-1, with coefficients
    c_{-1}..c_n.  ``boundary`` is "mirror" (c_{-1} = c_1, c_n = c_{n-2}: zero slope, exact for
    even functions) or "not-a-knot" (third derivative continuous at nodes 1 and n-2).
    """
    a = np.zeros((n + 2, n + 2))
    for k in range(n):
        a[k, k:k + 3] = (1.0 / 6.0, 4.0 / 6.0, 1.0 / 6.0)
    if boundary == "mirror":
        a[n, [0, 2]] = (1.0, -1.0)
        a[n + 1, [n + 1, n - 1]] = (1.0, -1.0)
    elif boundary == "not-a-knot":
        stencil = (1.0, -4.0, 6.0, -4.0, 1.0)
        a[n, 0:5] = stencil
        a[n + 1, n - 3:n + 2] = stencil
    else:
        raise ValueError(f"unknown spline boundary {boundary!r}")
    return np.linalg.inv(a)[:, :n]


def _bspline_weights(t: torch.Tensor, n: int, derivative: bool = False):
    """Knot interval and the four cubic B-spline weights at continuous node coordinate ``t``.

    Returns the index of the first of the four padded coefficients (0..n-2) and weights of shape
    ``t.shape + (4,)`` -- and, with ``derivative``, their derivatives d/dt.  ``t`` is expected
    in [0, n - 1].
    """
    i = torch.clamp(torch.floor(t.detach()), 0, n - 2)
    u = t - i
    u2 = u * u
    u3 = u2 * u
    w = torch.stack([(1 - u) ** 3, 3 * u3 - 6 * u2 + 4, -3 * u3 + 3 * u2 + 3 * u + 1, u3], -1)
    if not derivative:
        return i.long(), w / 6.0
    dw = torch.stack([-3 * (1 - u) ** 2, 9 * u2 - 12 * u, -9 * u2 + 6 * u + 3, 3 * u2], -1)
    return i.long(), w / 6.0, dw / 6.0


def _eta_taps(coef: torch.Tensor, i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_j coef[b, c, i[b, p] + j] w[b, p, j]``: coef (B, C, m), i (B, P), w (B, P, 4)
    -> (B, C, P).  Four gathers with a broadcast index, which a compiled graph turns into loads
    inside its fused loop."""
    out = 0.0
    for j in range(4):
        idx = (i + j)[:, None, :].expand(-1, coef.shape[1], -1)
        out = out + torch.gather(coef, 2, idx) * w[:, None, :, j]
    return out


class _EtaSpline(torch.autograd.Function):
    """The cubic spline in eta of the table, with gradients that need no scatter.

    forward(coef, t, tf, tg) -> R (B, 2, P): ``coef`` (B, 3, 2, n + 2) holds, per lens, the
    eta-coefficients of R_0, R_1 and of their derivatives in the q and gamma node coordinates
    ``tf, tg`` (B,) (the tensor-product spline differentiated analytically); ``t`` (B, P) is the
    eta node coordinate.  The backward reads those derivative coefficients at the pixels, so the
    gradient never scatters pixel contributions back into the coefficient array (a slow
    scatter-add, and the only part of the simulator a compiled graph cannot fuse).  ``coef``
    itself gets no gradient (``tf, tg`` carry it); second derivatives are not provided (the
    backward raises if differentiated again).
    """

    @staticmethod
    def forward(ctx, coef, t, tf, tg):
        i, w = _bspline_weights(t, coef.shape[-1] - 2)
        ctx.save_for_backward(coef, t)
        return _eta_taps(coef[:, 0], i, w)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("second derivatives through the SPLE deflection table are not "
                               "available (create_graph=True); use method='series'")
        coef, t = ctx.saved_tensors
        i, w, dw = _bspline_weights(t, coef.shape[-1] - 2, derivative=True)
        ws, dws = w.unbind(-1), dw.unbind(-1)
        flat = coef.flatten(1, 2)                                    # (B, 6, m): R, dR/dtf, dR/dtg
        d_t, d_fg = 0.0, 0.0
        for j in range(4):
            picked = torch.gather(flat, 2, (i + j)[:, None, :].expand(-1, flat.shape[1], -1))
            d_t = d_t + picked[:, :2] * dws[j][:, None]
            d_fg = d_fg + picked[:, 2:] * ws[j][:, None]
        d_t = (grad * d_t).sum(1)
        d_fg = (grad[:, None] * d_fg.unflatten(1, (2, 2))).sum((2, 3))
        return None, d_t, d_fg[:, 0], d_fg[:, 1]


class SplTable:
    """The SPLE deflection table turned into cubic B-spline coefficients.

    This thin class holds real state: the coefficient array (and its copies per dtype/device,
    made once on first use).  Most users never build one: :func:`spl_deflection` uses
    :func:`default_spl_table`.

    Parameters
    ----------
    data : SplTableData
        Node values from :func:`difflens.lensing.tables.build_table` or ``load_table``.

    Examples
    --------
    >>> table = default_spl_table()          # the shipped table, built once with scipy
    >>> type(table).__name__
    'SplTable'
    """

    def __init__(self, data: SplTableData):
        vals = data.values
        n_eta, n_q, n_gamma = vals.shape[:3]
        coef = vals
        for axis, (n, bc) in enumerate([(n_eta, "mirror"), (n_q, "not-a-knot"),
                                        (n_gamma, "not-a-knot")]):
            m = _bspline_prefilter(n, bc)
            coef = np.moveaxis(np.tensordot(m, coef, axes=([1], [axis])), 0, axis)
        self.coefficients64 = torch.from_numpy(np.ascontiguousarray(coef))
        self.shape = (n_eta, n_q, n_gamma)
        self.q_min = data.q_min
        self.f_max = q_to_f(data.q_min)
        self._cache: dict = {}

    def coefficients(self, dtype, device) -> torch.Tensor:
        """Coefficients (n_eta + 2, n_q + 2, n_gamma + 2, 2) in the requested dtype/device."""
        key = (dtype, torch.device(device))
        if key not in self._cache:
            self._cache[key] = self.coefficients64.to(dtype=dtype, device=device)
        return self._cache[key]

    def ratios(self, eta: torch.Tensor, q: torch.Tensor, gamma: torch.Tensor):
        """Interpolated ``R_0, R_1`` at angles ``eta`` (B, P) for lenses ``q, gamma`` (B,)."""
        n_eta, n_q, n_gamma = self.shape
        coef = self.coefficients(eta.dtype, eta.device)
        taps = torch.arange(4, device=eta.device)
        t_f = q_to_f(q) / self.f_max * (n_q - 1)
        t_g = (gamma - 1.0) / 2.0 * (n_gamma - 1)
        with torch.no_grad():
            i_f, w_f, dw_f = _bspline_weights(t_f, n_q, derivative=True)
            i_g, w_g, dw_g = _bspline_weights(t_g, n_gamma, derivative=True)
            idx_f = (i_f[:, None] + taps)[:, :, None]
            idx_g = (i_g[:, None] + taps)[:, None, :]
            sub = coef[:, idx_f, idx_g, :]  # (n_eta + 2, B, 4, 4, 2)
            # eta-coefficients of R and of dR/dt_f, dR/dt_g: (B, 3, 2, n_eta + 2)
            c_eta = torch.einsum("ebfgk,bsf,bsg->bske", sub, torch.stack([w_f, dw_f, w_f], 1),
                                 torch.stack([w_g, w_g, dw_g], 1))
        r = _EtaSpline.apply(c_eta, eta * ((n_eta - 1) / (math.pi / 2)), t_f, t_g)
        return r[:, 0], r[:, 1]


@functools.lru_cache(maxsize=1)
def default_spl_table() -> SplTable:
    """The shipped table (``data/spl_table.npz``), loaded once and cached.

    It covers angles 0 <= eta <= pi/2 (radians), axis ratios ``q_min <= q <= 1`` and slopes
    1 < gamma < 3; :func:`spl_deflection` uses it unless given another table.

    Examples
    --------
    >>> table = default_spl_table()
    >>> table is default_spl_table()           # cached: every deflection call shares it
    True
    >>> table.q_min <= 0.2                     # covers the axis ratios of real lenses
    True
    """
    return SplTable(load_table())


# ----------------------------------------------------------------------------------------------
# Public deflection
# ----------------------------------------------------------------------------------------------
def _series_ratio_sum(q, gamma, xp, yp, tol):
    """Complex hypergeometric series of Tessore & Metcalf in the lens frame (see module doc).

    ``q, gamma`` have shape (B,); ``xp, yp`` (B, P).  Returns the real and imaginary parts of
    ``(q x' + i y') * sum_n a_n z^n`` with ``z = e^{2 i phi_e}``, and ``R^2``.
    """
    f = q_to_f(q)
    t = gamma - 1.0
    f_max = float(f.detach().max())
    if f_max <= 0.0:
        n_terms = 1
    else:
        n_terms = int(math.ceil((math.log(tol) + math.log1p(-f_max)) / math.log(f_max))) + 1
        n_terms = max(n_terms, 1)
    qx = q[:, None] * xp
    r2 = qx * qx + yp * yp
    centre = r2 == 0
    r2s = torch.where(centre, torch.ones_like(r2), r2)
    zr = (qx * qx - yp * yp) / r2s
    zi = 2.0 * qx * yp / r2s
    if n_terms > 1:
        n = torch.arange(1, n_terms, dtype=q.dtype, device=q.device)
        ratio = -f[:, None] * (2 * n - 2 + t[:, None]) / (2 * n + 2 - t[:, None])
        coeffs = torch.cat([torch.ones_like(f)[:, None], torch.cumprod(ratio, dim=1)], dim=1)
    else:
        coeffs = torch.ones_like(f)[:, None]
    sr = coeffs[:, -1:].expand_as(xp)
    si = torch.zeros_like(xp)
    for k in range(n_terms - 2, -1, -1):
        sr, si = coeffs[:, k:k + 1] + zr * sr - zi * si, zr * si + zi * sr
    return qx * sr - yp * si, qx * si + yp * sr, r2s, centre


def validate_spl(params: dict, like: torch.Tensor, *, method="table", table=None) -> dict:
    """Convert the SPLE parameters ``r_ein, q, phi, gamma, x0, y0`` to tensors like ``like`` and
    check them (finite; r_ein > 0, 0 < q <= 1, 1 < gamma < 3, and q inside the table with
    ``method="table"``); errors name the parameter."""
    p = {name: as_param(name, params[name], like)
         for name in ("r_ein", "q", "phi", "gamma", "x0", "y0")}
    check_range("r_ein", p["r_ein"], 0.0, math.inf)
    check_range("q", p["q"], 0.0, 1.0, high_inclusive=True)
    check_range("gamma", p["gamma"], 1.0, 3.0)
    if method == "table":
        q_min = (table if table is not None else default_spl_table()).q_min
        check_range("q", p["q"], q_min, 1.0, low_inclusive=True, high_inclusive=True,
                    hint=f"the deflection table covers q >= {q_min}; use method='series'")
    elif method != "series":
        raise ValueError(f"method must be 'table' or 'series', got {method!r}")
    return p


def spl_deflection(x, y, *, r_ein, q, phi, gamma, x0=0.0, y0=0.0, method="table",
                   table: SplTable | None = None, series_tol: float = 1e-10):
    """Deflection angle of a singular power-law ellipsoid.

    Parameters
    ----------
    x, y : Tensor or array_like, shape S
        Image-plane positions, arcsec.
    r_ein : float or Tensor () or (B,)
        Major-axis Einstein radius, arcsec, > 0.
    q : float or Tensor () or (B,)
        Axis ratio (minor/major) in (0, 1].  The table covers q >= 0.1; below that use
        ``method="series"``.
    phi : float or Tensor () or (B,)
        Position angle of the major axis, radians, counter-clockwise from +x.
    gamma : float or Tensor () or (B,)
        Power-law slope of the 3-d density, in (1, 3); 2 is isothermal.
    x0, y0 : float or Tensor () or (B,)
        Lens centre, arcsec.
    method : {"table", "series"}
        Smooth table interpolation (fast, C2, relative error < 1e-5) or the exact series.  The
        table gives exact first derivatives of its spline; for second derivatives
        (``create_graph=True``, Hessians) use the series.
    table : SplTable, optional
        Interpolation table; defaults to :func:`default_spl_table`.
    series_tol : float
        Truncation tolerance of the series (relative to its leading term).

    Returns
    -------
    alpha_x, alpha_y : Tensor, shape S or ``(B, *S)``
        Deflection, arcsec.

    Examples
    --------
    >>> import torch
    >>> ax, ay = spl_deflection(torch.tensor([1.0]), torch.tensor([0.0]),
    ...                         r_ein=1.0, q=1.0, phi=0.0, gamma=2.0)
    >>> round(float(ax), 6)
    1.0
    """
    x, y = as_coords(x, y)
    if method == "table":
        table = table if table is not None else default_spl_table()
    p = validate_spl(dict(r_ein=r_ein, q=q, phi=phi, gamma=gamma, x0=x0, y0=y0), x,
                     method=method, table=table)

    b, batch = broadcast_params(p, x.ndim)
    dx = x - b["x0"]
    dy = y - b["y0"]
    cos_phi, sin_phi = torch.cos(b["phi"]), torch.sin(b["phi"])
    xp = cos_phi * dx + sin_phi * dy
    yp = -sin_phi * dx + cos_phi * dy
    out_shape = xp.shape
    nb = 1 if batch is None else batch
    xp = xp.reshape(nb, -1)
    yp = yp.reshape(nb, -1)
    qb, gb, rb = (p[k].reshape(-1).expand(nb) for k in ("q", "gamma", "r_ein"))
    gcol, rcol = gb[:, None], rb[:, None]

    if method == "table":
        r2 = xp * xp + yp * yp
        centre = r2 == 0
        r2s = torch.where(centre, torch.ones_like(r2), r2)
        ax_abs = torch.where(centre, torch.ones_like(xp), xp.abs())
        eta = torch.atan2(yp.abs(), ax_abs)
        r0, r1 = table.ratios(eta, qb, gb)
        scale = torch.exp((gcol - 1.0) * torch.log(rcol) + (1.0 - gcol) * 0.5 * torch.log(r2s))
        axp = scale * xp * r0
        ayp = scale * yp * r1
    else:
        re, im, r2s, centre = _series_ratio_sum(qb, gb, xp, yp, series_tol)
        bq = qb[:, None] * rcol
        # 2 b / (1 + q) (b / R)^(t - 1) / R with t = gamma - 1
        pref = 2.0 * bq / (1.0 + qb[:, None]) * torch.exp(
            (gcol - 2.0) * (torch.log(bq) - 0.5 * torch.log(r2s)) - 0.5 * torch.log(r2s))
        axp = pref * re
        ayp = pref * im
    zero = torch.zeros_like(axp)
    axp = torch.where(centre, zero, axp).reshape(out_shape)
    ayp = torch.where(centre, zero, ayp).reshape(out_shape)
    return cos_phi * axp - sin_phi * ayp, sin_phi * axp + cos_phi * ayp

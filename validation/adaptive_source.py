"""Does a source grid that follows the image remove the slope bias?  (issue 7, section 3m)

    python validation/adaptive_source.py --seeds 0 1 2 3 [--step 4] [--mask-radius 3.2]
        [--line validation/results/evidence_max_pixel_seeds0-3.jsonl] [--max-eval 800]
        [--start RECORDS.json [--start-line]] [--offsets 4] [--laplace | --laplace-at JSONL]

Section 3g found that a regularised pixelated source on a grid *fixed on the source plane*
(Suyu et al. 2006) biases the slope by 2-9%: the lens sets how many grid values the arcs
cover, and the evidence's Occam factor rewards a lens that exposes fewer of them.  The
adaptive grids of Nightingale & Dye (2015) tie the source pixels to the image instead: their
centres are the image pixels of a sub-grid (every ``--step``-th pixel along each axis, inside
the circular mask), ray-traced with the lens being tried, so their number is the same for
every lens and their density follows the magnification.  The source between the centres is
the linear (barycentric) interpolation on their Delaunay triangulation, zero outside it; the
prior is the constant (neighbour-difference) regularisation on the triangulation's edges,
``E_S = 1/2 s^T H s``, of strength ``lambda``.

For each lens the source is integrated out exactly (the semi-linear inversion; Suyu et al.
2006, eq. 19 there): with ``B`` the PSF-blurred mapping from source values to the unmasked
pixels, ``F = B^T N^-1 B``, ``C = F + lambda H``, ``s = C^-1 B^T N^-1 d``,

    log p(d | lens, lambda) = -1/2 chi^2(s) - lambda/2 s^T H s - 1/2 log det C
                              + 1/2 log det (lambda H) - 1/2 sum log(2 pi sigma_i^2),

maximised over ``lambda`` at every lens. The lens (r_ein, e1, e2, gamma, centre, shear; the
mock's noise and PSF known) is then moved from the truth (or, with ``--start``, from the blind
VAE fit of a ``validation/coverage.py`` record file) to the nearest maximum of that evidence by
Nelder-Mead, restarted from its best point until a round gains < 0.5 nats (the triangulation
changes with the lens, so the evidence is not smooth enough for gradients). Each mock is the
one of sections 3-3h for that seed (256 x 256 at 0.04", PSF 0.05", noise 0.1, apodised held-out
galaxy). One JSON line per seed: errors (%) of r_ein, gamma, q and theta_E at the maximum, the
evidence at the truth and at the maximum and its terms (chi^2, Occam, regularisation), with
``--line`` also the evidence along the straight line from the truth (t = 0) to section 3g's
pixelated-source maximum (t = 1). ``--start-line`` skips the search: the evidence along the
line from the ``--start`` lens (t = 0) to the truth (t = 1) and where a parabola through it
peaks. ``--offsets 4`` averages the log evidence over four grids whose sub-grids are shifted by
whole pixels (the triangulation makes the evidence jump by ~1-2 nats as the lens moves).
``--laplace`` / ``--laplace-at`` add a finite-difference Hessian at the maximum (spoilt by
those jumps; section 3m). Findings: docs/validation.md, section 3m. An experiment, not library
code: it imports one private helper of :mod:`difflens.infer.evidence` (the PSF as a sparse
matrix).
"""
import argparse
import json
import math
import time

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.optimize import minimize, minimize_scalar
from scipy.spatial import Delaunay, cKDTree
import torch

from difflens.datasets.mocks import held_out_galaxies, simulate_mock
from difflens.infer.evidence import _psf_matrix
from difflens.model import ellipticity_to_q_phi, q_phi_to_ellipticity
from difflens.simulate import Simulator, ray_trace

FREE = ("r_ein", "e1", "e2", "gamma", "x0", "y0", "g1", "g2")
LENS = ("r_ein", "q", "phi", "gamma", "x0", "y0", "g1", "g2")
STEPS = np.array([0.02, 0.02, 0.02, 0.02, 0.01, 0.01, 0.005, 0.005])   # initial simplex


class AdaptiveInversion:
    """The evidence of one observation for any lens, the source integrated out on an
    image-tied Delaunay grid (module doc).

    Parameters
    ----------
    obs : Observation
        Image, scalar or per-pixel ``noise_sigma`` and PSF; no lens light.
    step : int
        Source pixel centres: every ``step``-th image pixel along each axis inside the mask.
    mask_radius : float
        Radius (arcsec) of the circular mask about the image centre: the pixels that enter the
        likelihood and seed the source grid.
    basis : "delaunay" or "patch"
        The source between the centres (``--basis``).
    reach : float
        A patch's image-plane radius in sub-grid steps (``basis="patch"`` only).
    offset : (int, int), optional
        Row and column of the sub-grid's first pixel (default ``step // 2`` for both).
    """

    def __init__(self, obs, step=4, mask_radius=3.2, basis="delaunay", reach=1.5, offset=None):
        if step < 1 or not mask_radius > 0 or not reach > 0:
            raise ValueError(f"step must be >= 1, mask_radius and reach > 0, got {step}, "
                             f"{mask_radius}, {reach}")
        if basis not in ("delaunay", "patch"):
            raise ValueError(f"basis must be 'delaunay' or 'patch', got {basis!r}")
        self.basis = basis
        self.radius = reach * step * obs.pixel_scale         # a patch's image-plane radius
        self.sim = sim = Simulator(npix=obs.shape, pixel_scale=obs.pixel_scale,
                                   psf=torch.as_tensor(obs.psf), dtype=torch.float64)
        ny, nx = sim.npix
        p = sim.pad
        x, y = sim.x, sim.y                                         # padded grid, arcsec
        xi, yi = x[p:p + ny, p:p + nx], y[p:p + ny, p:p + nx]
        inside = (torch.hypot(xi, yi) <= mask_radius).numpy()
        self.mask = inside.ravel()
        # the padded pixels the PSF carries into the unmasked ones
        margin = mask_radius + (p + 1) * obs.pixel_scale * math.sqrt(2.0)
        self.rows = np.flatnonzero((torch.hypot(x, y) <= margin).numpy().ravel())
        self.x, self.y = x.reshape(-1)[self.rows], y.reshape(-1)[self.rows]
        sub = np.zeros_like(inside)
        oy, ox = (step // 2, step // 2) if offset is None else offset
        sub[oy::step, ox::step] = True
        sub &= inside
        self.cx, self.cy = xi[torch.from_numpy(sub)], yi[torch.from_numpy(sub)]
        self.blur = _psf_matrix(sim.psf, ny, nx).tocsr()[self.mask][:, self.rows]
        noise = np.broadcast_to(np.asarray(obs.noise_sigma, dtype=np.float64), (ny, nx))
        self.weight = 1.0 / noise.ravel()[self.mask] ** 2
        self.data = np.asarray(obs.image, dtype=np.float64).ravel()[self.mask]
        self.norm = -0.5 * float(np.log(2.0 * math.pi / self.weight).sum())
        self.dWd = float((self.weight * self.data ** 2).sum())

    @property
    def n_source(self):
        return len(self.cx)

    def _trace(self, x, y, lens):
        with torch.no_grad():
            bx, by = ray_trace(x, y, lens, table=self.sim.table)
        return np.stack([bx.numpy(), by.numpy()], axis=1)

    def matrices(self, lens):
        """``(B, H, log det H)`` at ``lens`` (a dict of floats, q/phi convention): the blurred
        mapping from source values to the unmasked pixels (sparse, image units per unit source
        value) and the regularisation matrix (dense)."""
        lens = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in lens.items()}
        if self.basis == "patch":
            return self._patches(lens)
        centres = self._trace(self.cx, self.cy, lens)
        tri = Delaunay(centres)
        traced = self._trace(self.x, self.y, lens)
        simplex = tri.find_simplex(traced)
        hit = np.flatnonzero(simplex >= 0)
        T = tri.transform[simplex[hit]]                             # barycentric transforms
        lam2 = np.einsum("mij,mj->mi", T[:, :2], traced[hit] - T[:, 2])
        bary = np.column_stack([lam2, 1.0 - lam2.sum(1)])
        n = len(centres)
        M = sp.csr_matrix((bary.ravel(), (np.repeat(hit, 3), tri.simplices[simplex[hit]].ravel())),
                          shape=(len(self.rows), n))
        B = (self.blur @ M).tocsr()
        indptr, nbr = tri.vertex_neighbor_vertices
        i = np.repeat(np.arange(n), np.diff(indptr))
        keep = i < nbr
        i, j = i[keep], nbr[keep]
        D = sp.csr_matrix((np.r_[np.ones(len(i)), -np.ones(len(i))],
                           (np.r_[np.arange(len(i)), np.arange(len(i))], np.r_[i, j])),
                          shape=(len(i), n))
        H = (D.T @ D).toarray() + 1e-8 * np.eye(n)      # the constant vector: a tiny ridge
        log_det_H = 2.0 * float(np.log(np.diag(sla.cholesky(H, lower=True))).sum())
        return B, H, log_det_H

    def _patches(self, lens, floor=0.05, delta=1e-4):
        """``(B, I, 0)`` for the patch basis: source basis function ``i`` is the source-plane
        image of an image-plane disc of radius ``self.radius`` about sub-grid pixel ``i``,
        through the lens linearised there (``A_i = d beta / d theta``, singular values floored at
        ``floor`` so that patches on the critical curve keep a width), with the compact Wendland
        profile ``(1 - rho)^4 (4 rho + 1)``; white prior on the coefficients.  Smooth in the lens,
        so the evidence is too."""
        c = self._trace(self.cx, self.cy, lens)
        ax = (self._trace(self.cx + delta, self.cy, lens)
              - self._trace(self.cx - delta, self.cy, lens)) / (2 * delta)
        ay = (self._trace(self.cx, self.cy + delta, lens)
              - self._trace(self.cx, self.cy - delta, lens)) / (2 * delta)
        A = np.stack([ax, ay], axis=2)                         # (n, 2 [beta], 2 [theta])
        U, S, _ = np.linalg.svd(A)
        S = np.maximum(S, floor)
        # rho = |A_i^-1 (beta - c_i)| / R, with A_i = U S V^T: |S^-1 U^T (beta - c_i)| / R
        to_unit = np.swapaxes(U, 1, 2) / S[:, :, None] / self.radius    # (n, 2, 2)
        traced = self._trace(self.x, self.y, lens)
        tree = cKDTree(c)
        pairs = tree.query_ball_point(traced, r=self.radius * S.max())
        rows = np.repeat(np.arange(len(traced)), [len(q) for q in pairs])
        cols = np.fromiter((j for q in pairs for j in q), dtype=np.int64, count=len(rows))
        u = np.einsum("mij,mj->mi", to_unit[cols], traced[rows] - c[cols])
        rho = np.hypot(u[:, 0], u[:, 1])
        keep = rho < 1.0
        vals = (1.0 - rho[keep]) ** 4 * (4.0 * rho[keep] + 1.0)
        Phi = sp.csr_matrix((vals, (rows[keep], cols[keep])), shape=(len(traced), len(c)))
        B = (self.blur @ Phi).tocsr()
        return B, sp.identity(len(c), format="csr"), 0.0

    def evidence(self, lens, log_lambda=None):
        """The log evidence (nats) at ``lens``, maximised over ``log lambda`` unless given,
        and its terms."""
        B, H, log_det_H = self.matrices(lens)
        F = (B.T @ sp.diags(self.weight) @ B).toarray()
        H = H.toarray() if sp.issparse(H) else H
        b = B.T @ (self.weight * self.data)
        n = len(b)

        def terms(log_lam):
            lam = math.exp(log_lam)
            L = sla.cholesky(F + lam * H, lower=True)
            s = sla.cho_solve((L, True), b)
            chi2 = self.dWd - 2.0 * float(s @ b) + float(s @ F @ s)
            reg = lam * float(s @ H @ s)
            log_det_C = 2.0 * float(np.log(np.diag(L)).sum())
            occam = -0.5 * log_det_C + 0.5 * (n * log_lam + log_det_H)
            value = self.norm - 0.5 * chi2 - 0.5 * reg + occam
            return dict(log_evidence=value, chi2=chi2, regularisation=0.5 * reg, occam=occam,
                        log_lambda=log_lam)

        if log_lambda is None:
            best = minimize_scalar(lambda t: -terms(t)["log_evidence"], bounds=(-12.0, 12.0),
                                   method="bounded", options=dict(xatol=0.02))
            log_lambda = float(best.x)
        return terms(log_lambda)


class AveragedInversion:
    """The log evidence averaged over adaptive grids whose sub-grids are shifted by whole
    pixels (``offsets``: (row, column) pairs below ``step``): the same model, its
    triangulation's ~1-2 nat roughness in the lens averaged down."""

    def __init__(self, obs, offsets, **kw):
        self.parts = [AdaptiveInversion(obs, offset=o, **kw) for o in offsets]
        self.mask = self.parts[0].mask
        self.n_source = self.parts[0].n_source

    def evidence(self, lens, log_lambda=None):
        terms = [p.evidence(lens, log_lambda) for p in self.parts]
        return {k: float(np.mean([t[k] for t in terms])) for k in terms[0]}


def lens_from_vector(v):
    q, phi = ellipticity_to_q_phi(torch.tensor(v[1]), torch.tensor(v[2]))
    return dict(r_ein=v[0], q=float(q), phi=float(phi), gamma=v[3], x0=v[4], y0=v[5], g1=v[6],
                g2=v[7])


def vector_from_lens(lens):
    e1, e2 = q_phi_to_ellipticity(torch.tensor(float(lens["q"])), torch.tensor(float(lens["phi"])))
    return np.array([lens["r_ein"], float(e1), float(e2), lens["gamma"], lens["x0"], lens["y0"],
                     lens["g1"], lens["g2"]], dtype=np.float64)


def relative_errors(lens, truth):
    err = {k: round(100 * (lens[k] - truth[k]) / truth[k], 2) for k in ("r_ein", "gamma", "q")}
    err["theta_E"] = round(100 * (math.sqrt(lens["q"]) * lens["r_ein"]
                                  / (math.sqrt(truth["q"]) * truth["r_ein"]) - 1), 2)
    return err


def maximise(inv, start, max_eval, rounds=4, tol=0.5):
    """Nelder-Mead on the lens vector from ``start``, restarted from its best point with a
    fresh simplex until a round gains less than ``tol`` nats (at most ``rounds``; Nelder-Mead
    stalls on a collapsed simplex).  Returns the best vector, its value and the evaluations."""
    def loss(v):
        try:
            return -inv.evidence(lens_from_vector(v))["log_evidence"]
        except (ValueError, np.linalg.LinAlgError):     # left the lens's domain
            return np.inf

    best, value, nfev = np.asarray(start, dtype=np.float64), -loss(start), 1
    for _ in range(rounds):
        simplex = np.vstack([best] + [best + np.diag(STEPS)[k] for k in range(len(best))])
        res = minimize(loss, best, method="Nelder-Mead",
                       options=dict(initial_simplex=simplex, maxfev=max_eval, xatol=1e-4,
                                    fatol=0.05))
        nfev += res.nfev
        gain = -res.fun - value
        if gain > 0:
            best, value = res.x, -res.fun
        if gain < tol:
            break
    return best, value, nfev


SCALES = np.array([0.015, 0.01, 0.01, 0.015, 0.003, 0.003, 0.003, 0.003])   # ~posterior sds


def surface(inv, start, rounds=4, points=120, seed=0):
    """The maximum and curvature of a rough evidence by response surfaces (noise-robust where
    Nelder-Mead stalls on the triangulation's ~1-2 nat bumps): each round evaluates ``points``
    lenses drawn about the current centre with the current scales (the 8 lens-vector sds, at
    first :data:`SCALES`), fits a quadratic by least squares and moves the centre to its vertex
    (a step of at most 3 scales); the fitted curvature gives the next scales.  Returns the
    centre, the covariance ``-Q^-1`` of the last round (None if not negative definite) and the
    number of evaluations."""
    rng = np.random.default_rng(seed)
    n = len(start)
    centre, scales, cov = np.asarray(start, dtype=np.float64), SCALES.copy(), None
    iu = np.triu_indices(n)
    for _ in range(rounds):
        u = rng.standard_normal((points, n)) * 1.5               # in units of the scales
        y = np.array([inv.evidence(lens_from_vector(centre + scales * ui))["log_evidence"]
                      for ui in u])
        quad = np.einsum("pi,pj->pij", u, u)[:, iu[0], iu[1]]
        design = np.column_stack([np.ones(points), u, quad])
        coef = np.linalg.lstsq(design, y - y.mean(), rcond=None)[0]
        g = coef[1:n + 1]
        Q = np.zeros((n, n))
        Q[iu] = coef[n + 1:]
        Q = Q + Q.T                                              # y = g.u + 1/2 u^T Q u
        eig = np.linalg.eigvalsh(Q)
        if np.all(eig < 0):
            step = -np.linalg.solve(Q, g)
            cov_u = -np.linalg.inv(Q)
            cov = scales[:, None] * cov_u * scales[None, :]
        else:
            step, cov = g / (np.linalg.norm(g) + 1e-12), None
        norm = np.linalg.norm(step)
        centre = centre + scales * (step * min(1.0, 3.0 / max(norm, 1e-12)))
        if cov is not None:
            scales = np.clip(np.sqrt(np.diag(cov)), 0.3 * SCALES, 3.0 * SCALES)
    return centre, cov, rounds * points


LAPLACE_STEPS = np.array([0.01, 0.01, 0.01, 0.01, 0.002, 0.002, 0.002, 0.002])


def derived(v):
    """``r_ein, gamma, q, phi, g1, g2, theta_E`` from the lens vector ``v`` (tensor)."""
    q, phi = ellipticity_to_q_phi(v[1], v[2])
    return torch.stack([v[0], v[3], q, phi, v[6], v[7], torch.sqrt(q) * v[0]])


LINE_T = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)
DERIVED = ("r_ein", "gamma", "q", "phi", "g1", "g2", "theta_E")


def gaussian_record(mean_vector, cov, truth):
    """Per :data:`DERIVED` parameter: sd and ``z = (mean - truth) / sd`` of the Gaussian
    ``N(mean_vector, cov)`` on the lens vector, carried by the Jacobian."""
    x = torch.as_tensor(mean_vector)
    jac = torch.autograd.functional.jacobian(derived, x).numpy()
    sd = np.sqrt(np.diag(jac @ cov @ jac.T))
    mean = derived(x).numpy()
    true = derived(torch.as_tensor(vector_from_lens(truth))).numpy()
    out = {}
    for k, m, s, t in zip(DERIVED, mean, sd, true):
        err = (m - t + math.pi / 2) % math.pi - math.pi / 2 if k == "phi" else m - t
        out[k] = dict(sd=round(float(s), 5), z=round(float(err / s), 2))
    return out


def laplace(inv, best, truth):
    """The Laplace posterior of the lens at the evidence maximum ``best`` (flat priors on the
    lens vector): the Hessian of the log evidence by central differences (steps
    :data:`LAPLACE_STEPS`, 129 evaluations), inverted and carried to :data:`DERIVED` by their
    Jacobian.  Per parameter: mean (the maximum), sd and ``z = (mean - truth) / sd``; None where
    the Hessian is not negative definite."""
    def f(v):
        return inv.evidence(lens_from_vector(v))["log_evidence"]

    n, h = len(best), LAPLACE_STEPS
    f0 = f(best)
    hess = np.zeros((n, n))
    for i in range(n):
        e_i = np.eye(n)[i] * h[i]
        hess[i, i] = (f(best + e_i) - 2 * f0 + f(best - e_i)) / h[i] ** 2
        for j in range(i):
            e_j = np.eye(n)[j] * h[j]
            hess[i, j] = hess[j, i] = (f(best + e_i + e_j) - f(best + e_i - e_j)
                                       - f(best - e_i + e_j)
                                       + f(best - e_i - e_j)) / (4 * h[i] * h[j])
    if np.any(np.linalg.eigvalsh(-hess) <= 0):
        return None
    return gaussian_record(best, np.linalg.inv(-hess), truth)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--step", type=int, default=4)
    ap.add_argument("--mask-radius", type=float, default=3.2)
    ap.add_argument("--basis", choices=("delaunay", "patch"), default="delaunay",
                    help="the source between the traced centres: barycentric on their Delaunay "
                         "triangulation with neighbour regularisation, or patches (images of "
                         "image-plane discs through the local lens map) with a white prior")
    ap.add_argument("--reach", type=float, default=1.5,
                    help="a patch's image-plane radius in sub-grid steps")
    ap.add_argument("--noise-sigma", type=float, default=0.1)
    ap.add_argument("--max-eval", type=int, default=800)
    ap.add_argument("--line", default=None, metavar="JSONL",
                    help="records with an evidence_max.lens per seed (section 3g): the evidence "
                         "along the line from the truth to that lens")
    ap.add_argument("--start", default=None, metavar="JSON",
                    help="start each search at the MAP lens of a validation/coverage.py record "
                         "file (e.g. the blind VAE fits of section 3j) instead of the truth")
    ap.add_argument("--search", choices=("nelder-mead", "surface"), default="nelder-mead",
                    help="how the maximum is sought: Nelder-Mead (default) or response "
                         "surfaces (4 rounds of 120 lenses, with the curvature; it did worse "
                         "on the lenses tried, docs/validation.md section 3m)")
    ap.add_argument("--offsets", type=int, default=1, choices=(1, 2, 4),
                    help="average the log evidence over this many shifted sub-grids")
    ap.add_argument("--start-line", action="store_true",
                    help="no search: with --start, the evidence along the line from the start "
                         "(t = 0) to the truth (t = 1) and where a parabola through it peaks")
    ap.add_argument("--laplace", action="store_true",
                    help="also the Laplace posterior at each maximum (129 more evaluations)")
    ap.add_argument("--laplace-at", default=None, metavar="JSONL",
                    help="no search: the Laplace posterior at the lens of each seed's record in "
                         "JSONL (this script's output), one line per seed")
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    galaxies = held_out_galaxies(args.cosmos_root, apodise=True)[0]
    starts = {}
    if args.start:
        with open(args.start) as fh:
            starts = {r["seed"]: {k: r["params"][k]["map"] for k in LENS} for r in json.load(fh)}
    done = {}
    if args.laplace_at:
        with open(args.laplace_at) as fh:
            done = {r["seed"]: r for r in map(json.loads, fh)}
    others = {}
    if args.line:
        with open(args.line) as fh:
            for row in map(json.loads, fh):
                others[row["seed"]] = row["evidence_max"]["lens"]
    for seed in args.seeds:
        t0 = time.time()
        obs = simulate_mock(seed, noise_sigma=args.noise_sigma, source="galaxy",
                            galaxies=galaxies)
        truth = {k: float(obs.truth[k]) for k in LENS}
        if args.start and seed not in starts:
            raise SystemExit(f"{args.start} has no record of seed {seed}")
        kw = dict(step=args.step, mask_radius=args.mask_radius, basis=args.basis,
                  reach=args.reach)
        if args.offsets > 1:
            shifts = [(a, b) for a in (args.step // 4, 3 * args.step // 4)
                      for b in (args.step // 4, 3 * args.step // 4)][:args.offsets]
            inv = AveragedInversion(obs, shifts, **kw)
        else:
            inv = AdaptiveInversion(obs, **kw)
        if args.start_line:
            a, b = vector_from_lens(starts[seed]), vector_from_lens(truth)
            ts = np.array(LINE_T)
            values = np.array([inv.evidence(lens_from_vector(a + t * (b - a)))["log_evidence"]
                               for t in ts])
            c2, c1, _ = np.polyfit(ts, values, 2)
            t_peak = float(np.clip(-c1 / (2 * c2), ts[0], ts[-1])) if c2 < 0 else float(
                ts[np.argmax(values)])
            peak = lens_from_vector(a + t_peak * (b - a))
            rec = dict(seed=seed, galaxy=obs.truth["galaxy"], snr=round(obs.truth["snr"], 1),
                       offsets=args.offsets, n_source=inv.n_source,
                       start_error_percent=relative_errors(starts[seed], truth),
                       line={f"{t:g}": round(float(v - values[ts == 1.0][0]), 2)
                             for t, v in zip(ts, values)},
                       t_peak=round(t_peak, 3), error_percent=relative_errors(peak, truth),
                       seconds=round(time.time() - t0, 1))
            print(json.dumps(rec), flush=True)
            continue
        if args.laplace_at:
            if seed not in done:
                raise SystemExit(f"{args.laplace_at} has no record of seed {seed}")
            rec = dict(seed=seed, lens=done[seed]["lens"],
                       error_percent=done[seed]["error_percent"],
                       laplace=laplace(inv, vector_from_lens(done[seed]["lens"]), truth),
                       seconds=round(time.time() - t0, 1))
            print(json.dumps(rec), flush=True)
            continue
        at_truth = inv.evidence(truth)
        rec = dict(seed=seed, galaxy=obs.truth["galaxy"], snr=round(obs.truth["snr"], 1),
                   step=args.step, mask_radius=args.mask_radius, n_source=inv.n_source,
                   n_pixels=int(inv.mask.sum()),
                   at_truth={k: round(v, 2) for k, v in at_truth.items()})
        if seed in others:
            other = vector_from_lens(others[seed])
            start = vector_from_lens(truth)
            rec["line"] = {f"{t:g}": round(inv.evidence(lens_from_vector(
                start + t * (other - start)))["log_evidence"] - at_truth["log_evidence"], 1)
                for t in (-0.5, -0.25, 0.25, 0.5, 0.75, 1.0, 1.25)}
        start = truth
        if args.start:
            start = starts[seed]
            rec["start"] = dict(error_percent=relative_errors(start, truth),
                                log_evidence=round(inv.evidence(start)["log_evidence"], 2))
        cov = None
        if args.search == "surface":
            best, cov, nfev = surface(inv, vector_from_lens(start), seed=seed)
        else:
            best, value, nfev = maximise(inv, vector_from_lens(start), args.max_eval)
        lens = lens_from_vector(best)
        at_max = inv.evidence(lens)
        rec.update(error_percent=relative_errors(lens, truth),
                   at_max={k: round(v, 2) for k, v in at_max.items()},
                   gain=round(at_max["log_evidence"] - at_truth["log_evidence"], 1),
                   reduced_chi2=round(at_max["chi2"] / inv.mask.sum(), 4), evaluations=nfev,
                   seconds=round(time.time() - t0, 1),
                   lens={k: round(v, 5) for k, v in lens.items()})
        if cov is not None:
            rec["surface"] = gaussian_record(best, cov, truth)
        if args.laplace:
            rec["laplace"] = laplace(inv, best, truth)
            rec["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()

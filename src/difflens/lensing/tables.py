"""The SPLE deflection table: building it with scipy (offline) and loading it (runtime).

The table holds the dimensionless deflection of an SPLE with ``r_ein = 1`` on the unit circle of the
lens frame, ``(x', y') = (cos eta, sin eta)``, as the two ratios

    R_0(eta, q, gamma) = alpha_x'(eta) / cos(eta) = q J_0,
    R_1(eta, q, gamma) = alpha_y'(eta) / sin(eta) = q J_1,

where ``J_n`` are the elliptical integrals of Chianese et al. (2019), eqs. (A1)-(A4), written in
Keeton's (2001) form

    J_n = int_0^1 kappa(xi(u)) w(u)^-(n + 1/2) du,   w(u) = 1 - (1 - q^2) u,
    xi(u)^2 = u (x'^2 + y'^2 / w(u)),                kappa(xi) = (3 - gamma)/2 xi^(1 - gamma).

The substitution ``v = u^((3 - gamma)/2)`` removes the integrable singularity at ``u = 0``:

    J_n = int_0^1 (x'^2 + y'^2 / w)^((1 - gamma)/2) w^-(n + 1/2) dv,   u = v^(2/(3 - gamma)),

a bounded integrand that ``scipy.integrate.quad_vec`` integrates to ~1e-13.  At ``gamma = 3`` the
integrand collapses onto ``u = 0`` and ``J_n = 1`` exactly (a point mass of mass ``pi q``).
Both ratios equal 1 at ``q = 1`` and vary smoothly, which is why they, rather than the deflection
itself, are tabulated.

Grid: ``eta`` uniform on [0, pi/2]; ``q`` uniform in ``f = (1 - q)/(1 + q)`` on [0, f(q_min)];
``gamma`` uniform on [1, 3].  The shipped file ``data/spl_table.npz`` is rebuilt with

    python -m difflens.lensing.tables --out data/spl_table.npz

(about two minutes on two CPU cores).
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import atomic_path

#: Default grid: (n_eta, n_q, n_gamma) and the smallest axis ratio covered.
DEFAULT_SHAPE = (97, 69, 55)
DEFAULT_Q_MIN = 0.1
TABLE_ENV_VAR = "DIFFLENS_SPL_TABLE"


def q_to_f(q):
    """Ellipticity coordinate ``f = (1 - q) / (1 + q)`` used to space the table in q."""
    return (1.0 - q) / (1.0 + q)


def unit_circle_ratios(eta, q, gamma, epsrel=1e-13):
    """Integrate ``R_0 = q J_0`` and ``R_1 = q J_1`` on the unit circle with scipy.

    Parameters
    ----------
    eta : array_like
        Polar angles on the unit circle of the lens frame, radians, in [0, pi/2].
    q : float
        Axis ratio, 0 < q <= 1.
    gamma : array_like
        Power-law slopes in [1, 3], same shape as ``eta`` (or broadcastable).
    epsrel : float
        Relative tolerance handed to ``scipy.integrate.quad_vec``.

    Returns
    -------
    r0, r1 : ndarray
        The two dimensionless ratios, shape of ``broadcast(eta, gamma)``.
    """
    from scipy.integrate import quad_vec

    eta, gamma = np.broadcast_arrays(np.asarray(eta, float), np.asarray(gamma, float))
    shape = eta.shape
    eta, gamma = eta.ravel(), gamma.ravel()
    c2, s2 = np.cos(eta) ** 2, np.sin(eta) ** 2
    r0 = np.ones_like(eta)
    r1 = np.ones_like(eta)
    if q == 1.0:
        return r0.reshape(shape), r1.reshape(shape)
    point_mass = gamma >= 3.0
    live = ~point_mass
    c2l, s2l, gl = c2[live], s2[live], gamma[live]
    power = 2.0 / (3.0 - gl)
    e2 = 1.0 - q * q

    def integrand(v):
        u = v ** power
        w = 1.0 - e2 * u
        base = (c2l + s2l / w) ** ((1.0 - gl) / 2.0)
        return np.concatenate([base * w ** -0.5, base * w ** -1.5])

    # The integrand is steepest near v = 1 for small q; forcing break points keeps quad_vec from
    # accepting one coarse panel.
    pts = (0.5, 0.9, 0.99)
    val, _ = quad_vec(integrand, 0.0, 1.0, epsabs=0.0, epsrel=epsrel, points=pts, norm="max",
                      limit=20000)
    n = live.sum()
    r0[live] = q * val[:n]
    r1[live] = q * val[n:]
    r0[point_mass] = q
    r1[point_mass] = q
    return r0.reshape(shape), r1.reshape(shape)


@dataclass(frozen=True)
class SplTableData:
    """Tabulated unit-circle ratios on a regular (eta, f, gamma) grid.

    Attributes
    ----------
    values : ndarray, shape (n_eta, n_q, n_gamma, 2)
        ``R_0`` and ``R_1`` in the last axis.
    q_min : float
        Smallest axis ratio covered (``f`` runs from 0 to ``f(q_min)``).
    """

    values: np.ndarray
    q_min: float

    @property
    def shape(self):
        return self.values.shape[:3]


def build_table(shape=DEFAULT_SHAPE, q_min=DEFAULT_Q_MIN, progress=True) -> SplTableData:
    """Integrate the full table with scipy (one ``quad_vec`` call per q row).

    Parameters
    ----------
    shape : (int, int, int)
        Number of nodes in eta, q and gamma.
    q_min : float
        Smallest axis ratio, 0 < q_min < 1.
    progress : bool
        Show a tqdm progress bar over the q rows.
    """
    n_eta, n_q, n_gamma = shape
    eta = np.linspace(0.0, np.pi / 2, n_eta)
    f = np.linspace(0.0, q_to_f(q_min), n_q)
    q = (1.0 - f) / (1.0 + f)
    gamma = np.linspace(1.0, 3.0, n_gamma)
    ee, gg = np.meshgrid(eta, gamma, indexing="ij")
    values = np.empty((n_eta, n_q, n_gamma, 2))
    rows = range(n_q)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="SPLE table (q rows)")
    for j in rows:
        r0, r1 = unit_circle_ratios(ee, float(q[j]), gg)
        values[:, j, :, 0] = r0
        values[:, j, :, 1] = r1
    return SplTableData(values=values, q_min=float(q_min))


def save_table(table: SplTableData, path) -> None:
    """Write the table atomically (temporary file, then rename) as compressed npz."""
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez_compressed(tmp, values=table.values, q_min=table.q_min)


def _candidate_paths():
    here = Path(__file__).resolve()
    yield here.parent.parent / "data" / "spl_table.npz"          # inside an installed package
    yield here.parents[3] / "data" / "spl_table.npz"              # the repository's data/


def cache_table_path() -> Path:
    """Per-user cache location, used when no shipped table is found."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "difflens" / "spl_table.npz"


def default_table_path() -> Path:
    """Location of the table: ``$DIFFLENS_SPL_TABLE``, the shipped ``data/`` file, or the cache."""
    env = os.environ.get(TABLE_ENV_VAR)
    if env:
        return Path(env)
    for path in _candidate_paths():
        if path.exists():
            return path
    return cache_table_path()


@functools.lru_cache(maxsize=4)
def load_table(path=None) -> SplTableData:
    """Load a table written by :func:`save_table` (cached per path).

    With no ``path`` and no shipped table (e.g. a non-editable install), the table is built once
    with the default grid (about 20 s) and cached in ``~/.cache/difflens``.

    Raises
    ------
    FileNotFoundError
        If an explicitly given file does not exist, with the command that rebuilds it.
    """
    if path is None:
        path = default_table_path()
        if not path.exists() and path == cache_table_path():
            import warnings

            warnings.warn(f"no shipped SPLE table found; building one in {path} (about 20 s)")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_table(build_table(), path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"SPLE deflection table not found at {path}. Rebuild it with "
            f"`python -m difflens.lensing.tables --out {path}` or point ${TABLE_ENV_VAR} at it."
        )
    with np.load(path) as npz:
        return SplTableData(values=np.array(npz["values"], dtype=np.float64),
                            q_min=float(npz["q_min"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the SPLE deflection table with scipy.")
    parser.add_argument("--out", default=str(default_table_path()))
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE),
                        metavar=("N_ETA", "N_Q", "N_GAMMA"))
    parser.add_argument("--q-min", type=float, default=DEFAULT_Q_MIN)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    table = build_table(tuple(args.shape), args.q_min)
    save_table(table, args.out)
    print(f"wrote {args.out} {table.values.shape} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

import numpy as np
import pytest
import torch
from scipy.special import hyp2f1


def tessore_metcalf(x, y, r_ein, q, phi, gamma, x0=0.0, y0=0.0):
    """Independent SPLE reference: Tessore & Metcalf (2015) eq. 13 with scipy's complex hyp2f1.

    b = q r_ein (minor-axis scale), t = gamma - 1, f = (1 - q)/(1 + q); lens frame rotated by phi.
    """
    x, y, r_ein, q, phi, gamma, x0, y0 = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (x, y, r_ein, q, phi, gamma, x0, y0)))
    c, s = np.cos(phi), np.sin(phi)
    xp = c * (x - x0) + s * (y - y0)
    yp = -s * (x - x0) + c * (y - y0)
    t = gamma - 1.0
    b = q * r_ein
    big_r = np.sqrt(q * q * xp * xp + yp * yp)
    ang = np.arctan2(yp, q * xp)
    f = (1.0 - q) / (1.0 + q)
    a = (2.0 * b / (1.0 + q) * (b / big_r) ** (t - 1.0) * np.exp(1j * ang)
         * hyp2f1(1.0, t / 2.0, 2.0 - t / 2.0, -f * np.exp(2j * ang)))
    return c * a.real - s * a.imag, s * a.real + c * a.imag


@pytest.fixture
def tm_reference():
    return tessore_metcalf


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)

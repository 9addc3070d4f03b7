"""float32 and compiled models through a whole fit: MAP with lens light, then HMC."""
import shutil

import numpy as np
import pytest
import torch

from difflens.datasets.observation import Observation
from difflens.fitting import build_model, fit_lens
from difflens.infer.hmc import FlatSites
from difflens.simulate import Simulator
from difflens.sources import Sersic

LENS = dict(r_ein=0.9, q=0.8, phi=0.4, gamma=2.0, x0=0.02, y0=-0.03, g1=0.02, g2=0.01)
LIGHT = dict(amp=0.4, r_e=0.4, n=2.5, q=0.75, phi=0.3, x0=0.02, y0=-0.03)
SRC = dict(amp=1.5, r_e=0.12, n=1.0, q=0.8, phi=0.2, x0=0.05, y0=0.02)


def _observation(npix=28, pixel_scale=0.1, noise=0.03):
    sim = Simulator(npix=npix, pixel_scale=pixel_scale, psf_sigma=0.08, dtype=torch.float64)
    image = sim.image(LENS, Sersic(**SRC), [Sersic(**LIGHT)]).numpy()
    image = image + noise * np.random.default_rng(1).standard_normal(image.shape)
    return Observation(image=image, noise_sigma=noise, pixel_scale=pixel_scale,
                       psf=sim.psf.numpy())


def _potential(model, values=None):
    """The flat layout started at ``values`` (default: prior medians) and its potential."""
    space = FlatSites(model, init_strategy=None if values is None
                      else lambda site: values[site["name"]])
    return space, space.potential(model)


def test_a_float32_fit_with_lens_light_maps_and_samples_in_float32():
    # the VAE decoder's weights follow the model's dtype, so every vector handed to it must
    # too: the MAP's lens-light-conditioned search, its losses and HMC's leapfrog positions
    # once failed here with float64 vectors in a float32 model
    obs = _observation()
    fit = fit_lens(obs, source="vae", lens_light=1, steps=60, restarts=2, samples=8,
                   warmup=8, chains=2, sample_lens_light=False, dtype=torch.float32,
                   progress=False, seed=3)
    assert fit.model.dtype == torch.float32
    sites = fit.map.sample_sites()
    assert all(v.dtype == torch.float32 for v in sites.values() if torch.is_tensor(v))
    for k in ("r_ein", "theta_E", "gamma", "q"):
        draws = fit.posterior.idata.posterior[k].values
        assert draws.shape[:2] == (2, 8) and np.isfinite(draws).all(), k
    # the float32 MAP is a point of the float64 posterior too: the same potential there to the
    # precision float32 carries (~1e-6 relative over a few hundred pixels)
    twin = build_model(obs, source="vae", lens_light=1, dtype=torch.float64)
    s64 = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in sites.items()}
    space64, pot64 = _potential(twin, s64)
    space32, pot32 = _potential(fit.model, sites)
    u64 = pot64(space64.start[None])
    u32 = pot32(space32.start[None])
    assert torch.isfinite(u32).all()
    assert float(u32) == pytest.approx(float(u64), rel=1e-5, abs=1e-2)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_a_compiled_model_has_the_eager_potential_and_gradient():
    obs = _observation(npix=20, pixel_scale=0.14)
    eager = build_model(obs, source="sersic", lens_light=1)
    fast = build_model(obs, source="sersic", lens_light=1, compile=True)
    space, pot_e = _potential(eager)
    _, pot_c = _potential(fast)
    gen = torch.Generator().manual_seed(0)
    u = space.start + 0.05 * torch.randn(3, space.start.numel(), generator=gen,
                                        dtype=space.start.dtype)
    out = []
    for pot in (pot_e, pot_c):
        x = u.clone().requires_grad_(True)
        val = pot(x)
        grad, = torch.autograd.grad(val.sum(), x)
        out.append((val.detach(), grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-8, atol=1e-8)

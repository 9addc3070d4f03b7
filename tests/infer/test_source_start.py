"""The source read off the data: back-projection through the lens equation and the encoder start."""
import math

import pyro
import pytest
import torch
import torch.nn.functional as F

from difflens.infer import fit_map
from difflens.infer.initialise import back_project, source_from_arcs
from difflens.model import LensModel, Priors, q_phi_to_ellipticity
from difflens.simulate import Simulator
from difflens.sources import PixelSource
from difflens.sources.vae import load_default_vae

LENS = dict(r_ein=1.1, q=0.75, phi=0.4, gamma=2.05, x0=0.03, y0=-0.02, g1=0.02, g2=-0.01)
PLACE = dict(x0=0.05, y0=0.08, s=0.6)


@pytest.fixture(scope="module")
def vae():
    return load_default_vae(with_encoder=True).double()


def _sites(lens):
    e1, e2 = q_phi_to_ellipticity(torch.tensor(lens["q"]), torch.tensor(lens["phi"]))
    return {**{k: torch.tensor(v, dtype=torch.float64) for k, v in lens.items()
               if k not in ("q", "phi")}, "e1": e1.double(), "e2": e2.double()}


def _truth_source(vae, seed=3):
    """A typical galaxy: z from the latent distribution without its x9 inflation."""
    torch.manual_seed(seed)
    prior = vae.prior.distribution(dtype=torch.float64)
    narrow = torch.distributions.MultivariateNormal(prior.loc, scale_tril=prior.scale_tril / 3)
    return narrow.sample()


def _model(vae, z, noise_sigma, psf_sigma, seed=0):
    sim = Simulator(npix=80, pixel_scale=0.05, psf_sigma=psf_sigma, dtype=torch.float64)
    source = PixelSource(vae.decode(z), amp=1.0, **PLACE)
    clean = sim.image(LENS, source)
    gen = torch.Generator().manual_seed(seed)
    data = clean + noise_sigma * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    return LensModel(data, noise_sigma, sim, source=vae, priors=Priors.default("vae")), source


def test_back_projection_conserves_surface_brightness(vae):
    """Noise-free, no PSF: each image pixel holds the source at its beta (eq. 1), so each stamp
    pixel's mean lies between the least and greatest value of the true (bilinear) stamp over the
    3 x 3 pixels around it -- wrong geometry (a transposed or mirrored stamp, a wrong scale)
    breaks that bound."""
    z = _truth_source(vae)
    model, source = _model(vae, z, 1e-3, None)
    model.data = model.data.clone()
    model.data.copy_(model.simulator.image(LENS, source))       # exactly noise-free
    truth = vae.decode(z)
    stamp, hits = back_project(model, _sites(LENS), (PLACE["x0"], PLACE["y0"]), PLACE["s"],
                               truth.shape[-1])
    padded = F.pad(truth[None, None], (1, 1, 1, 1))
    hi = F.max_pool2d(padded, 3, stride=1)[0, 0]
    lo = -F.max_pool2d(-padded, 3, stride=1)[0, 0]
    seen = hits > 0
    assert int(seen.sum()) > 300                  # the arcs cover a good part of the stamp
    assert bool((stamp[seen] <= hi[seen] + 1e-9).all() and (stamp[seen] >= lo[seen] - 1e-9).all())
    assert bool((stamp[~seen] == 0).all())
    # the mirrored stamp violates the bound: the test can fail
    flipped = stamp.flip(-1)
    assert not bool((flipped[seen.flip(-1)] <= hi[seen.flip(-1)] + 1e-9).all()
                    and (flipped[seen.flip(-1)] >= lo[seen.flip(-1)] - 1e-9).all())


def test_encoded_source_explains_the_arcs_better_than_the_prior_mean(vae):
    """At the true lens, the source read off the noisy, PSF-blurred arcs (placement + encoder
    latent, amplitude solved) fits the data far better than the latent prior's mean galaxy (the
    MAP's other starts) in the same place: less than half its excess chi^2 over noise, for each
    of four galaxies.  Its half-width is a start, not an estimate: within a factor of 2 of the
    truth for each galaxy and within 30% in the median (measured 1.01-1.73, median 1.16)."""
    ratios = []
    for seed in range(4):
        z = _truth_source(vae, seed)
        model, _ = _model(vae, z, 0.02, 0.05)
        start = source_from_arcs(model, _sites(LENS))
        assert set(start) == {"src_x0", "src_y0", "src_s", "src_amp", "z"}
        ratios.append(float(start["src_s"]) / PLACE["s"])

        def chi2(z_start):
            sim = model.simulator
            with torch.no_grad():
                stamp = model.vae.decode(z_start)
                unit = sim.image(LENS, PixelSource(stamp, x0=start["src_x0"], y0=start["src_y0"],
                                                   s=start["src_s"], amp=1.0))
                amp = (model.data * unit).sum() / (unit * unit).sum()   # exact linear amplitude
                return float((((model.data - amp * unit) / model.noise_sigma) ** 2).mean())

        encoded, mean_galaxy = chi2(start["z"]), chi2(model.z_prior.mean)
        assert encoded - 1 < 0.5 * (mean_galaxy - 1), seed
    ratios = torch.tensor(ratios)
    assert bool((ratios.log().abs() < math.log(2)).all()), ratios
    assert abs(float(ratios.median()) - 1) < 0.3, ratios


def test_fit_map_adds_the_encoded_start_and_keeps_the_best_final(vae):
    z = _truth_source(vae)
    model, _ = _model(vae, z, 0.05, 0.05)
    kw = dict(steps=5, restarts=2, restart_steps=3, polish_steps=0, progress=False)
    pyro.clear_param_store()
    one = fit_map(model, **kw)
    assert len(one.restart_losses) == 3
    assert len(fit_map(model, encode_source=False, **kw).restart_losses) == 2
    # the first of two finals is the single final run: two can only end higher
    two = fit_map(model, finals=2, **kw)
    assert two.log_posterior >= one.log_posterior
    # "all" continues every short run (3 here): the best two among them again
    assert fit_map(model, finals="all", **kw).log_posterior >= two.log_posterior
    for bad in (0, "some", 1.5):
        with pytest.raises(ValueError, match="finals"):
            fit_map(model, finals=bad, **kw)


def test_batched_map_adds_each_lens_its_own_encoded_start(vae):
    """``fit_map_batch`` runs one encoded-source start per lens, read off that lens's own arcs:
    for the first lens its short-run losses are those of ``fit_map`` alone (same seed, same
    starts), and for both lenses the encoded start, after 3 Adam steps, beats the restarts from
    the latent prior's mean galaxy.  Reading lens 2's arcs for lens 1 would break both."""
    from difflens.infer import fit_map_batch

    first, _ = _model(vae, _truth_source(vae, seed=3), 0.05, 0.05, seed=0)
    other, _ = _model(vae, _truth_source(vae, seed=5), 0.05, 0.05, seed=1)
    second = first.with_data(other.data, 0.05)
    kw = dict(steps=5, restarts=2, restart_steps=3, polish_steps=0, progress=False, seed=0)
    batched = fit_map_batch([first, second], **kw)
    alone = fit_map(first, **kw)
    assert batched[0].restart_losses == pytest.approx(alone.restart_losses, rel=1e-6)
    for result in batched:
        assert len(result.restart_losses) == 3
        assert result.restart_losses[-1] < min(result.restart_losses[:2])
    plain = fit_map_batch([first, second], encode_source=False, **kw)
    assert [len(r.restart_losses) for r in plain] == [2, 2]
    # the first of two finals is the single final run (rows are independent): two end higher
    one = fit_map_batch([first, second], finals=1, **kw)
    for a, b in zip(one, batched):
        assert b.log_posterior >= a.log_posterior - 1e-6
    for bad in (0, "some"):
        with pytest.raises(ValueError, match="finals"):
            fit_map_batch([first], finals=bad, **kw)

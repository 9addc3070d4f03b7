"""The pixelated correction of the VAE source (difflens.sources.correction)."""
import math

import pyro
import pytest
import torch

from difflens.infer import fit_map
from difflens.model import LensModel, Priors, q_phi_to_ellipticity
from difflens.simulate import Simulator
from difflens.sources import PixelSource
from difflens.sources.correction import PixelCorrection
from difflens.sources.vae import load_default_vae

LENS = dict(r_ein=1.1, q=0.75, phi=0.4, gamma=2.05, x0=0.03, y0=-0.02, g1=0.02, g2=-0.01)
PLACE = dict(x0=0.05, y0=0.08, s=0.6)


@pytest.fixture(scope="module")
def vae():
    return load_default_vae().double()


def _lens_sites():
    e1, e2 = q_phi_to_ellipticity(torch.tensor(LENS["q"]), torch.tensor(LENS["phi"]))
    out = {k: torch.tensor(v, dtype=torch.float64) for k, v in LENS.items()
           if k not in ("q", "phi")}
    return {**out, "e1": e1.double(), "e2": e2.double()}


def _place_sites(amp=1.0):
    return {"src_" + k: torch.tensor(v, dtype=torch.float64)
            for k, v in {**PLACE, "amp": amp}.items()}


def test_bilinear_correction_is_exact_on_a_linear_ramp():
    """Bilinear interpolation reproduces a linear function exactly: a ramp a + b u + c v sampled
    at the n x n grid's cell centres gives sigma (a + b u + c v) at every 64 x 64 stamp pixel
    centre between the first and last coarse centres (u, v in units of the stamp width)."""
    corr = PixelCorrection(sigma=0.07, pixels=16, flux=1.0)
    n, size = corr.pixels, 64
    coarse = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    fine = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    vv, uu = torch.meshgrid(coarse, coarse, indexing="ij")
    w = (0.3 + 2.0 * uu - 1.5 * vv).reshape(-1)
    img = corr.image(torch.stack([w, -w]), size)              # a batch of two
    fv, fu = torch.meshgrid(fine, fine, indexing="ij")
    truth = 0.07 * (0.3 + 2.0 * fu - 1.5 * fv)
    inner = (fine >= coarse[0]) & (fine <= coarse[-1])
    assert img.shape == (2, size, size)
    assert torch.allclose(img[0][inner][:, inner], truth[inner][:, inner], atol=1e-12)
    assert torch.allclose(img[1], -img[0])
    # rows are y (v), columns x (u): the transposed ramp is not the answer
    assert not torch.allclose(img[0][inner][:, inner], truth.T[inner][:, inner], atol=1e-3)


def test_smoothed_correction_has_unit_variance_and_gaussian_correlation():
    """White w smoothed by a Gaussian of sd s (unit sum of squares): unit variance away from the
    edges, and neighbours correlated as the kernel's autocorrelation, a Gaussian of sd s sqrt(2):
    rho(lag) = exp(-lag^2 / (4 s^2))."""
    s = 1.5
    corr = PixelCorrection(sigma=1.0, pixels=48, flux=1.0, smoothing=s)
    w = torch.randn(3000, corr.size, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    img = corr.image(w, 48)[:, 10:-10, 10:-10]        # no interpolation at 48 -> 48
    assert float(img.var()) == pytest.approx(1.0, abs=0.02)
    for lag in (1, 2, 3):
        rho = float((img[:, :, lag:] * img[:, :, :-lag]).mean() / img.var())
        assert rho == pytest.approx(math.exp(-lag ** 2 / (4 * s ** 2)), abs=0.02)
    with pytest.raises(ValueError, match="smoothing"):
        PixelCorrection(smoothing=-1.0)


def _difference_precision(n, regularisation):
    """``R`` built directly from finite differences on an ``n x n`` grid, zero beyond its edge:
    ``D^T D`` for the first differences (n + 1 per row and column, the edges included) or
    ``L^T L`` for the 5-point Laplacian ``L``."""
    one = torch.zeros(n + 1, n, dtype=torch.float64)          # 1-d forward differences
    for i in range(n + 1):
        if i < n:
            one[i, i] = 1.0
        if i > 0:
            one[i, i - 1] = -1.0
    eye = torch.eye(n, dtype=torch.float64)
    D = torch.cat([torch.kron(one, eye), torch.kron(eye, one)])   # rows (y), then columns (x)
    if regularisation == "gradient":
        return D.T @ D
    second = -one.T @ one                                      # 1-d [1, -2, 1], zero outside
    L = torch.kron(second, eye) + torch.kron(eye, second)
    return L.T @ L


@pytest.mark.parametrize("regularisation", ["gradient", "curvature"])
def test_regularised_grid_has_the_difference_prior(regularisation):
    """The sine synthesis u = T w of white w has covariance T T^T = R^-1, R the gradient or
    curvature regularisation built from explicit finite differences (not from the sine
    transform); so the energy 1/2 u^T R u of a draw is 1/2 |w|^2."""
    n = 7
    corr = PixelCorrection(sigma=0.2, pixels=n, flux=1.0, regularisation=regularisation)
    T = corr.grid(torch.eye(n * n, dtype=torch.float64)).reshape(n * n, n * n).T
    R = _difference_precision(n, regularisation)
    assert torch.allclose(R @ T @ T.T, torch.eye(n * n, dtype=torch.float64), atol=1e-9)
    S, _ = corr.sine_basis(torch.zeros((), dtype=torch.float64))
    assert torch.allclose(S @ S, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # the image is sigma * flux * u (no interpolation at n -> n)
    w = torch.randn(5, n * n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(corr.image(w, n), 0.2 * corr.grid(w))


def test_source_plane_frame_does_not_follow_the_stamp(vae):
    """With ``frame`` the correction is a source of its own, fixed in arcsec: the model's image
    with w minus its image with w = 0 is the grid sampled on the frame, whatever the VAE stamp's
    placement; without a frame it moves with the stamp."""
    sim = Simulator(npix=40, pixel_scale=0.08, psf_sigma=0.1, dtype=torch.float64)
    data = torch.zeros(40, 40, dtype=torch.float64)
    frame = (0.02, -0.05, 0.7)
    priors = Priors.default("vae").with_source_correction(0.05, 8, regularisation="gradient",
                                                          frame=frame)
    model = LensModel(data, 0.1, sim, source=vae, priors=priors)
    torch.manual_seed(2)
    z = vae.prior.distribution(dtype=torch.float64).sample()
    w = torch.randn(64, dtype=torch.float64)
    corr = priors.source_correction
    lens = pyro.poutine.condition(model._profiles, data={**_lens_sites(), **_place_sites(),
                                                         "z": z})()[0]
    expected = sim.image(lens, PixelSource(corr.image(w, 8), x0=frame[0], y0=frame[1],
                                           s=frame[2], amp=1.0))
    assert float(expected.abs().max()) > 1e-3
    for s, amp in ((0.6, 1.0), (1.4, 2.5)):
        values = {**_lens_sites(), **_place_sites(amp=amp), "src_s": torch.tensor(s, dtype=torch.float64),
                  "z": z}

        def image(extra):
            return pyro.poutine.condition(model.predict, data={**values, **extra})().detach()

        zero = torch.zeros(64, dtype=torch.float64)
        delta = image({"src_correction": w}) - image({"src_correction": zero})
        assert torch.allclose(delta, expected, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="frame"):
        PixelCorrection(frame=(0.0, 0.0, -1.0))
    with pytest.raises(ValueError, match="frame"):
        PixelCorrection(frame=(0.0, float("nan"), 1.0))
    with pytest.raises(ValueError, match="regularisation"):
        PixelCorrection(regularisation="laplace")
    with pytest.raises(ValueError, match="not both"):
        PixelCorrection(regularisation="curvature", smoothing=1.0)


def test_bad_correction_settings_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        PixelCorrection(sigma=-0.1)
    with pytest.raises(ValueError, match="pixels"):
        PixelCorrection(pixels=1)
    with pytest.raises(ValueError, match="1024 values"):
        PixelCorrection(pixels=32, flux=1.0).image(torch.zeros(100), 64)
    with pytest.raises(ValueError, match="no flux"):
        PixelCorrection(pixels=32).image(torch.zeros(1024), 64)
    with pytest.raises(ValueError, match="flux"):
        PixelCorrection(flux=0.0)
    sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
    with pytest.raises(ValueError, match="VAE source"):
        LensModel(torch.zeros(16, 16), 0.1, sim, source="sersic",
                  priors=Priors.default("sersic").with_source_correction())


def test_correction_scale_follows_the_amplitude_prior_not_the_fit(vae):
    """The correction's flux is the median of the amplitude prior (log-normal: its exp(loc);
    truncated normal: the median of the truncated law, checked by sampling); a model that
    integrates the amplitude out is refused (the correction is not scaled by it)."""
    p = Priors.default("vae", flux_scale=3.0).with_source_correction(0.1)
    assert p.source_correction.flux == pytest.approx(3.0)
    paper = Priors.paper("vae", flux_scale=2.0)
    draws = paper.source["amp"].sample((200000,))
    flux = paper.with_source_correction(0.1).source_correction.flux
    assert flux == pytest.approx(float(draws.median()), rel=0.01)
    assert Priors.default("vae").with_source_correction(0.1, flux=7.0).source_correction.flux == 7.0
    sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sampled source amplitude"):
        LensModel(torch.zeros(16, 16), 0.1, sim, source=vae,
                  priors=p.with_amplitudes_marginalised())
    model = LensModel(torch.zeros(16, 16), 0.1, sim, source=vae, priors=p)
    with pytest.raises(ValueError, match="src_amp"):
        model.source_stamp(model.latent_start())
    fixed = model.with_fixed({"src_amp": 2.0})                    # a fixed amplitude serves
    assert fixed.source_stamp(fixed.latent_start()).shape == (64, 64)


def test_correction_enters_the_image_linearly(vae):
    """Lensing and the PSF are linear in surface brightness: the model's image with correction
    w minus its image with w = 0 is the image of the correction stamp alone, placed like the
    source but not scaled by its amplitude (1.7 here: the correction is in image units); w = 0
    reproduces the model without a correction."""
    sim = Simulator(npix=40, pixel_scale=0.08, psf_sigma=0.1, dtype=torch.float64)
    data = torch.zeros(40, 40, dtype=torch.float64)
    plain = LensModel(data, 0.1, sim, source=vae, priors=Priors.default("vae"))
    corrected = LensModel(data, 0.1, sim, source=vae,
                          priors=Priors.default("vae").with_source_correction(0.05, 8))
    assert "src_correction" in corrected.site_names()
    assert "src_correction" not in plain.site_names()
    torch.manual_seed(1)
    z = vae.prior.distribution(dtype=torch.float64).sample()
    w = torch.randn(64, dtype=torch.float64)
    values = {**_lens_sites(), **_place_sites(amp=1.7), "z": z}

    def image(model, extra):
        return pyro.poutine.condition(model.predict, data={**values, **extra})().detach()

    zero = image(corrected, {"src_correction": torch.zeros(64, dtype=torch.float64)})
    assert torch.allclose(zero, image(plain, {}), rtol=0, atol=1e-12)
    delta = corrected.priors.source_correction.image(w, 64)
    lens = pyro.poutine.condition(corrected._profiles, data=values)()[0]   # the model's lens
    alone = sim.image(lens, PixelSource(delta, amp=1.0, **PLACE))
    with_w = image(corrected, {"src_correction": w})
    assert float(alone.abs().max()) > 1e-3                    # the correction is visible
    assert torch.allclose(with_w - zero, alone, rtol=0, atol=1e-10)


def test_correction_fits_a_knot_the_vae_cannot_draw(vae):
    """A VAE galaxy plus two compact bright knots (0.03" sigma, peak 1, 0.35" apart) as the
    source, the lens held at the truth: the source fitted with the correction leaves less than
    half the excess chi^2 of the VAE source alone.  (One knot was enough for the first VAE;
    the fine-tuned ones draw a single knot to an excess chi^2 of 0.3-0.4, two to 0.8.)"""
    sim = Simulator(npix=72, pixel_scale=0.05, psf_sigma=0.05, dtype=torch.float64)
    torch.manual_seed(3)
    prior = vae.prior.distribution(dtype=torch.float64)
    z = torch.distributions.MultivariateNormal(prior.loc, scale_tril=prior.scale_tril / 3).sample()
    grid = (torch.arange(64, dtype=torch.float64) + 0.5) / 32 - 1          # stamp units [-1, 1]
    vv, uu = torch.meshgrid(grid, grid, indexing="ij")
    knot = sum(torch.exp(-((uu - x) ** 2 + (vv - y) ** 2) / (2 * 0.05 ** 2))
               for x, y in ((0.2, -0.15), (-0.25, 0.2)))
    truth = PixelSource(vae.decode(z) + knot, amp=1.0, **PLACE)
    noise = 0.02
    gen = torch.Generator().manual_seed(0)
    clean = sim.image(LENS, truth)
    data = clean + noise * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    held = {k: float(v) for k, v in {**_lens_sites(), **_place_sites()}.items()}

    def excess_chi2(priors):
        model = LensModel(data, noise, sim, source=vae, priors=priors).with_fixed(held)
        fit = fit_map(model, init={"z": z}, restarts=1, encode_source=False, steps=300,
                      polish_steps=200, progress=False)
        resid = (data - fit.model_image) / noise
        return float((resid ** 2).mean()) - 1

    without = excess_chi2(Priors.default("vae"))
    with_corr = excess_chi2(Priors.default("vae").with_source_correction(0.1, 32))
    assert without > 0.5                     # the knot is detected: the VAE alone misses it
    assert with_corr < 0.5 * without

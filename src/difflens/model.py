"""The Pyro model of a lens observation: priors (presets), the simulator, the pixel likelihood.

    log p(Theta | I_obs) = log N(I_obs | PSF * I_src(theta - alpha(theta)), sigma^2)
                           + log p(Theta_lens) + log p(Theta_src)          (paper Sec. 5.2, eq. 9)

Lens ellipticity is sampled as components ``(e1, e2) = epsilon (cos 2 phi, sin 2 phi)`` with
``epsilon = (1 - q)/(1 + q)`` (the lenstronomy convention), so the symmetry ``phi -> phi + pi``
creates no second mode.  ``epsilon`` is bounded smoothly below ``(1 - q_min)/(1 + q_min)`` by a tanh
map, so the model is never evaluated at q <= 0 or q < q_min; gamma, r_ein, the source width and
amplitude have priors whose support excludes unphysical values.

The mass normalisation is sampled either as ``r_ein`` (major-axis Einstein radius, the paper's
parameter) or as lenstronomy's ``theta_E = sqrt(q) r_ein`` (:meth:`Priors.with_theta_E`), with
``r_ein`` then derived.  An arc pins ``theta_E``, the circularised Einstein radius, far better
than ``r_ein`` or ``q``: sampled as ``r_ein``, an elliptical lens's posterior lies along the
ridge ``sqrt(q) r_ein = const``; sampled as ``theta_E``, that constraint is one coordinate.

Sources: the VAE decoder (latent ``z`` with the fitted multivariate-normal prior, centre, half-width
``s``, amplitude ``amp``; eq. 17) or an elliptical Sersic profile.  The VAE stamp may carry a
pixelated correction (:meth:`Priors.with_source_correction`, site ``src_correction``) for what the
decoder cannot draw.

Lens light (real data, where it is not subtracted): any number of elliptical Sersic components in
the image plane, added before the PSF.  Their sites are ``light{i}_{amp,r_e,n,e1,e2,x0,y0}``; a
centre given as the string ``"mass"`` is tied to the mass centre (the usual assumption).

Amplitude priors scale with ``flux_scale`` (image units), a typical bright-pixel value of the data,
so the same presets serve normalised mocks (``flux_scale = 1``) and real images in counts/s.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from .instrument import marginal_log_likelihood
from .simulate import Simulator
from .sources import PixelSource, Sersic, SourceSum
from .sources.models import check_interpolation
from .sources.correction import PixelCorrection

Q_MIN = 0.1


class TruncatedNormal(TorchDistribution):
    """Normal(loc, scale) restricted to [low, high] (renormalised).

    Examples
    --------
    >>> import torch
    >>> d = TruncatedNormal(2.0, 0.25, 1.2, 2.8)
    >>> x = d.sample((1000,))
    >>> bool((x >= 1.2).all() and (x <= 2.8).all())
    True
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, low, high, validate_args=None):
        # scalars kept in float64 so the normalising constant is exact in any model dtype
        self.loc, self.scale, self.low, self.high = (torch.as_tensor(v, dtype=torch.float64,
                                                                     device="cpu")
                                                     for v in (loc, scale, low, high))
        if not (self.low < self.high):
            raise ValueError(f"TruncatedNormal needs low < high, got [{low}, {high}]")
        # the support is checked by this distribution (validate_args), not again by its base
        self._base = torch.distributions.Normal(self.loc, self.scale, validate_args=False)
        self._cdf_low = self._base.cdf(self.low)
        self._cdf_high = self._base.cdf(self.high)
        super().__init__(torch.Size(), torch.Size(), validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.interval(self.low, self.high)

    def rsample(self, sample_shape=torch.Size()):
        u = torch.rand(sample_shape, dtype=self.loc.dtype, device=self.loc.device)
        p = self._cdf_low + u * (self._cdf_high - self._cdf_low)
        return self._base.icdf(p.clamp(1e-12, 1 - 1e-12)).clamp(self.low, self.high)

    def log_prob(self, value):
        lp = self._base.log_prob(value.to(torch.float64)) - torch.log(self._cdf_high - self._cdf_low)
        return lp.to(value.dtype)

    @property
    def mean(self):
        """Mean of the truncated normal: ``loc + scale (phi(a) - phi(b)) / Z`` with ``a, b`` the
        standardised bounds, ``phi`` the standard normal density, ``Z = Phi(b) - Phi(a)``."""
        a, b, z = self._standardised()
        return self.loc + self.scale * (self._pdf(a) - self._pdf(b)) / z

    @property
    def variance(self):
        """``scale^2 [1 + (a phi(a) - b phi(b)) / Z - ((phi(a) - phi(b)) / Z)^2]``."""
        a, b, z = self._standardised()
        pa, pb = self._pdf(a), self._pdf(b)
        ta = torch.where(torch.isfinite(a), a * pa, torch.zeros_like(a))
        tb = torch.where(torch.isfinite(b), b * pb, torch.zeros_like(b))
        return self.scale ** 2 * (1.0 + (ta - tb) / z - ((pa - pb) / z) ** 2)

    def _standardised(self):
        return ((self.low - self.loc) / self.scale, (self.high - self.loc) / self.scale,
                self._cdf_high - self._cdf_low)

    @staticmethod
    def _pdf(t):
        return torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class LinearAmplitude:
    """Prior of an amplitude that is integrated out analytically: Normal(mean, sd), image units.

    The predicted image is linear in the amplitudes of the source and of each lens-light
    component, so with Gaussian priors they can be marginalised exactly
    (:func:`difflens.instrument.marginal_log_likelihood`): the sampler never moves them, and
    their posterior given the other parameters is Gaussian, drawn after sampling.  A Gaussian
    allows negative amplitudes; with a broad ``sd`` the prior barely matters.  Set by
    :meth:`Priors.with_amplitudes_marginalised`.

    Examples
    --------
    >>> LinearAmplitude(1.0, 3.0).sd
    3.0
    """

    mean: float
    sd: float

    def __post_init__(self):
        if not (math.isfinite(self.mean) and math.isfinite(self.sd) and self.sd > 0):
            raise ValueError(f"LinearAmplitude needs a finite mean and a finite sd > 0, got "
                             f"mean={self.mean!r}, sd={self.sd!r}")


def ellipticity_to_q_phi(e1, e2, q_min=Q_MIN):
    """Map unconstrained components (e1, e2) to (q, phi), bounding q >= q_min smoothly.

    ``epsilon = eps_max tanh(|e| / eps_max)``, ``q = (1 - epsilon)/(1 + epsilon)``,
    ``phi = atan2(e2, e1)/2`` (radians); for ``|e| << eps_max`` this is lenstronomy's e1, e2.

    Examples
    --------
    >>> import torch
    >>> q, phi = ellipticity_to_q_phi(torch.tensor(0.0), torch.tensor(0.0))
    >>> float(q)                                               # e = 0: a round lens
    1.0
    """
    eps_max = (1.0 - q_min) / (1.0 + q_min)
    e = torch.sqrt(e1 * e1 + e2 * e2 + 1e-30)
    eps = eps_max * torch.tanh(e / eps_max)
    return (1.0 - eps) / (1.0 + eps), 0.5 * torch.atan2(e2, e1)


def unwrap_angle(phi, reference, period=math.pi):
    """Shift position angles by multiples of ``period`` into (reference - period/2,
    reference + period/2]: posterior draws of phi near +-pi/2 must not be split across the
    branch cut of ``atan2`` when summarised (radians).

    Examples
    --------
    >>> [round(float(v), 2) for v in unwrap_angle([1.55, -1.56], 1.56)]   # same ellipse, one branch
    [1.55, 1.58]
    """
    phi = torch.as_tensor(phi)
    return reference + torch.remainder(phi - reference + period / 2, period) - period / 2


def q_phi_to_ellipticity(q, phi, q_min=Q_MIN):
    """Inverse of :func:`ellipticity_to_q_phi` (for initialisation and truths).

    Examples
    --------
    >>> q, phi = ellipticity_to_q_phi(*q_phi_to_ellipticity(0.6, 0.4))
    >>> round(float(q), 6), round(float(phi), 6)
    (0.6, 0.4)
    """
    eps_max = (1.0 - q_min) / (1.0 + q_min)
    q = q if torch.is_tensor(q) else torch.as_tensor(q, dtype=torch.float64)
    phi = phi if torch.is_tensor(phi) else torch.as_tensor(phi, dtype=q.dtype)
    eps = (1.0 - q) / (1.0 + q)
    e = eps_max * torch.atanh(torch.clamp(eps / eps_max, max=1 - 1e-12))
    return e * torch.cos(2 * phi), e * torch.sin(2 * phi)


def _f64(*values):
    """Prior constants: 0-d float64 tensors on the host.  Zero-dimensional CPU tensors combine
    with tensors on any device, so one Priors object serves models on CPU and GPU alike."""
    return [torch.tensor(float(v), dtype=torch.float64, device="cpu") for v in values]


def _normal(loc, scale):
    """Preset priors hold float64 constants, so log densities are exact in any model dtype."""
    return dist.Normal(*_f64(loc, scale))


class Uniform(dist.Uniform):
    """Uniform(low, high) whose log density stays on the device of the value.

    torch's ``Uniform.log_prob`` casts with ``type_as(low)``, which also moves the result to
    ``low``'s device: a batch of GPU values would get a CPU log density.

    Examples
    --------
    >>> import torch
    >>> d = Uniform(*_f64(0.0, 2.0), validate_args=False)
    >>> d.log_prob(torch.tensor([1.0, 3.0]))          # log(1/2) inside, -inf outside
    tensor([-0.6931,    -inf])
    """

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        inside = (self.low <= value) & (self.high > value)
        return torch.log(inside.to(value.dtype)) - torch.log(self.high - self.low)


def _uniform(low, high):
    return Uniform(*_f64(low, high))


def _lognormal(log_median, sigma):
    return dist.LogNormal(*_f64(log_median, sigma))


@dataclass
class Priors:
    """Prior distributions, one per sampled site (Pyro/torch distributions).

    ``lens`` keys: ``r_ein, e1, e2, gamma, x0, y0, g1, g2`` (components e1, e2, see module doc),
    or ``theta_E`` (arcsec, lenstronomy's Einstein radius ``sqrt(q) r_ein``) in place of
    ``r_ein`` (:meth:`with_theta_E`).  A plain number instead of a distribution holds that
    parameter fixed.
    ``source`` keys for the VAE source: ``x0, y0, s, amp``; for a Sersic source:
    ``amp, r_e, n, e1, e2, x0, y0``.  The VAE latent prior comes with the VAE.
    ``source_correction`` (VAE source only): a :class:`~difflens.sources.correction.
    PixelCorrection` added to the decoded stamp (:meth:`with_source_correction`), or None.

    Examples
    --------
    >>> p = Priors.default("sersic", lens_light=1)
    >>> sorted(p.lens), len(p.lens_light)
    (['e1', 'e2', 'g1', 'g2', 'gamma', 'r_ein', 'x0', 'y0'], 1)
    >>> p.lens["gamma"] = 2.0                               # a number holds gamma fixed
    """

    lens: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    name: str = "custom"
    lens_light: list = field(default_factory=list)
    source_correction: PixelCorrection | None = None

    @classmethod
    def default(cls, source="vae", lens_light=0, flux_scale=1.0, centre=(0.0, 0.0)):
        """Physically sensible defaults (arcsec, radians).

        Parameters
        ----------
        source : "vae" or "sersic"
        lens_light : int
            Number of Sersic lens-light components (centred on the mass).
        flux_scale : float
            Typical bright-pixel value of the data (image units); amplitude priors are centred on it.
        centre : (float, float)
            Expected lens centre (arcsec); the mass and source centre priors are Normal around it.
        """
        _check_scale(flux_scale)
        cx, cy = centre
        lens = dict(r_ein=_uniform(0.3, 3.0), e1=_normal(0.0, 0.2),
                    e2=_normal(0.0, 0.2), gamma=TruncatedNormal(2.0, 0.25, 1.2, 2.8),
                    x0=_normal(cx, 0.2), y0=_normal(cy, 0.2),
                    g1=_normal(0.0, 0.05), g2=_normal(0.0, 0.05))
        return cls(lens=lens, source=_source_priors(source, False, flux_scale, centre),
                   name="default", lens_light=lens_light_priors(lens_light, flux_scale))

    @classmethod
    def paper(cls, source="vae", lens_light=0, flux_scale=1.0, centre=(0.0, 0.0)):
        """Chianese et al. (2019) eqs. 14-16, 18-23, made safe: r_ein, gamma, s, amp truncated to
        physical ranges; q and phi replaced by components e1, e2 whose spread matches the paper's
        q ~ N(0.5, 0.5); shear N(0, 1) truncated to ``|g| < 0.5`` per component."""
        _check_scale(flux_scale)
        cx, cy = centre
        lens = dict(r_ein=TruncatedNormal(1.5, 0.5, 0.1, 4.0), e1=_normal(0.0, 0.4),
                    e2=_normal(0.0, 0.4), gamma=TruncatedNormal(2.0, 0.5, 1.05, 2.95),
                    x0=_normal(cx, 0.5), y0=_normal(cy, 0.5),
                    g1=TruncatedNormal(0.0, 1.0, -0.5, 0.5), g2=TruncatedNormal(0.0, 1.0, -0.5, 0.5))
        return cls(lens=lens, source=_source_priors(source, True, flux_scale, centre),
                   name="paper", lens_light=lens_light_priors(lens_light, flux_scale))

    def with_theta_E(self, prior=None) -> "Priors":
        """A copy that samples ``theta_E = sqrt(q) r_ein`` (arcsec) in place of ``r_ein``.

        ``r_ein = theta_E / sqrt(q)`` is then derived (recorded beside ``q`` and ``phi``).  This
        changes the prior (uniform in theta_E is not uniform in r_ein unless q is fixed) and the
        coordinates HMC moves in (module doc); on the real HST lenses it did not make HMC mix
        faster (docs/real_data_studies.md).

        Parameters
        ----------
        prior : distribution or float, optional
            Prior of theta_E (arcsec); default: the same distribution the r_ein prior had.

        Examples
        --------
        >>> p = Priors.default("sersic").with_theta_E()
        >>> "theta_E" in p.lens, "r_ein" in p.lens
        (True, False)
        """
        if "r_ein" not in self.lens:
            raise ValueError("with_theta_E needs priors with an 'r_ein' entry (got lens keys "
                             f"{sorted(self.lens)})")
        lens = {("theta_E" if k == "r_ein" else k): (v if k != "r_ein" or prior is None
                                                     else prior)
                for k, v in self.lens.items()}
        return replace(self, lens=lens, lens_light=[dict(c) for c in self.lens_light],
                       source=dict(self.source))

    def with_amplitudes_marginalised(self) -> "Priors":
        """A copy in which every sampled amplitude (source ``amp``, lens-light ``amp``) is
        integrated out analytically instead of sampled (:class:`LinearAmplitude`).

        Each amplitude prior is replaced by the normal distribution with its mean and standard
        deviation (moment matching: for the default log-normal ``amp ~ LogNormal(log f, 1.5)``
        that is N(3.1 f, (9.2 f)^2)), which makes the marginal likelihood exact.  Amplitudes
        held fixed (numbers) stay fixed.  The sampler then moves only the non-linear
        parameters; the amplitude and the source's size ``s`` and latent ``z`` were the slowest
        directions of HMC on the real lenses (docs/real_data_studies.md).

        Examples
        --------
        >>> p = Priors.default("sersic", lens_light=1).with_amplitudes_marginalised()
        >>> type(p.source["amp"]).__name__, type(p.lens_light[0]["amp"]).__name__
        ('LinearAmplitude', 'LinearAmplitude')
        """
        def gaussian(prior):
            if isinstance(prior, (int, float, LinearAmplitude)):
                return prior
            return LinearAmplitude(float(prior.mean), float(prior.stddev))

        source = dict(self.source)
        if "amp" in source:
            source["amp"] = gaussian(source["amp"])
        light = [{k: (gaussian(v) if k == "amp" else v) for k, v in c.items()}
                 for c in self.lens_light]
        return replace(self, lens=dict(self.lens), source=source, lens_light=light)

    def with_source_correction(self, sigma=0.1, pixels=64, flux=None, smoothing=0.0,
                               regularisation="identity", frame=None) -> "Priors":
        """A copy whose VAE source carries a pixelated correction ``sigma * flux * B[w]``,
        ``w ~ N(0, I)`` on a ``pixels x pixels`` grid (:mod:`difflens.sources.correction`).

        ``sigma`` is a fraction of ``flux`` (image units), by default (None) the median of the
        source amplitude prior: the typical peak surface brightness of the source.
        ``smoothing`` (grid pixels) correlates neighbouring values, ``regularisation``
        (``"gradient"``, ``"curvature"``) gives the grid a Suyu et al. (2006) prior and
        ``frame`` (``(x0, y0, half_width)``, arcsec) fixes it on the source plane
        (:class:`PixelCorrection`).
        The correction's scale does not follow the fitted amplitude.  Experimental
        (docs/fitting.md): compare modes by :func:`difflens.infer.evidence.correction_evidence`;
        blind fits with it beat the VAE alone on validation mocks but stay biased by ~2-3%
        (docs/validation.md, 3d).

        Examples
        --------
        >>> p = Priors.default("vae", flux_scale=3.0).with_source_correction(sigma=0.05, pixels=32)
        >>> p.source_correction.size, round(p.source_correction.flux, 6)
        (1024, 3.0)
        """
        if flux is None:
            flux = _median_amplitude(self.source.get("amp"))
        return replace(self, lens=dict(self.lens), source=dict(self.source),
                       lens_light=[dict(c) for c in self.lens_light],
                       source_correction=PixelCorrection(
                           sigma=sigma, pixels=pixels, flux=float(flux), smoothing=smoothing,
                           regularisation=regularisation, frame=frame))

    @classmethod
    def preset(cls, name: str, source="vae", **kwargs):
        """``Priors.default(source, **kwargs)`` or ``Priors.paper(source, **kwargs)``."""
        if name not in ("default", "paper"):
            raise ValueError(f"unknown prior preset {name!r}; use 'default' or 'paper'")
        return getattr(cls, name)(source, **kwargs)


def _median_amplitude(prior) -> float:
    """The median of a source-amplitude prior (image units): the scale of a source correction."""
    if isinstance(prior, (int, float)):
        return float(prior)
    if isinstance(prior, dist.LogNormal):
        return math.exp(float(prior.loc))
    if isinstance(prior, TruncatedNormal):
        unit = dist.Normal(0.0, 1.0)
        a, b = (unit.cdf(torch.as_tensor((x - prior.loc) / prior.scale, dtype=torch.float64))
                for x in (prior.low, prior.high))
        return float(prior.loc + prior.scale * unit.icdf(0.5 * (a + b)))
    raise ValueError("give the source correction's flux (image units): the source amplitude "
                     f"prior {prior!r} has no median to take it from")


def _check_scale(flux_scale):
    if not (isinstance(flux_scale, (int, float)) and math.isfinite(flux_scale) and flux_scale > 0):
        raise ValueError(f"flux_scale must be a positive number (image units), got {flux_scale!r}")


def _source_priors(source, paper, flux_scale=1.0, centre=(0.0, 0.0)):
    f = float(flux_scale)
    cx, cy = centre
    if source == "vae":
        if paper:
            # eq. 15 s ~ N(5, 1) read as half-width s/3 arcsec: the paper's mocks fill the central
            # third of the 10.24" field; eq. 16 iota ~ N(1, 0.5) truncated to be positive.
            return dict(x0=_normal(cx, 0.1), y0=_normal(cy, 0.1),
                        s=TruncatedNormal(5.0 / 3.0, 1.0 / 3.0, 0.2, 4.0),
                        amp=TruncatedNormal(f, 0.5 * f, 0.01 * f, 5.0 * f))
        return dict(x0=_normal(cx, 0.2), y0=_normal(cy, 0.2),
                    s=_lognormal(math.log(1.0), 0.6), amp=_lognormal(math.log(f), 1.5))
    if source == "sersic":
        return dict(amp=_lognormal(math.log(f), 1.5), r_e=_lognormal(math.log(0.3), 0.8),
                    n=_uniform(0.5, 6.0), e1=_normal(0.0, 0.2), e2=_normal(0.0, 0.2),
                    x0=_normal(cx, 0.2), y0=_normal(cy, 0.2))
    raise ValueError(f"source must be 'vae' or 'sersic', got {source!r}")


def lens_light_priors(n_components: int, flux_scale=1.0) -> list:
    """Priors of ``n_components`` elliptical Sersic lens-light components centred on the mass.

    Component i has a prior half-light radius around ``0.5 * 3**i`` arcsec (a compact bulge, then
    more extended ones) and amplitude (surface brightness at r_e) around ``0.1 * flux_scale``;
    both log-normal and broad.  Replace ``"mass"`` centres with distributions to free them.

    Examples
    --------
    >>> light = lens_light_priors(2, flux_scale=10.0)
    >>> len(light), sorted(light[0]), light[0]["x0"]
    (2, ['amp', 'e1', 'e2', 'n', 'r_e', 'x0', 'y0'], 'mass')
    """
    if not (isinstance(n_components, int) and n_components >= 0):
        raise ValueError(f"lens_light must be a number of components >= 0, got {n_components!r}")
    return [dict(amp=_lognormal(math.log(0.1 * flux_scale), 2.5),
                 r_e=_lognormal(math.log(0.5 * 3.0 ** i), 1.0), n=_uniform(0.5, 8.0),
                 e1=_normal(0.0, 0.25), e2=_normal(0.0, 0.25), x0="mass", y0="mass")
            for i in range(n_components)]


def lens_from_sites(values: dict) -> dict:
    """The eight simulator lens parameters from sampled site values (e1, e2 -> q, phi;
    theta_E -> r_ein = theta_E / sqrt(q) where theta_E is sampled).

    Examples
    --------
    >>> import torch
    >>> sites = dict(r_ein=1.2, e1=torch.tensor(0.0), e2=torch.tensor(0.0), gamma=2.0, x0=0.0,
    ...              y0=0.0, g1=0.0, g2=0.0)
    >>> float(lens_from_sites(sites)["q"])
    1.0
    """
    q, phi = ellipticity_to_q_phi(values["e1"], values["e2"])
    if ("r_ein" in values) == ("theta_E" in values):
        raise ValueError("the lens needs exactly one of 'r_ein' and 'theta_E', got "
                         f"{sorted(values)}")
    r_ein = values["r_ein"] if "r_ein" in values else values["theta_E"] / torch.sqrt(q)
    return dict(r_ein=r_ein, q=q, phi=phi, gamma=values["gamma"], x0=values["x0"],
                y0=values["y0"], g1=values["g1"], g2=values["g2"])


class LensModel:
    """Callable Pyro model of one observation.

    Parameters
    ----------
    data : Tensor (ny, nx)
        Observed image.
    noise_sigma : float or Tensor (ny, nx)
        Pixel noise (scalar or noise map), image units, > 0.
    simulator : Simulator
        Grid and PSF matching ``data``.
    source : "sersic" or VAESource
        Source model.
    priors : Priors, optional
        Default: ``Priors.default`` for that source.
    mask : Tensor (ny, nx) of bool, optional
        True where pixels enter the likelihood.
    source_interpolation : "bilinear" or "cubic"
        How the VAE stamp is read between its pixel centres
        (:func:`difflens.sources.image.sample_image`).  Bilinear is the paper's; cubic gives
        the likelihood a continuous gradient, which lets HMC take far longer steps on bright
        arcs (docs/fitting.md).

    Examples
    --------
    >>> import torch
    >>> from difflens.simulate import Simulator
    >>> sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
    >>> model = LensModel(torch.zeros(16, 16), 0.1, sim, source="sersic")
    >>> model.n_pixels, model.lens_sites[:3]
    (256, ('r_ein', 'e1', 'e2'))
    """

    def __init__(self, data, noise_sigma, simulator: Simulator, source="sersic", priors=None,
                 mask=None, source_interpolation="bilinear"):
        dtype, device = simulator.x.dtype, simulator.x.device
        check_interpolation(source_interpolation)
        self.source_interpolation = source_interpolation
        self.simulator = simulator
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        self.data, self.noise_sigma, self.mask = self._checked(
            torch.as_tensor(data, dtype=dtype, device=device),
            torch.as_tensor(noise_sigma, dtype=dtype, device=device), mask)
        self.source_kind = "sersic" if isinstance(source, str) and source == "sersic" else "vae"
        if self.source_kind == "vae":
            if isinstance(source, str):
                raise ValueError(f"source must be 'sersic' or a VAESource, got {source!r}")
            # a private copy in the grid's dtype/device: the caller's VAE is left untouched
            self.vae = copy.deepcopy(source).to(dtype=dtype, device=device)
            base = source.prior.distribution(dtype=dtype, device=device)
            self.z_prior = dist.MultivariateNormal(base.loc, scale_tril=base.scale_tril)
        self.priors = priors or Priors.default(self.source_kind)
        if self.priors.source_correction is not None and self.source_kind != "vae":
            raise ValueError("a source correction (Priors.with_source_correction) needs the VAE "
                             "source; this model's source is a Sersic profile")
        if (self.priors.source_correction is not None
                and isinstance(self.priors.source.get("amp"), LinearAmplitude)):
            raise ValueError("a source correction needs a sampled source amplitude: its image is "
                             "not scaled by the amplitude, so the amplitude cannot be "
                             "integrated out (Priors.with_amplitudes_marginalised)")
        self.n_pixels = int(self.mask.sum()) if self.mask is not None else self.data.numel()

    @classmethod
    def stack(cls, models, repeat=1) -> "LensModel":
        """One model over a batch of observations, for batched likelihoods (many lenses at once).

        The result's ``data`` has shape ``(N, ny, nx)`` with ``N = len(models) * repeat``
        (each observation repeated ``repeat`` times in a row, e.g. for restarts), and so do its
        noise and mask.  Conditioned on site values with a leading batch of ``N`` (as
        :func:`difflens.infer.hmc.batched_potential` does), observation ``n`` meets parameter set
        ``n``: the log likelihood has shape ``(N,)``.  Only for batched evaluation; the
        per-observation helpers (``initialise``, ``summarise_map``) take the single models.

        Parameters
        ----------
        models : list of LensModel
            Same grid, PSF, source and the same ``Priors`` object: only data, noise and mask
            differ (build them with :meth:`with_data`).
        repeat : int

        Examples
        --------
        >>> import torch
        >>> from difflens.simulate import Simulator
        >>> sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
        >>> a = LensModel(torch.zeros(16, 16), 0.1, sim)
        >>> b = a.with_data(torch.ones(16, 16), 0.2)
        >>> LensModel.stack([a, b], repeat=3).data.shape
        torch.Size([6, 16, 16])
        """
        models = list(models)
        if not models or repeat < 1:
            raise ValueError("stack needs at least one model and repeat >= 1")
        first = models[0]
        for m in models[1:]:
            a, b = m.simulator, first.simulator
            if a is not b and (a.npix != b.npix or a.pixel_scale != b.pixel_scale
                               or a.supersample != b.supersample or a.psf.shape != b.psf.shape
                               or not torch.equal(a.psf, b.psf)):
                raise ValueError("stacked models must share the pixel grid and the PSF")
            if m.priors is not first.priors or m.source_kind != first.source_kind or (
                    m.source_kind == "vae" and m.vae is not first.vae) or (
                    m.source_interpolation != first.source_interpolation):
                raise ValueError("stacked models must share one Priors object and one source "
                                 "(build them with LensModel.with_data)")
            if (m.mask is None) != (first.mask is None):
                raise ValueError("either all stacked models have a mask or none has")
        out = copy.copy(first)

        def batch(values):
            return torch.stack(values).repeat_interleave(repeat, dim=0)

        out.data = batch([m.data for m in models])
        out.noise_sigma = batch([m.noise_sigma.expand_as(m.data) for m in models])
        out.mask = batch([m.mask for m in models]) if first.mask is not None else None
        return out

    def with_data(self, data, noise_sigma, mask=None) -> "LensModel":
        """The same model (grid, PSF, source network, priors -- shared, not copied) for another
        observation: ``data`` (ny, nx), ``noise_sigma`` (scalar or (ny, nx)), optional ``mask``.
        Cheap, so thousands of lenses can share one VAE decoder.

        Examples
        --------
        >>> import torch
        >>> from difflens.simulate import Simulator
        >>> sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
        >>> a = LensModel(torch.zeros(16, 16), 0.1, sim)
        >>> b = a.with_data(torch.ones(16, 16), 0.05)
        >>> b.simulator is a.simulator, b.priors is a.priors, float(b.noise_sigma)
        (True, True, 0.05)
        """
        fresh = copy.copy(self)
        dtype, device = self.simulator.x.dtype, self.simulator.x.device
        data = torch.as_tensor(data, dtype=dtype, device=device)
        sigma = torch.as_tensor(noise_sigma, dtype=dtype, device=device)
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        fresh.data, fresh.noise_sigma, fresh.mask = self._checked(data, sigma, mask)
        fresh.n_pixels = int(fresh.mask.sum()) if fresh.mask is not None else data.numel()
        return fresh

    def with_fixed(self, values: dict) -> "LensModel":
        """The same model with the scalar sites in ``values`` held fixed at those values (site
        names as sampled: ``r_ein``, ``src_s``, ``light0_n``, ...; the latent ``z`` cannot be
        fixed).  Shares everything but the priors.

        Used to sample lens and source with the lens light held at its MAP
        (:func:`difflens.fitting.fit_lens` with ``sample_lens_light=False``): a Sersic index the
        data push against its prior bound makes the posterior too skewed for a Laplace-whitened
        HMC.

        Examples
        --------
        >>> import torch
        >>> from difflens.simulate import Simulator
        >>> sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
        >>> m = LensModel(torch.zeros(16, 16), 0.1, sim).with_fixed({"g1": 0.0, "g2": 0.01})
        >>> m.fixed_values()
        {'g1': 0.0, 'g2': 0.01}
        """
        self.check_site_names(values, "with_fixed")
        for k, v in values.items():
            size = v.numel() if torch.is_tensor(v) else torch.as_tensor(v, device="cpu").numel()
            if size != 1:
                raise ValueError(f"only scalar sites can be fixed; {k!r} has {size} values")
        fix = {k: float(v) for k, v in values.items()}
        lens = {k: fix.get(k, d) for k, d in self.priors.lens.items()}
        source = {k: fix.get("src_" + k, d) for k, d in self.priors.source.items()}
        light = [{k: fix.get(f"light{i}_{k}", d) for k, d in comp.items()}
                 for i, comp in enumerate(self.priors.lens_light)]
        fresh = copy.copy(self)
        fresh.priors = replace(self.priors, lens=lens, source=source, lens_light=light)
        return fresh

    def _checked(self, data, sigma, mask):
        """Validate one observation (ny, nx) against the grid: shapes, finite data, positive
        noise (:meth:`Simulator.check_observation`)."""
        if data.ndim != 2:
            raise ValueError(f"data must be one image (ny, nx), got shape {tuple(data.shape)}; "
                             "use LensModel.stack for several")
        return self.simulator.check_observation(data, sigma, mask)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live (that of its simulator's grid)."""
        return self.simulator.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.simulator.x.dtype

    def tensor(self, value) -> torch.Tensor:
        """``value`` as a tensor in the model's dtype, on its device."""
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)

    @property
    def lens_sites(self):
        return tuple(self.priors.lens)

    @property
    def derived_sites(self):
        """Lens parameters computed from the sampled ones and recorded as deterministic sites:
        ``q, phi`` (from e1, e2) and ``r_ein`` where theta_E is sampled."""
        return self._derived_lens_sites + self.linear_sites

    @property
    def _derived_lens_sites(self):
        return ("q", "phi") + (("r_ein",) if "theta_E" in self.priors.lens else ())

    @property
    def linear_sites(self):
        """Amplitudes integrated out analytically (:class:`LinearAmplitude` priors), in the
        order of :meth:`Simulator.component_images`: ``src_amp``, ``light0_amp``, ...  Recorded
        as deterministic sites at their conditional mean."""
        return tuple(k for k, _ in self._amplitude_priors() if isinstance(_, LinearAmplitude))

    def _amplitude_priors(self):
        """(site name, prior) of each profile's amplitude, in component-image order."""
        return [("src_amp", self.priors.source.get("amp"))] + [
            (f"light{i}_amp", c.get("amp")) for i, c in enumerate(self.priors.lens_light)]

    def _sample(self, name, prior):
        """A sample site; a constant when the prior is a plain number (a fixed parameter), and 1
        for an amplitude integrated out (the profile then is a unit template)."""
        dtype, device = self.simulator.x.dtype, self.simulator.x.device
        if isinstance(prior, (int, float)):
            return torch.tensor(float(prior), dtype=dtype, device=device)
        if isinstance(prior, LinearAmplitude):
            return torch.ones((), dtype=dtype, device=device)
        return pyro.sample(name, prior).to(dtype=dtype, device=device)

    def all_priors(self) -> dict:
        """Every prior by site name (lens, ``src_*``, ``light{i}_*``), numbers for fixed ones and
        ``"mass"`` for centres tied to the mass."""
        out = dict(self.priors.lens)
        out.update({"src_" + k: v for k, v in self.priors.source.items()})
        for i, comp in enumerate(self.priors.lens_light):
            out.update({f"light{i}_{k}": v for k, v in comp.items()})
        return out

    def site_names(self, include_fixed=False) -> set:
        """Names of the sampled sites (with the latent ``z`` of a VAE source); with
        ``include_fixed`` also the parameters held fixed.  Amplitudes integrated out and centres
        tied to the mass are not sites."""
        names = {k for k, v in self.all_priors().items()
                 if not isinstance(v, (str, LinearAmplitude))
                 and (include_fixed or not isinstance(v, (int, float)))}
        return names | set(self.latent_start())

    def latent_start(self) -> dict:
        """Prior means of the source's vector sites, where fits start them: the latent ``z``
        (VAE source) and ``src_correction`` (zeros: no correction) when the model has them."""
        if self.source_kind != "vae":
            return {}
        out = {"z": self.z_prior.mean.clone()}
        if self.priors.source_correction is not None:
            out["src_correction"] = self.z_prior.mean.new_zeros(self.priors.source_correction.size)
        return out

    def source_stamp(self, values: dict) -> torch.Tensor:
        """The VAE source stamp of site ``values`` (latent ``z`` and, when the model has one,
        ``src_correction`` and the amplitude ``src_amp``; leading batch allowed):
        ``(..., 64, 64)``, stamp units -- the source amplitude not applied, so the correction
        (fixed in image units) enters divided by it.  A correction fixed on the source plane
        (``PixelCorrection(frame=...)``) is not on the stamp: :meth:`correction_source`."""
        stamp = self.vae.decode(values["z"])
        correction = self.priors.source_correction
        if correction is not None and correction.frame is None:
            amp = values.get("src_amp", self.priors.source["amp"])     # sampled, or fixed
            if not isinstance(amp, (int, float)) and not torch.is_tensor(amp):
                raise ValueError("source_stamp with a correction needs the source amplitude "
                                 "'src_amp' among the values")
            amp = torch.as_tensor(amp, dtype=stamp.dtype, device=stamp.device)
            stamp = stamp + (correction.image(values["src_correction"], stamp.shape[-1])
                             / amp[..., None, None])
        return stamp

    def correction_source(self, w: torch.Tensor, stamp=None) -> PixelSource:
        """The source correction of whitened values ``w`` ``(..., n^2)`` alone, as a source
        (amplitude 1, image units): on its source-plane frame (``PixelCorrection(frame=...)``),
        or on the VAE stamp placed as ``stamp`` (a :class:`PixelSource`) otherwise."""
        corr = self.priors.source_correction
        if corr is None:
            raise ValueError("the model has no source correction")
        if corr.frame is not None:
            x0, y0, half_width = corr.frame
            return PixelSource(corr.image(w, corr.pixels), x0=x0, y0=y0, s=half_width, amp=1.0)
        if stamp is None:
            raise ValueError("a correction on the VAE stamp needs the stamp's placement")
        return PixelSource(corr.image(w, stamp.image.shape[-1]), x0=stamp.x0, y0=stamp.y0,
                           s=stamp.s, amp=1.0)

    def check_site_names(self, names, role: str):
        """Raise a ValueError naming any of ``names`` that is not a site of this model (sampled
        or fixed; the latent ``z`` of a VAE source counts); ``role`` says who asked (e.g.
        ``"hold"``)."""
        known = self.site_names(include_fixed=True)
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"{role} names {unknown}, each not a site of this model "
                             f"(sites: {sorted(known)})")

    def fixed_values(self) -> dict:
        """Parameters held fixed (priors given as numbers), by site name."""
        return {k: float(v) for k, v in self.all_priors().items() if isinstance(v, (int, float))}

    def sample_lens_light(self, lens: dict) -> list:
        """Sample the lens-light sites; return Sersic profiles for the simulator."""
        lights = []
        for i, comp in enumerate(self.priors.lens_light):
            p = {k: lens[k] if isinstance(d, str) and d == "mass" else
                 self._sample(f"light{i}_{k}", d) for k, d in comp.items()}
            q, phi = ellipticity_to_q_phi(p["e1"], p["e2"])
            lights.append(Sersic(amp=p["amp"], r_e=p["r_e"], n=p["n"], q=q, phi=phi,
                                 x0=p["x0"], y0=p["y0"], label=f"lens light {i}"))
        return lights

    def sample_source(self):
        """Sample the source sites; return a source callable for the simulator."""
        p = {k: self._sample("src_" + k, d) for k, d in self.priors.source.items()}
        if self.source_kind == "vae":
            values = {"z": pyro.sample("z", self.z_prior)}
            correction = self.priors.source_correction
            if correction is not None:
                values["src_correction"] = pyro.sample("src_correction",
                                                       correction.prior(values["z"]))
            stamp = PixelSource(self.source_stamp({**values, "src_amp": p["amp"]}), x0=p["x0"],
                                y0=p["y0"], s=p["s"], amp=p["amp"],
                                interpolation=self.source_interpolation)
            if correction is None or correction.frame is None:
                return stamp
            return SourceSum((stamp, self.correction_source(values["src_correction"])))
        q, phi = ellipticity_to_q_phi(p["e1"], p["e2"])
        return Sersic(amp=p["amp"], r_e=p["r_e"], n=p["n"], q=q, phi=phi, x0=p["x0"], y0=p["y0"])

    def lens_light_image(self, values: dict):
        """The PSF-convolved lens light alone, for site ``values`` (e.g. the MAP); amplitudes
        integrated out are set to their conditional mean given ``values``."""
        if not self.priors.lens_light:
            return None
        with torch.no_grad():
            lens, source, lights = pyro.poutine.condition(self._profiles, data=values)()
            solved = {}
            if self.linear_sites:
                parts = self.simulator.component_images(lens, source, lights)
                mean = self._linear_solve(parts)[1]
                solved = dict(zip(self.linear_sites, mean.unbind(-1)))
                parts = parts[..., 1:, :, :]            # the source comes first
            else:
                parts = self.simulator.component_images(None, None, lights)
            scale = torch.stack([torch.as_tensor(solved.get(f"light{i}_amp", 1.0),
                                                 dtype=parts.dtype, device=parts.device)
                                 for i in range(len(lights))])
            return (scale[..., None, None] * parts).sum(-3)

    def amplitude_posterior(self, values: dict):
        """Mean ``(..., K)`` and covariance ``(..., K, K)`` of the amplitudes integrated out
        (:attr:`linear_sites`, image units) given the other sites' ``values`` (leading batch
        allowed): the Gaussian they follow in the posterior at those values."""
        if not self.linear_sites:
            raise ValueError("this model integrates out no amplitudes "
                             "(Priors.with_amplitudes_marginalised)")
        with torch.no_grad():
            lens, source, lights = pyro.poutine.condition(self._profiles, data=values)()
            parts = self.simulator.component_images(lens, source, lights)
            _, mean, cov, _ = self._linear_solve(parts)
        return mean, cov

    def _profiles(self):
        """Sample every site; return the simulator's lens dict, the source and the lens-light
        profiles (unit amplitude where it is integrated out)."""
        sites = {k: self._sample(k, d) for k, d in self.priors.lens.items()}
        lens = lens_from_sites(sites)
        for k in self._derived_lens_sites:
            pyro.deterministic(k, lens[k])
        return lens, self.sample_source(), self.sample_lens_light(lens)

    def _linear_solve(self, parts):
        """Split the component images ``parts`` (:meth:`Simulator.component_images`) into the
        part with fixed or sampled amplitudes and the unit templates of the amplitudes integrated
        out; return (log evidence, mean, cov, image at the mean)."""
        amps = self._amplitude_priors()
        linear = [k for k, (_, p) in enumerate(amps) if isinstance(p, LinearAmplitude)]
        rest = [k for k in range(parts.shape[-3]) if k not in linear]
        fixed = parts[..., rest, :, :].sum(-3)
        templates = parts[..., linear, :, :]
        log_evidence, mean, cov = marginal_log_likelihood(
            templates, self.data - fixed, self.noise_sigma, *self._linear_prior(), self.mask)
        image = fixed + (mean[..., None, None] * templates).sum(-3)
        return log_evidence, mean, cov, image

    def _linear_prior(self):
        """Prior means and sds (float64, on the data's device) of the amplitudes integrated out,
        made once per ``Priors`` object rather than copied to the device on every call."""
        cached = getattr(self, "_linear_prior_cache", None)
        if cached is None or cached[0] is not self.priors:
            priors = [p for _, p in self._amplitude_priors() if isinstance(p, LinearAmplitude)]
            kw = dict(dtype=torch.float64, device=self.data.device)
            cached = (self.priors, torch.tensor([p.mean for p in priors], **kw),
                      torch.tensor([p.sd for p in priors], **kw))
            self._linear_prior_cache = cached
        return cached[1:]

    def predict(self):
        """Sample all parameters and return the predicted image (no likelihood); amplitudes
        integrated out are at their conditional mean (and recorded as deterministic sites)."""
        lens, source, lights = self._profiles()
        if not self.linear_sites:
            return self.simulator.image(lens, source, lights)
        return self._marginal(lens, source, lights)[1]

    def _marginal(self, lens, source, lights):
        log_evidence, mean, _, image = self._linear_solve(
            self.simulator.component_images(lens, source, lights))
        for k, name in enumerate(self.linear_sites):
            pyro.deterministic(name, mean[..., k])
        return log_evidence, image

    def __call__(self):
        if self.linear_sites:
            # p(d | theta) with the amplitudes integrated out: a factor, not an observed site
            log_evidence, image = self._marginal(*self._profiles())
            pyro.deterministic("model_image", image)
            pyro.factor("obs", log_evidence)
            return
        image = self.predict()
        pyro.deterministic("model_image", image)
        likelihood = dist.Normal(image, self.noise_sigma.expand_as(image))
        if self.mask is not None:
            likelihood = likelihood.mask(self.mask)
        pyro.sample("obs", likelihood.to_event(2), obs=self.data)

"""The VAE source model (Chianese et al. 2019, Sec. 2, Appendix D, Tables D1 and D2).

Encoder (Table D1) and decoder (Table D2) of 64x64 galaxy stamps with a 64-d latent space; the
decoder's mean ``mu_d(z)`` (tanh output) is the source stamp of a lens fit.  ``width`` scales the
channel counts (1.0 = the paper); the decoder likelihood is N(x | mu_d(z), sigma_d = 1/50).

The latent prior used in lens fitting is a multivariate normal fitted to the encoded means of the
training set with its covariance multiplied by 9 (Sec. 2.1): :class:`LatentPrior`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_path

LATENT_DIM = 64
SIGMA_D = 1.0 / 50.0


@dataclass(frozen=True)
class VAEConfig:
    """Architecture settings.  ``width = 1`` reproduces Tables D1/D2 exactly.

    Examples
    --------
    >>> VAEConfig().latent_dim, VAEConfig(width=0.5).channels(64)
    (64, 32)
    """

    latent_dim: int = LATENT_DIM
    width: float = 1.0
    sigma_d: float = SIGMA_D

    def channels(self, c: int) -> int:
        return max(4, int(round(c * self.width)))


class Encoder(nn.Module):
    """Table D1: 64x64 image -> (mu_e, sigma_e), each of size ``latent_dim``.

    Examples
    --------
    >>> import torch
    >>> mu, log_sigma = Encoder(VAEConfig(width=0.125))(torch.zeros(2, 64, 64))
    >>> mu.shape
    torch.Size([2, 64])
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        c = cfg.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c(64), 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
            nn.Conv2d(c(64), c(128), 4, 2, 1, bias=False), nn.BatchNorm2d(c(128)), nn.LeakyReLU(0.2),
            nn.Conv2d(c(128), c(256), 4, 2, 1, bias=False), nn.BatchNorm2d(c(256)),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c(256), c(512), 4, 2, 1, bias=False), nn.BatchNorm2d(c(512)),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c(512), c(4096), 4, 1, 0, bias=False), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.mu = nn.Linear(c(4096), cfg.latent_dim)
        self.log_sigma = nn.Linear(c(4096), cfg.latent_dim)
        # start from sigma_e = 1 and small means: with the sharp sigma_d = 1/50 likelihood, a
        # randomly initialised log-sigma head makes the KL term overflow in the first steps
        nn.init.zeros_(self.log_sigma.weight)
        nn.init.zeros_(self.log_sigma.bias)
        with torch.no_grad():
            self.mu.weight.mul_(0.1)

    def forward(self, x: torch.Tensor):
        """x: (B, 64, 64) or (B, 1, 64, 64) -> mu_e, sigma_e of shape (B, latent_dim)."""
        h = self.features(x.reshape(-1, 1, 64, 64))
        return self.mu(h), torch.exp(self.log_sigma(h))


class Decoder(nn.Module):
    """Table D2: latent z (B, latent_dim) -> mean image mu_d (B, 64, 64) in (-1, 1).

    Examples
    --------
    >>> import torch
    >>> Decoder(VAEConfig(width=0.125))(torch.zeros(2, 64)).shape
    torch.Size([2, 64, 64])
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        c = cfg.channels
        self.latent_dim = cfg.latent_dim
        self.net = nn.Sequential(
            nn.ConvTranspose2d(cfg.latent_dim, c(512), 4, 1, 0, bias=False),
            nn.BatchNorm2d(c(512)), nn.ReLU(),
            nn.ConvTranspose2d(c(512), c(256), 4, 2, 1, bias=False), nn.BatchNorm2d(c(256)),
            nn.ReLU(),
            nn.ConvTranspose2d(c(256), c(128), 4, 2, 1, bias=False), nn.BatchNorm2d(c(128)),
            nn.ReLU(),
            nn.ConvTranspose2d(c(128), c(64), 4, 2, 1, bias=False), nn.BatchNorm2d(c(64)),
            nn.ReLU(),
            nn.ConvTranspose2d(c(64), 1, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        out = self.net(z.reshape(-1, self.latent_dim, 1, 1))
        return out.reshape(*lead, 64, 64)


class LatentPrior(nn.Module):
    """Multivariate normal prior on the latent z (Sec. 2.1), fitted to encoded training means.

    Parameters
    ----------
    mean : Tensor (D,)
    covariance : Tensor (D, D)
        Already scaled (the paper multiplies the empirical covariance by 9).

    Examples
    --------
    >>> import torch
    >>> prior = LatentPrior(torch.zeros(2), torch.eye(2))
    >>> prior.distribution().sample((5,)).shape
    torch.Size([5, 2])
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("covariance", covariance.clone())
        self.register_buffer("scale_tril", torch.linalg.cholesky(covariance))

    @classmethod
    def fit(cls, latent_means: torch.Tensor, scale: float = 9.0, jitter: float = 1e-6):
        """Mean and ``scale`` x covariance of ``latent_means`` (N, D), with a small diagonal jitter
        so the Cholesky factor exists even for degenerate samples."""
        if latent_means.ndim != 2 or latent_means.shape[0] < 2:
            raise ValueError("latent_means must have shape (N >= 2, D)")
        if not scale > 0:
            raise ValueError(f"prior covariance scale must be positive, got {scale}")
        x = latent_means.to(torch.float64)
        mean = x.mean(0)
        cov = torch.cov(x.T) * scale
        cov = cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
        return cls(mean.float(), cov.float())

    def distribution(self, dtype=None, device=None):
        """The prior as a ``torch.distributions.MultivariateNormal`` (dtype/device as asked)."""
        m = self.mean.to(dtype=dtype, device=device)
        L = self.scale_tril.to(dtype=dtype, device=device)
        return torch.distributions.MultivariateNormal(m, scale_tril=L)


class VAESource(nn.Module):
    """A trained decoder and its latent prior: the source model of a lens fit.

    Use :func:`load_default_vae` to get the shipped one.  ``decode(z)`` gives 64x64 stamps that
    :class:`difflens.sources.PixelSource` places in the source plane (eq. 17).

    Examples
    --------
    >>> vae = load_default_vae()                                 # doctest: +SKIP
    >>> z = vae.prior.distribution().sample()                    # doctest: +SKIP
    >>> vae.decode(z).shape                                      # doctest: +SKIP
    torch.Size([64, 64])
    """

    def __init__(self, decoder: Decoder, prior: LatentPrior, config: VAEConfig,
                 encoder: Encoder | None = None, card: dict | None = None):
        super().__init__()
        self.decoder = decoder.eval()
        self.prior = prior
        self.config = config
        self.encoder = encoder.eval() if encoder is not None else None
        self.card = card or {}
        for p in self.parameters():
            p.requires_grad_(False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean stamps ``mu_d(z)``: z (..., D) -> (..., 64, 64), dimensionless in (-1, 1)."""
        if z.shape[-1] != self.config.latent_dim:
            raise ValueError(f"z must have {self.config.latent_dim} components in its last axis, "
                             f"got shape {tuple(z.shape)}")
        return self.decoder(z)

    def encode(self, x: torch.Tensor):
        """Encoder means and sigmas for stamps x (B, 64, 64)."""
        if self.encoder is None:
            raise RuntimeError("this VAE was loaded without its encoder")
        return self.encoder(x)

    def save(self, decoder_path, encoder_path=None):
        """Write the decoder + prior (+ card) and, optionally, the encoder in float16."""
        payload = dict(config=asdict(self.config), decoder=self.decoder.state_dict(),
                       prior_mean=self.prior.mean, prior_covariance=self.prior.covariance,
                       card=self.card)
        _atomic_save(payload, decoder_path)
        if encoder_path is not None and self.encoder is not None:
            half = {k: v.half() if v.is_floating_point() else v
                    for k, v in self.encoder.state_dict().items()}
            _atomic_save(dict(config=asdict(self.config), encoder=half), encoder_path)


def _atomic_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_vae(decoder_path, encoder_path=None, map_location="cpu") -> VAESource:
    """Load a VAE written by :meth:`VAESource.save`.

    Raises
    ------
    FileNotFoundError
        If a weights file is missing.

    Examples
    --------
    >>> vae = load_vae("data/vae_decoder.pt", "data/vae_encoder.pt")    # doctest: +SKIP
    """
    decoder_path = Path(decoder_path)
    if not decoder_path.exists():
        raise FileNotFoundError(f"VAE decoder weights not found: {decoder_path}")
    payload = torch.load(decoder_path, map_location=map_location, weights_only=False)
    cfg = VAEConfig(**payload["config"])
    dec = Decoder(cfg)
    dec.load_state_dict(payload["decoder"])
    prior = LatentPrior(payload["prior_mean"], payload["prior_covariance"])
    enc = None
    if encoder_path is not None:
        encoder_path = Path(encoder_path)
        if not encoder_path.exists():
            raise FileNotFoundError(f"VAE encoder weights not found: {encoder_path}")
        ep = torch.load(encoder_path, map_location=map_location, weights_only=False)
        enc = Encoder(cfg)
        enc.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in ep["encoder"].items()})
    return VAESource(dec, prior, cfg, enc, payload.get("card"))


def load_vae_dir(folder, with_encoder: bool = True, map_location="cpu") -> VAESource:
    """Load the ``vae_decoder.pt`` (and ``vae_encoder.pt``) that one folder holds.

    The layout written by ``difflens train-vae --out DIR`` and shipped in ``data/``.

    Parameters
    ----------
    folder : str or Path
        Folder with ``vae_decoder.pt`` and, when ``with_encoder``, ``vae_encoder.pt``.
    with_encoder : bool
        Also load the encoder (needed to fine-tune and for encoded starts).

    Raises
    ------
    FileNotFoundError
        If the folder or a weights file in it is missing (the message names the file).

    Examples
    --------
    >>> vae = load_vae_dir("data")                     # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE weights folder not found: {folder}")
    return load_vae(folder / "vae_decoder.pt",
                    folder / "vae_encoder.pt" if with_encoder else None, map_location)


def default_vae_paths():
    """Paths of the shipped weights: ``data/vae_decoder.pt`` and ``data/vae_encoder.pt``.

    Examples
    --------
    >>> decoder, encoder = default_vae_paths()
    >>> decoder.name, encoder.name
    ('vae_decoder.pt', 'vae_encoder.pt')
    """
    here = Path(__file__).resolve()
    for root in (here.parent.parent / "data", here.parents[3] / "data"):
        if (root / "vae_decoder.pt").exists():
            return root / "vae_decoder.pt", root / "vae_encoder.pt"
    return here.parents[3] / "data" / "vae_decoder.pt", here.parents[3] / "data" / "vae_encoder.pt"


def load_default_vae(with_encoder: bool = False) -> VAESource:
    """The shipped VAE source model (decoder + latent prior; encoder on request).

    See ``data/README.md`` for what it was trained on and how to retrain it.

    Examples
    --------
    >>> vae = load_default_vae()                      # doctest: +SKIP
    >>> stamps = vae.decode(vae.prior.distribution().sample((4,)))   # doctest: +SKIP
    """
    dec, enc = default_vae_paths()
    return load_vae(dec, enc if with_encoder else None)

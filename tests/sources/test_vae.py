import numpy as np
import pytest
import torch

from difflens.sources.vae import (Decoder, Encoder, LatentPrior, VAEConfig,
                                  default_vae_paths, load_default_vae, load_vae,
                                  load_vae_dir, VAESource)
from difflens.sources.vae_training import TrainConfig, dihedral_augment, train_vae


def test_architecture_shapes_and_paper_parameter_count():
    enc, dec = Encoder(), Decoder()
    mu, sigma = enc(torch.rand(3, 64, 64))
    assert mu.shape == sigma.shape == (3, 64) and (sigma > 0).all()
    out = dec(torch.randn(2, 5, 64))
    assert out.shape == (2, 5, 64, 64) and out.abs().max() < 1
    # Table D2: transposed convolutions without bias + BatchNorm scale/shift
    conv = 16 * (64 * 512 + 512 * 256 + 256 * 128 + 128 * 64 + 64 * 1)
    bn = 2 * (512 + 256 + 128 + 64)
    assert sum(p.numel() for p in dec.parameters()) == conv + bn
    # Table D1: the 4x4 convolution to 4096 channels dominates the encoder
    conv_e = 16 * (1 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512 * 4096)
    lin = 2 * (4096 * 64 + 64)
    assert sum(p.numel() for p in enc.parameters()) == conv_e + lin + 2 * (128 + 256 + 512)


def test_prior_fit_recovers_known_gaussian():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    mean = torch.linspace(-1, 2, 6, dtype=torch.float64)
    samples = torch.distributions.MultivariateNormal(mean, cov).sample((200_000,))
    p1 = LatentPrior.fit(samples, scale=1.0, jitter=0.0)
    torch.testing.assert_close(p1.mean.double(), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(p1.covariance.double(), cov, atol=0.05, rtol=0.02)
    p9 = LatentPrior.fit(samples, scale=9.0, jitter=0.0)
    torch.testing.assert_close(p9.covariance, 9 * p1.covariance)
    with pytest.raises(ValueError, match="scale"):
        LatentPrior.fit(samples, scale=-1.0)


def test_dihedral_augment():
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    aug = dihedral_augment(x)
    assert aug.shape == (16, 4, 4)
    assert len({a.tobytes() for a in aug}) == 16     # all eight symmetries are distinct here
    np.testing.assert_array_equal(aug[2:4], x[:, :, ::-1])              # reflection
    np.testing.assert_array_equal(aug[4:6], np.rot90(x, 1, axes=(1, 2)))  # 90 degrees


def test_load_vae_dir_reads_the_train_vae_layout(tmp_path):
    """A folder as written by ``train-vae --out``: the same decoder and encoder come back;
    a missing folder or file is named in the error."""
    torch.manual_seed(3)
    cfg = VAEConfig(width=0.125)
    vae = VAESource(Decoder(cfg).eval(), LatentPrior(torch.randn(64), 2 * torch.eye(64)), cfg,
                    Encoder(cfg).eval(), {"note": "tiny"})
    vae.save(tmp_path / "vae_decoder.pt", tmp_path / "vae_encoder.pt")
    back = load_vae_dir(tmp_path)
    z = torch.randn(3, 64)
    torch.testing.assert_close(back.decode(z), vae.decode(z))
    torch.testing.assert_close(back.prior.mean, vae.prior.mean)
    x = torch.rand(2, 64, 64)
    # the encoder is stored in half precision
    torch.testing.assert_close(back.encoder(x)[0], vae.encoder(x)[0], atol=2e-2, rtol=2e-2)
    assert load_vae_dir(tmp_path, with_encoder=False).encoder is None
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_vae_dir(tmp_path / "elsewhere")
    (tmp_path / "vae_encoder.pt").unlink()
    with pytest.raises(FileNotFoundError, match="encoder weights not found"):
        load_vae_dir(tmp_path)


def blobs(n, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] - 31.5
    out = []
    for _ in range(n):
        cx, cy = rng.normal(0, 4, 2)
        w = rng.uniform(3, 8)
        out.append(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w * w)))
    return np.asarray(out, dtype=np.float32)


def test_short_training_improves_elbo_and_round_trips(tmp_path):
    train, val = blobs(96, 0), blobs(32, 1)
    cfg = VAEConfig(width=0.125)
    vae = train_vae(train, val, tmp_path / "w", cfg,
                    TrainConfig(lr=2e-3, batch_size=16, max_epochs=4, patience=10), progress=False)
    hist = __import__("json").loads((tmp_path / "w" / "history.json").read_text())
    assert hist[-1]["val_elbo"] > hist[0]["val_elbo"] + 1000.0
    vae.save(tmp_path / "dec.pt", tmp_path / "enc.pt")
    again = load_vae(tmp_path / "dec.pt", tmp_path / "enc.pt")
    z = torch.randn(3, 64)
    torch.testing.assert_close(again.decode(z), vae.decode(z))
    torch.testing.assert_close(again.decode(z), again.decode(z))   # eval mode: deterministic
    mu, _ = again.encode(torch.as_tensor(val[:2]))
    ref, _ = vae.encode(torch.as_tensor(val[:2]))
    torch.testing.assert_close(mu, ref, atol=2e-2, rtol=2e-2)     # encoder stored in float16
    with pytest.raises(ValueError, match="last axis"):
        again.decode(torch.randn(3, 10))
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="shape"):
        train_vae(train[:, :32, :32], val, tmp_path / "w2", cfg, progress=False)

    # fine-tuning from these weights starts where the first run ended, not from scratch
    tuned = train_vae(train, val, tmp_path / "ft", cfg,
                      TrainConfig(lr=2e-4, batch_size=16, max_epochs=1, patience=10),
                      progress=False, init=again)
    first = __import__("json").loads((tmp_path / "ft" / "history.json").read_text())[0]
    assert first["val_elbo"] > hist[0]["val_elbo"] + 0.8 * (hist[-1]["val_elbo"]
                                                            - hist[0]["val_elbo"])
    assert tuned.card["initialised_from"]["epochs"] == 4
    with pytest.raises(ValueError, match="architecture"):
        train_vae(train, val, tmp_path / "ft2", VAEConfig(width=0.25), progress=False, init=again)
    again.card = dict(real_train=["cat:1", "cat:2"], real_val=["cat:3"])
    with pytest.raises(ValueError, match=r"held-out.*cat:3"):
        train_vae(train, val, tmp_path / "ft4", cfg, progress=False, init=again,
                  card=dict(real_test_held_out=["cat:3", "cat:9"]))
    with pytest.raises(ValueError, match="encoder"):
        train_vae(train, val, tmp_path / "ft3", cfg, progress=False,
                  init=load_vae(tmp_path / "dec.pt"))


@pytest.mark.skipif(not default_vae_paths()[0].exists(), reason="shipped VAE weights not built")
def test_shipped_weights_decode_deterministically():
    vae = load_default_vae()
    z = vae.prior.distribution().sample((4,))
    a, b = vae.decode(z), vae.decode(z)
    assert a.shape == (4, 64, 64)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()

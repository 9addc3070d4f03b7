"""Figures of the shipped VAE source model (paper Figs. 2 and 3) and draws from its latent prior.

    python examples/vae_figures.py [--cosmos-root ../shared/data/hst_galaxy_stamps] [--out docs/figures]

1. vae_reconstructions.png: held-out real COSMOS galaxies (never trained on; listed in the model
   card) next to their reconstructions mu_d(mu_e(x)) and the residuals in units of each stamp's noise.
2. vae_rotation.png: a held-out galaxy rotated by 0..315 degrees, the reconstructions, and the
   reconstructions rotated back (the paper's rotation-equivariance check).
3. vae_prior_draws.png: decodes of z drawn from the latent prior (covariance x 9, as used in fits).
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from difflens.datasets.cosmos import Selection, load_cosmos  # noqa: E402
from difflens.sources.vae import load_default_vae  # noqa: E402


def rotate(img, degrees):
    """Rotate a (64, 64) stamp about its centre by bilinear resampling."""
    a = np.deg2rad(degrees)
    theta = torch.tensor([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0]],
                         dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 1, 64, 64), align_corners=False)
    return F.grid_sample(torch.as_tensor(img)[None, None], grid, align_corners=False)[0, 0]


def border_noise(img, width=6):
    """Pixel noise measured in a stamp's outer ``width`` pixels: 1.4826 x the median absolute
    deviation (robust to the galaxy's faint wings).  The catalogue's NOISE_VARIANCE propagated
    through the downscaling treats HST's correlated noise as white, so it can be far off."""
    frame = np.ones(img.shape, dtype=bool)
    frame[width:-width, width:-width] = False
    v = img[frame]
    return 1.4826 * float(np.median(np.abs(v - np.median(v))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cosmos-root", default="../shared/data/hst_galaxy_stamps")
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_default_vae(with_encoder=True)
    held_out = set(vae.card.get("real_test_held_out", []))
    stamps = load_cosmos(args.cosmos_root, Selection(snr_range=None), verbose=False)
    test = stamps.subset(np.array([i in held_out for i in stamps.ident]))
    x = torch.as_tensor(test.images)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x)[0])
    chi2 = (((x - recon) / torch.as_tensor(test.noise_sigma)[:, None, None]) ** 2).mean((1, 2))
    n = len(test)
    fig, axes = plt.subplots(3, n, figsize=(2.1 * n, 6.6), squeeze=False)
    for i in range(n):
        vmax = float(x[i].max())
        axes[0, i].imshow(x[i], origin="lower", vmin=0, vmax=vmax, cmap="magma")
        axes[1, i].imshow(recon[i], origin="lower", vmin=0, vmax=vmax, cmap="magma")
        axes[2, i].imshow((x[i] - recon[i]) / test.noise_sigma[i], origin="lower", vmin=-4,
                          vmax=4, cmap="coolwarm")
        axes[0, i].set_title(test.ident[i].split(":")[-1], fontsize=8)
        axes[2, i].set_title(rf"$\chi^2$/pix {chi2[i]:.2f}", fontsize=8)
    for a, label in zip(axes[:, 0], ("held-out galaxy", "reconstruction", r"residual / $\sigma$")):
        a.set_ylabel(label)
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "vae_reconstructions.png", dpi=80)
    print(f"held-out reconstruction chi^2 per pixel: {chi2.numpy().round(2)}, "
          f"mean {float(chi2.mean()):.2f}")
    measured = torch.tensor([border_noise(im) for im in test.images])
    chi2_measured = (((x - recon) / measured[:, None, None]) ** 2).mean((1, 2))
    quarter = x.reshape(n, 16, 4, 16, 4).mean((2, 4)).amax((1, 2))
    snr = quarter / (measured / 4)                   # the paper's max(I_1/4) / sigma_1/4
    print("noise: catalogue", np.round(test.noise_sigma, 4), "measured", measured.numpy().round(4))
    print(f"with the measured noise: chi^2 per pixel {chi2_measured.numpy().round(2)}, "
          f"median {float(chi2_measured.median()):.2f}; S/N {snr.numpy().round(0)}")
    window = (snr > 15) & (snr < 50)
    if bool(window.any()):
        print(f"inside the paper's 15 < S/N < 50: {int(window.sum())} galaxies, chi^2 per pixel "
              f"mean {float(chi2_measured[window].mean()):.2f}")

    angles = list(range(0, 360, 45))
    g = test.images[int(np.argmax(test.images.reshape(n, -1).std(1)))]
    rows = [[], [], []]
    with torch.no_grad():
        for a in angles:
            r = rotate(g, a)
            rec = vae.decode(vae.encode(r[None])[0])[0]
            rows[0].append(r)
            rows[1].append(rec)
            rows[2].append(rotate(rec.numpy(), -a))
    fig, axes = plt.subplots(3, len(angles), figsize=(2 * len(angles), 6.2))
    for j, a in enumerate(angles):
        for i in range(3):
            axes[i, j].imshow(rows[i][j], origin="lower", cmap="magma", vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[0, j].set_title(f"{a} deg", fontsize=9)
    for a, label in zip(axes[:, 0], ("rotated input", "reconstruction", "rotated back")):
        a.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(out / "vae_rotation.png", dpi=80)

    torch.manual_seed(0)
    z = vae.prior.distribution().sample((16,))
    with torch.no_grad():
        draws = vae.decode(z)
    fig, axes = plt.subplots(2, 8, figsize=(16, 4.2))
    for a, d in zip(axes.flat, draws):
        a.imshow(d, origin="lower", cmap="magma")
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("decodes of z drawn from the latent prior (covariance x 9)")
    fig.tight_layout()
    fig.savefig(out / "vae_prior_draws.png", dpi=70)
    print(f"wrote {out}/vae_reconstructions.png, vae_rotation.png, vae_prior_draws.png")


if __name__ == "__main__":
    main()

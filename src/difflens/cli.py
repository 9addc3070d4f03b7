"""Command line: ``difflens <command>`` (also ``python -m difflens``).

Thin by design: parse arguments, call the public API, write files.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_lens_figure(args):
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    from .plots import plot_lens_system
    from .simulate import Simulator
    from .sources import Sersic

    sim = Simulator(npix=args.npix, pixel_scale=args.pixel_scale, psf_sigma=args.psf_sigma)
    lens = dict(r_ein=args.r_ein, q=args.q, phi=args.phi, gamma=args.gamma, x0=0.0, y0=0.0,
                g1=args.g1, g2=args.g2)
    source = Sersic(amp=1.0, r_e=0.25, n=1.5, q=0.8, phi=1.0, x0=0.1, y0=0.05)
    fig = plot_lens_system(sim, lens, source, source_extent=1.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def _cmd_train_vae(args):
    import json
    from pathlib import Path

    from .datasets.cosmos import Selection
    from .sources.vae import VAEConfig
    from .sources.vae_training import (TrainConfig, prepare_training_data, reconstruction_chi2,
                                       train_vae)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sel = Selection(min_size=args.min_size,
                    snr_range=None if args.no_snr_cut else (args.snr_min, args.snr_max))
    data = prepare_training_data(args.cosmos_root, n_synthetic=args.n_synthetic, selection=sel,
                                 seed=args.seed, workdir=args.workdir, real_repeat=args.real_repeat,
                                 pad_small_from=args.pad_small_from)
    print(f"training stamps {len(data['train'])}, validation stamps {len(data['val'])}, "
          f"held-out real test galaxies {len(data['test'])}")
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.max_epochs,
                      patience=args.patience, max_minutes=args.max_minutes, seed=args.seed,
                      prior_scale=args.prior_scale, device=args.device)
    init = None
    if args.init_from is not None:
        from .sources.vae import load_vae_dir

        init = load_vae_dir(args.init_from)
    vae = train_vae(data["train"], data["val"], args.workdir, VAEConfig(width=args.width), cfg,
                    card=data["card"], init=init)
    if len(data["test"]):
        chi2 = reconstruction_chi2(vae, data["test"])
        vae.card["test_chi2_per_pixel"] = [round(float(c), 3) for c in chi2]
        vae.card["test_chi2_per_pixel_mean"] = round(float(chi2.mean()), 3)
    out = Path(args.out)
    vae.save(out / "vae_decoder.pt", out / "vae_encoder.pt")
    (out / "vae_card.json").write_text(json.dumps(vae.card, indent=1, default=str))
    print(json.dumps({k: v for k, v in vae.card.items() if not k.startswith("real_")},
                     indent=1, default=str))


def _cmd_simulate(args):
    from .datasets.mocks import simulate_mock
    from .datasets.observation import write_observation

    obs = simulate_mock(args.seed, noise_sigma=args.noise_sigma, npix=args.npix,
                        pixel_scale=args.pixel_scale, psf_sigma=args.psf_sigma,
                        source=args.source)
    write_observation(obs, args.out)
    t = obs.truth
    print(f"wrote {args.out}: {args.npix}x{args.npix} at {args.pixel_scale}\"/px, S/N {t['snr']:.0f}; "
          + ", ".join(f"{k}={t[k]:.4f}" for k in ("r_ein", "q", "phi", "gamma", "x0", "y0",
                                                    "g1", "g2")))


def _correction(args):
    """``--source-correction SIGMA --correction-pixels N --correction-smoothing S
    --correction-regularisation R --correction-frame X0 Y0 H`` as fit_lens's
    ``source_correction``."""
    if args.source_correction is None:
        return None
    from .sources.correction import PixelCorrection

    return PixelCorrection(sigma=args.source_correction, pixels=args.correction_pixels,
                           smoothing=args.correction_smoothing,
                           regularisation=args.correction_regularisation,
                           frame=None if args.correction_frame is None
                           else tuple(args.correction_frame))


def _ladder(text):
    """``--tempering``: a number of levels K, or comma-separated inverse temperatures."""
    try:
        return [float(b) for b in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of levels or inverse temperatures like 1,0.8,0.6, got {text!r}")


def _cmd_fit(args):
    import torch

    from .datasets.observation import read_observation
    from .fitting import fit_lens

    if args.noise_sigma is None and args.noise_map is None and \
            not str(args.obs).lower().endswith((".h5", ".hdf5")):
        raise ValueError("give --noise-sigma S or --noise-map F")
    if args.noise_sigma is not None and not args.noise_sigma > 0:
        raise ValueError(f"--noise-sigma must be positive, got {args.noise_sigma}")
    obs = read_observation(args.obs, noise_sigma=args.noise_sigma, noise_map=args.noise_map,
                           psf=args.psf, mask=args.mask, exclude=args.exclude,
                           pixel_scale=args.pixel_scale)
    if args.cutout:
        obs = obs.cutout(args.cutout)
    fit = fit_lens(obs, source=args.source, priors=args.priors, psf_sigma=args.psf_sigma,
                   lens_light=len(args.lens_light or ()), supersample=args.supersample,
                   steps=args.steps, restarts=args.restarts, finals=args.finals,
                   encode_source=not args.no_source_start, samples=args.samples,
                   warmup=args.warmup, chains=args.chains, sampler=args.sampler,
                   sample_lens_light=not args.hold_lens_light, hold=args.hold or (),
                   seed=args.seed, init=args.init_from, checkpoint=args.checkpoint,
                   pilot=args.pilot, pilot_flow=args.pilot_flow, tempering=args.tempering,
                   source_interpolation=args.source_interpolation,
                   marginalise_amplitudes=args.marginalise_amplitudes,
                   source_correction=_correction(args), device=args.device,
                   dtype=torch.float32 if args.float32 else torch.float64,
                   compile=args.compile)
    fit.save(args.out, coolest=args.coolest)
    print(fit.table())
    print(f"\nwrote {args.out}/summary.json, fit.png" +
          (", posterior.nc, corner.png, trace.png" if args.samples else "") +
          (", coolest.json (+ FITS)" if args.coolest else ""))


def _cmd_demo(args):
    import time
    from pathlib import Path

    from .datasets.mocks import simulate_mock
    from .datasets.observation import write_observation
    from .fitting import fit_lens

    out = Path(args.out)
    t0 = time.perf_counter()
    print("difflens demo (QUICK settings: fewer MAP steps and posterior draws than a science run; "
          "see `difflens fit --help`)")
    obs = simulate_mock(args.seed, noise_sigma=0.1, source="vae")
    out.mkdir(parents=True, exist_ok=True)
    write_observation(obs, out / "mock.fits")
    print(f"simulated a 256x256 mock with the shipped VAE source, S/N {obs.truth['snr']:.0f} "
          f"-> {out / 'mock.fits'}")
    fit = fit_lens(obs, source="vae", steps=args.steps, restarts=args.restarts,
                   samples=args.samples, warmup=args.warmup, chains=args.chains,
                   sampler=args.sampler, max_tree_depth=args.max_tree_depth, seed=args.seed,
                   device=args.device)
    fit.save(out)
    print(fit.table())
    print(f"\nwrote {out}/summary.json, fit.png, posterior.nc, corner.png, trace.png "
          f"in {time.perf_counter() - t0:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lens-figure", help="plot a lensed Sersic source with critical curves")
    p.add_argument("--out", default="lens_system.png")
    p.add_argument("--npix", type=int, default=256)
    p.add_argument("--pixel-scale", type=float, default=0.04, help="arcsec per pixel")
    p.add_argument("--psf-sigma", type=float, default=0.05, help="arcsec")
    for name, default in (("r-ein", 1.2), ("q", 0.75), ("phi", 0.5), ("gamma", 2.1),
                          ("g1", 0.03), ("g2", -0.02)):
        p.add_argument(f"--{name}", type=float, default=default)
    p.set_defaults(func=_cmd_lens_figure)

    p = sub.add_parser("simulate", help="write a mock lens observation (FITS)")
    p.add_argument("--out", required=True, help="output FITS file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-sigma", type=float, default=0.1, help="pixel noise (0.333/0.1/0.0333)")
    p.add_argument("--npix", type=int, default=256)
    p.add_argument("--pixel-scale", type=float, default=0.04, help="arcsec per pixel")
    p.add_argument("--psf-sigma", type=float, default=0.05, help="Gaussian PSF sigma, arcsec")
    p.add_argument("--source", choices=("vae", "sersic"), default="vae")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("fit", help="fit a lens observation: MAP, then optionally HMC or NUTS")
    p.add_argument("obs", help="FITS image (primary HDU; PIXSCALE in the header), or a "
                               "lenstronomy HDF5 image (.h5; noise map from its exposure map)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--noise-sigma", type=float, default=None, help="pixel noise, image units")
    p.add_argument("--noise-map", default=None, help="FITS per-pixel noise sigma")
    p.add_argument("--psf-sigma", type=float, default=0.05, help="Gaussian PSF sigma, arcsec")
    p.add_argument("--psf", default=None,
                   help="PSF kernel, FITS or HDF5 (normalised; overrides --psf-sigma)")
    p.add_argument("--mask", default=None, help="FITS mask, nonzero = use pixel")
    p.add_argument("--exclude", default=None,
                   help="FITS mask of pixels to leave out, nonzero = excluded (e.g. neighbours)")
    p.add_argument("--cutout", type=int, default=None,
                   help="fit only the central N x N pixels")
    p.add_argument("--pixel-scale", type=float, default=None, help="arcsec/pixel (else header)")
    p.add_argument("--lens-light", action="append", choices=("sersic",), default=None,
                   help="add a Sersic lens-light component (repeat for more)")
    p.add_argument("--supersample", type=int, default=1, help="sub-pixels per pixel side")
    p.add_argument("--source", choices=("vae", "sersic"), default="vae")
    p.add_argument("--priors", choices=("default", "paper"), default="default")
    p.add_argument("--steps", type=int, default=400,
                   help="MAP Adam steps of the final run (then up to 500 L-BFGS iterations)")
    p.add_argument("--restarts", type=int, default=4, help="MAP restarts from prior draws")
    p.add_argument("--finals", type=lambda t: t if t == "all" else int(t), default=1,
                   help="MAP: the best N short runs (or 'all') are each continued with Adam; "
                        "the one with the highest log posterior is polished and kept")
    p.add_argument("--no-source-start", action="store_true",
                   help="MAP: skip the extra run from the source read off the arcs and encoded "
                        "by the VAE encoder")
    p.add_argument("--samples", type=int, default=500,
                   help="posterior draws per chain (0: MAP only)")
    p.add_argument("--warmup", type=int, default=300, help="adaptation iterations per chain")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--sampler", choices=("hmc", "nuts", "laplace"), default="hmc",
                   help="hmc: all chains in one batched likelihood; nuts: Pyro NUTS, chain by "
                        "chain; laplace: samples x chains independent draws from the Gaussian "
                        "approximation at the MAP (fast, exact only for a Gaussian posterior)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hold-lens-light", action="store_true",
                   help="sample mass and source with the lens light held at its MAP")
    p.add_argument("--hold", action="append", default=None, metavar="SITE",
                   help="hold a site at its MAP while sampling (repeatable), e.g. src_s")
    p.add_argument("--marginalise-amplitudes", action="store_true",
                   help="integrate source and lens-light amplitudes out analytically instead "
                        "of sampling them")
    p.add_argument("--source-correction", type=float, default=None, metavar="SIGMA",
                   help="experimental: add a pixelated correction to the VAE source with this "
                        "prior sd (a fraction of the source amplitude prior's median, e.g. "
                        "0.1); blind fits with it still biased by ~2-3%% (docs/fitting.md)")
    p.add_argument("--correction-pixels", type=int, default=64, metavar="N",
                   help="side of the source correction's grid (default 64)")
    p.add_argument("--correction-smoothing", type=float, default=0.0, metavar="S",
                   help="Gaussian correlation of the source correction, sd in grid pixels "
                        "(default 0: independent pixels)")
    p.add_argument("--correction-regularisation", default="identity",
                   choices=("identity", "gradient", "curvature"),
                   help="prior of the correction's grid: independent values (default), or "
                        "the gradient or curvature regularisation of Suyu et al. (2006)")
    p.add_argument("--correction-frame", type=float, nargs=3, default=None,
                   metavar=("X0", "Y0", "H"),
                   help="fix the correction's grid on the source plane: centre X0, Y0 and "
                        "half-width H, arcsec (default: on the VAE stamp, moving with it)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start the MAP from an earlier fit's summary.json (or its folder)")
    p.add_argument("--coolest", action="store_true",
                   help="also write the model in the COOLEST standard (coolest.json + FITS)")
    p.add_argument("--checkpoint", default=None,
                   help="file for the HMC state (--sampler hmc): rerunning the same command "
                        "resumes an interrupted run from it, with the same draws; rerunning it "
                        "with a larger --samples extends the chains; the MAP the chains "
                        "started from is kept beside it (FILE.map.pt) and read, not searched "
                        "again, on a rerun")
    p.add_argument("--pilot", default=None, metavar="NC",
                   help="posterior.nc of an earlier run of the same fit (--sampler hmc): its "
                        "draws' covariance whitens the sampler and its draws start the chains, "
                        "for posteriors whose warm-up cannot measure their width")
    p.add_argument("--tempering", type=_ladder, default=None, metavar="K|B0,B1,...",
                   help="parallel tempering (--sampler hmc): each chain becomes a ladder of K "
                        "chains at rising temperatures that exchange positions (K times the "
                        "cost), for modes or ridge ends plain chains cross too rarely; or give "
                        "the inverse temperatures, e.g. 1,0.8,0.64,0.51; the summary reports "
                        "exchange rates and round trips")
    p.add_argument("--source-interpolation", choices=("bilinear", "cubic"),
                   default="bilinear",
                   help="how the VAE stamp is read between its pixels: cubic gives the "
                        "likelihood a continuous gradient (longer HMC steps on bright arcs)")
    p.add_argument("--pilot-flow", action="store_true",
                   help="with --pilot: also fit a normalising flow to the pilot's draws and "
                        "sample in its latent space (NeuTra), for curved ridges")
    p.add_argument("--device", default="cpu",
                   help="where the fit runs: cpu, cuda, cuda:1 (the whole fit on one GPU)")
    p.add_argument("--float32", action="store_true",
                   help="compute in float32 instead of float64: half the time and memory "
                        "(the log posterior of HST lens 3 moves by <= 0.013 nats)")
    p.add_argument("--compile", action="store_true",
                   help="run the simulator as one torch.compile-d graph (needs a C compiler; "
                        "20-40 s to compile per batch size; ~3x faster with --float32)")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("demo", help="simulate a mock with the VAE source, fit, sample, plot")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--sampler", choices=("hmc", "nuts"), default="hmc")
    p.add_argument("--max-tree-depth", type=int, default=5, help="NUTS only")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train-vae", help="train the VAE source prior (Pyro SVI)")
    p.add_argument("--cosmos-root", required=True,
                   help="folder holding GalSim real_galaxy_catalog*.fits files (searched recursively)")
    p.add_argument("--out", default="data", help="where vae_decoder.pt / vae_encoder.pt go")
    p.add_argument("--workdir", default="build/vae", help="checkpoints (a rerun resumes)")
    p.add_argument("--n-synthetic", type=int, default=6000)
    p.add_argument("--real-repeat", type=int, default=1, metavar="K",
                   help="list each augmented real training stamp K times (weights real galaxies "
                        "against the synthetic ones)")
    p.add_argument("--pad-small-from", type=int, default=None, metavar="N",
                   help="also train on the real stamps smaller than --min-size but at least N "
                        "pixels, padded with noise at their own level (S/N > 15); training "
                        "only, the held-out split is unchanged (default: off, as the paper)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--prior-scale", type=float, default=9.0)
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--snr-min", type=float, default=15.0)
    p.add_argument("--snr-max", type=float, default=50.0)
    p.add_argument("--no-snr-cut", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the networks train")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="fine-tune: start from the vae_decoder.pt / vae_encoder.pt in DIR "
                        "(same --width), e.g. data/ for the shipped weights")
    p.set_defaults(func=_cmd_train_vae)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"difflens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training the VAE source model with Pyro's SVI (Chianese et al. 2019, Sec. 2.2, Appendix D).

Model:  z ~ N(0, I_64),  x | z ~ N(mu_d(z), sigma_d^2 I),  sigma_d = 1/50;
Guide:  z | x ~ N(mu_e(x), diag sigma_e(x)^2).
The ELBO uses the analytic KL (``TraceMeanField_ELBO``); Adam with betas (0.5, 0.999) and
gradient-norm clipping (Pyro's ``ClippedAdam``); early
stopping on the validation ELBO; a checkpoint after every epoch so an interrupted run resumes
where it stopped.  After training the latent prior is fitted to the encoded means of the training
set (covariance x ``prior_scale``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_path, tensors_to
from .vae import Decoder, Encoder, LatentPrior, VAEConfig, VAESource


def dihedral_augment(images: np.ndarray) -> np.ndarray:
    """The 8 rotations by multiples of 90 degrees and reflections of each stamp (N -> 8N).

    Examples
    --------
    >>> import numpy as np
    >>> dihedral_augment(np.random.default_rng(0).random((2, 64, 64))).shape   # 8 symmetries each
    (16, 64, 64)
    """
    out = []
    for k in range(4):
        r = np.rot90(images, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return np.ascontiguousarray(np.concatenate(out))


@dataclass
class TrainConfig:
    """Training settings (defaults: a CPU-practical run; the paper used lr 1e-6 for ~450 epochs).

    ``device`` ("cpu", "cuda") is where the networks and the training stamps live while
    training; the returned VAE and the checkpoints are on the CPU either way.

    Examples
    --------
    >>> TrainConfig(max_epochs=500, max_minutes=25).prior_scale     # the paper's x9 covariance
    9.0
    """

    lr: float = 3e-4
    batch_size: int = 32
    max_epochs: int = 60
    patience: int = 6
    max_minutes: float | None = None
    seed: int = 0
    prior_scale: float = 9.0
    device: str = "cpu"


def _batches(x: torch.Tensor, batch_size: int, generator=None):
    # indices on the host: they index stamps on any device
    order = (torch.randperm(len(x), generator=generator, device="cpu") if generator is not None
             else torch.arange(len(x), device="cpu"))
    for i in range(0, len(x), batch_size):
        yield x[order[i:i + batch_size]]


def _pyro_pieces(cfg: VAEConfig, enc: Encoder, dec: Decoder):
    import pyro
    import pyro.distributions as dist

    def model(x):
        pyro.module("decoder", dec)
        with pyro.plate("galaxies", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(cfg.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), cfg.sigma_d).to_event(2), obs=x)

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("galaxies", x.shape[0]):
            mu, sigma = enc(x)
            pyro.sample("z", dist.Normal(mu, sigma).to_event(1))

    return model, guide


def elbo_per_image(svi, x: torch.Tensor, batch_size=256) -> float:
    """Mean ELBO per image over ``x`` (nats), without gradient steps.

    Examples
    --------
    >>> elbo_per_image(svi, val_images)        # nats per image                   # doctest: +SKIP
    """
    total = 0.0
    with torch.no_grad():
        for xb in _batches(x, batch_size):
            total -= svi.evaluate_loss(xb)
    return total / len(x)


def train_vae(train: np.ndarray, val: np.ndarray, workdir, vae_config: VAEConfig = VAEConfig(),
              config: TrainConfig = TrainConfig(), progress=True, card: dict | None = None,
              init: VAESource | None = None) -> VAESource:
    """Train (or resume training) a VAE and fit its latent prior.

    Parameters
    ----------
    train, val : ndarray (N, 64, 64)
        Normalised stamps (maximum 1).
    workdir : path
        Holds ``checkpoint.pt`` (resumed if present) and ``history.json``.
    vae_config, config : architecture and training settings.
    card : dict, optional
        Extra facts (data provenance) stored with the weights.
    init : VAESource, optional
        Trained weights (encoder included, e.g. ``load_default_vae(with_encoder=True)``) to
        start from instead of a random initialisation: fine-tuning.  Its architecture must equal
        ``vae_config``, and no galaxy its card lists as trained on (``real_train``,
        ``real_val``) may be in ``card["real_test_held_out"]``.  Ignored when ``workdir``
        holds a checkpoint (the run resumes).

    Returns
    -------
    VAESource with the best-validation weights, its prior and a ``card`` of what happened.

    Examples
    --------
    >>> from difflens.sources.vae import VAEConfig
    >>> vae = train_vae(train, val, "build/vae", VAEConfig(width=0.25),
    ...                 TrainConfig(max_epochs=100))            # doctest: +SKIP
    >>> vae.save("data/vae_decoder.pt", "data/vae_encoder.pt")  # doctest: +SKIP
    """
    import pyro
    from pyro.infer import SVI, TraceMeanField_ELBO
    from pyro.optim import ClippedAdam

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train", train), ("val", val)):
        if arr.ndim != 3 or arr.shape[1:] != (64, 64):
            raise ValueError(f"{name} images must have shape (N, 64, 64), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} images contain non-finite values")
    torch.manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device is {config.device!r} but torch sees no CUDA GPU")
    enc, dec = Encoder(vae_config), Decoder(vae_config)
    if init is not None:
        if init.encoder is None:
            raise ValueError("init: fine-tuning needs the encoder too (with_encoder=True)")
        if init.config != vae_config:
            raise ValueError(f"init: its architecture {init.config} differs from {vae_config}")
        seen = set((init.card or {}).get("real_train", [])) | set(
            (init.card or {}).get("real_val", []))
        leaked = sorted(seen & set((card or {}).get("real_test_held_out", [])))
        if leaked:
            raise ValueError(f"init: these held-out test galaxies were trained on by the weights "
                             f"it starts from: {leaked}; split with the seed those weights used")
        enc.load_state_dict(init.encoder.state_dict())
        dec.load_state_dict(init.decoder.state_dict())
    enc, dec = enc.to(device), dec.to(device)
    model, guide = _pyro_pieces(vae_config, enc, dec)
    # Adam with the paper's betas; gradient-norm clipping guards the first steps
    optim = ClippedAdam({"lr": config.lr, "betas": (0.5, 0.999), "clip_norm": 100.0})
    svi = SVI(model, guide, optim, loss=TraceMeanField_ELBO())
    # every stamp on the training device at once (6,000 stamps are 98 MB in float32)
    xt = torch.as_tensor(train, dtype=torch.float32, device=device)
    xv = torch.as_tensor(val, dtype=torch.float32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)    # batch order, on the host

    ckpt_path = workdir / "checkpoint.pt"
    state = dict(epoch=0, best_val=-math.inf, best_epoch=0, bad_epochs=0, history=[],
                 seconds=0.0)
    best = None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=device)
        enc.load_state_dict(ck["encoder"])
        dec.load_state_dict(ck["decoder"])
        # one step registers the modules' parameters with the optimiser before its state loads
        svi.step(xt[:2])
        enc.load_state_dict(ck["encoder"])
        dec.load_state_dict(ck["decoder"])
        optim.set_state(ck["optim"])
        state = ck["state"]
        best = ck["best"]
        gen.set_state(ck["generator"])
        print(f"resumed from {ckpt_path} after epoch {state['epoch']}")

    from tqdm.auto import tqdm

    t_start = time.perf_counter() - state["seconds"]
    while state["epoch"] < config.max_epochs and state["bad_epochs"] < config.patience:
        enc.train()
        dec.train()
        running, seen = 0.0, 0
        batches = list(_batches(xt, config.batch_size, gen))
        bar = tqdm(batches, desc=f"epoch {state['epoch'] + 1}", disable=not progress, leave=False)
        for xb in bar:
            loss = svi.step(xb)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"ELBO became {loss} in epoch {state['epoch'] + 1}; lower the learning rate "
                    f"(--lr, now {config.lr}) and rerun (it resumes from the last good epoch)")
            running -= loss
            seen += len(xb)
            bar.set_postfix(elbo=f"{running / seen:.0f}")
        enc.eval()
        dec.eval()
        val_elbo = elbo_per_image(svi, xv)
        state["epoch"] += 1
        state["seconds"] = time.perf_counter() - t_start
        state["history"].append(dict(epoch=state["epoch"], train_elbo=running / seen,
                                     val_elbo=val_elbo, seconds=state["seconds"]))
        if val_elbo > state["best_val"]:
            state.update(best_val=val_elbo, best_epoch=state["epoch"], bad_epochs=0)
            best = dict(encoder={k: v.clone() for k, v in enc.state_dict().items()},
                        decoder={k: v.clone() for k, v in dec.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        print(f"epoch {state['epoch']}: train ELBO {running / seen:.1f}, val ELBO {val_elbo:.1f} "
              f"per image ({state['seconds'] / 60:.1f} min)", flush=True)
        with atomic_path(ckpt_path) as tmp:
            torch.save(tensors_to(dict(encoder=enc.state_dict(), decoder=dec.state_dict(),
                                    optim=optim.get_state(), state=state, best=best,
                                    generator=gen.get_state()), "cpu"), tmp)
        (workdir / "history.json").write_text(json.dumps(state["history"], indent=1))
        if config.max_minutes is not None and state["seconds"] > 60 * config.max_minutes:
            print(f"stopping: time limit of {config.max_minutes} min reached")
            break

    enc.load_state_dict(best["encoder"])
    dec.load_state_dict(best["decoder"])
    enc.eval()
    dec.eval()
    with torch.no_grad():
        means = torch.cat([enc(xb)[0] for xb in _batches(xt, 256)]).cpu()
    enc.cpu()
    dec.cpu()
    prior = LatentPrior.fit(means, scale=config.prior_scale)
    last = state["history"][-1]
    info = dict(card or {}, vae_config=asdict(vae_config), train_config=asdict(config),
                initialised_from=None if init is None else _lineage(init.card),
                epochs=state["epoch"], best_epoch=state["best_epoch"],
                best_val_elbo=state["best_val"], final_train_elbo=last["train_elbo"],
                wall_minutes=round(state["seconds"] / 60, 1), n_train=len(train),
                n_val=len(val))
    return VAESource(dec, prior, vae_config, enc, info)


def _lineage(card: dict | None) -> dict:
    """What a fine-tuned network started from: the training facts of ``card`` (no identifiers)."""
    keep = ("vae_config", "train_config", "epochs", "best_epoch", "best_val_elbo", "wall_minutes",
            "n_train", "n_val", "initialised_from")
    return {k: v for k, v in (card or {}).items() if k in keep}


def prepare_training_data(cosmos_root, *, n_synthetic=6000, selection=None, seed=0,
                          split_fractions=(0.6, 0.15, 0.25), workdir=None, real_repeat=1,
                          pad_small_from=None, small_snr_min=15.0):
    """Assemble the default training mix.

    Real galaxies below ``cosmos_root`` (any GalSim RealGalaxyCatalog files) are selected and split
    into train / validation / test; the test galaxies are held out from everything.  Real training
    stamps are augmented with the 8 dihedral symmetries; ``n_synthetic`` GalSim galaxies
    (:mod:`difflens.datasets.synthetic`, cached in ``workdir``) are split 95 / 5 into train / val.
    ``real_repeat`` (integer >= 1) lists the augmented real training stamps that many times, to
    weight real morphology against the synthetic galaxies when real ones are few.

    ``pad_small_from`` (pixels, default None: off) adds a training-only pool of the real stamps
    that the size cut drops: those with a smaller side from ``pad_small_from`` up to
    ``selection.min_size - 1``, padded to 64 x 64 with noise at their own level
    (:func:`difflens.datasets.cosmos.pad_with_noise`, no resampling) and kept if their S/N
    (the paper's block-averaged measure) exceeds ``small_snr_min``.  They join the training
    stamps (augmented and repeated like the others) and never the validation or test sets, so
    the split of the selected galaxies -- and the held-out galaxies -- stay what they are
    without the pool.

    Returns
    -------
    dict with ``train``, ``val`` (ndarrays), ``test`` (GalaxyStamps of held-out real galaxies),
    ``real_val`` (GalaxyStamps) and ``card`` (counts and identifiers for the model card).

    Examples
    --------
    >>> data = prepare_training_data("~/COSMOS_23.5_training_sample", n_synthetic=6000)  # doctest: +SKIP
    >>> data["train"].shape, data["card"]["real_counts"]                                # doctest: +SKIP
    """
    from ..datasets.cosmos import GalaxyStamps, Selection, load_cosmos, split
    from ..datasets.synthetic import synthetic_galaxies

    if int(real_repeat) != real_repeat or real_repeat < 1:
        raise ValueError(f"real_repeat must be an integer >= 1, got {real_repeat}")
    selection = selection or Selection()
    real = load_cosmos(cosmos_root, selection)
    r_train, r_val, r_test = split(real, split_fractions, seed=seed)
    small = None
    if pad_small_from is not None:
        if not selection.min_size or not 0 < pad_small_from < selection.min_size:
            raise ValueError(f"pad_small_from must lie between 1 and the size cut "
                             f"({selection.min_size}), got {pad_small_from}")
        small_sel = replace(selection, min_size=int(pad_small_from),
                            max_size=selection.min_size - 1, pad_small=True,
                            snr_range=(float(small_snr_min), math.inf))
        small = load_cosmos(cosmos_root, small_sel)
        shared = set(small.ident) & (set(r_val.ident) | set(r_test.ident))
        if shared:       # one galaxy in two catalogues, as a small and a large stamp
            raise ValueError(f"padded training galaxies also held out or validating: "
                             f"{sorted(shared)}")
        r_train = GalaxyStamps(np.concatenate([r_train.images, small.images]),
                               np.concatenate([r_train.noise_sigma, small.noise_sigma]),
                               np.concatenate([r_train.ident, small.ident]))
    synth = None
    cache = Path(workdir) / f"synthetic_{n_synthetic}_{seed}.npz" if workdir else None
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            synth = GalaxyStamps(z["images"], z["noise_sigma"], z["ident"])
    elif n_synthetic:
        synth = synthetic_galaxies(n_synthetic, seed=seed + 1000)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, images=synth.images, noise_sigma=synth.noise_sigma, ident=synth.ident)
    n_syn_val = int(round(0.05 * n_synthetic)) if n_synthetic else 0
    parts_train = [np.tile(dihedral_augment(r_train.images), (int(real_repeat), 1, 1))]
    parts_val = [r_val.images]
    if synth is not None:
        parts_train.append(synth.images[n_syn_val:])
        parts_val.append(synth.images[:n_syn_val])
    card = dict(real_counts=real.counts, selection=asdict(selection),
                real_train=r_train.ident.tolist(), real_val=r_val.ident.tolist(),
                real_test_held_out=r_test.ident.tolist(), n_synthetic=n_synthetic,
                augmentation="8 dihedral symmetries of each real training stamp",
                real_repeat=int(real_repeat))
    if small is not None:
        card.update(real_train_padded=small.ident.tolist(), real_counts_padded=small.counts,
                    padded_selection=dict(min_side=int(pad_small_from),
                                          max_side=selection.min_size - 1,
                                          snr_min=float(small_snr_min)))
    return dict(train=np.concatenate(parts_train), val=np.concatenate(parts_val), test=r_test,
                real_val=r_val, card=card)


def reconstruction_chi2(vae: VAESource, stamps) -> np.ndarray:
    """Per-galaxy reconstruction chi^2 per pixel: mean(((x - mu_d(mu_e(x))) / sigma_noise)^2).

    Examples
    --------
    >>> chi2 = reconstruction_chi2(load_default_vae(with_encoder=True), data["test"])   # doctest: +SKIP
    """
    with torch.no_grad():
        x = torch.as_tensor(stamps.images, dtype=torch.float32)
        recon = vae.decode(vae.encode(x)[0])
    sig = torch.as_tensor(stamps.noise_sigma, dtype=torch.float32)[:, None, None]
    return (((x - recon) / sig) ** 2).mean(dim=(1, 2)).numpy()

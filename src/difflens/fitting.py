"""One call from an observation to a fitted lens: MAP, optional NUTS posterior, summary, figures.

This is the public entry point the CLI and the examples use::

    from difflens.datasets.observation import read_observation
    from difflens.fitting import fit_lens
    fit = fit_lens(read_observation("obs.fits", noise_sigma=0.1), samples=200, chains=2)
    fit.save("out/")      # summary.json, posterior.nc, fit.png, corner.png
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_path
from .datasets.observation import Observation
from .infer import MAPResult, Posterior, fit_map, sample_laplace, sample_posterior
from .infer.importance import ModeMixture, sample_modes
from .infer.map import summarise_map
from .infer.mcmc import read_pilot
from .infer.umbrella import Umbrella, sample_umbrella
from .lensing import to_lenstronomy_epl
from .model import LensModel, Priors, q_phi_to_ellipticity
from .simulate import LENS_PARAMS, Simulator
from .sources.correction import PixelCorrection



def _source_model(source):
    if isinstance(source, str) and source == "vae":
        from .sources.vae import load_default_vae

        return load_default_vae(with_encoder=True)     # the encoder starts the MAP's source
    return source


def _kept_map_path(checkpoint) -> Path:
    """Where the MAP an HMC run started from is kept: beside its ``checkpoint``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".map.pt")


def _keep_map(checkpoint, result: MAPResult):
    """Write the sampled sites of ``result`` beside ``checkpoint`` (atomically), with its loss
    history, restart losses and wall time, so that a resumed run starts from this MAP."""
    kept = {"values": {k: v.detach().cpu() for k, v in result.sample_sites().items()},
            "loss_history": torch.as_tensor(result.loss_history),
            "restart_losses": torch.tensor(list(result.restart_losses), dtype=torch.float64),
            "seconds": float(result.seconds)}
    with atomic_path(_kept_map_path(checkpoint)) as tmp:
        torch.save(kept, tmp)


def _kept(model: LensModel, checkpoint):
    """What :func:`_keep_map` wrote beside ``checkpoint``, checked against the sites of
    ``model``, or None where nothing is kept."""
    path = _kept_map_path(checkpoint)
    if not path.exists():
        return None
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
        values = kept["values"]
    except Exception as exc:
        raise ValueError(f"{path} (the MAP that HMC checkpoint {Path(checkpoint).name} started "
                         f"from) cannot be read ({exc}); delete both to start afresh") from exc
    vectors = model.latent_start()
    expected = {k: tuple(vectors[k].shape) if k in vectors else () for k in model.site_names()}
    found = {k: tuple(v.shape) for k, v in values.items()}
    differ = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
    if differ:
        raise ValueError(f"{path} holds a MAP of another model (sites {differ} differ: kept "
                         f"{ {k: found.get(k, 'absent') for k in differ} }, this model "
                         f"{ {k: expected.get(k, 'absent') for k in differ} }); delete it and the "
                         "checkpoint, or choose another checkpoint path")
    return kept


def _kept_map(model: LensModel, checkpoint):
    """The MAP kept beside ``checkpoint`` by :func:`_keep_map`, evaluated on ``model`` (a
    :class:`MAPResult`), or None where none is kept."""
    kept = _kept(model, checkpoint)
    if kept is None:
        return None
    result = summarise_map(model, {k: model.tensor(v) for k, v in kept["values"].items()},
                           kept["loss_history"].numpy(), kept["restart_losses"].tolist())
    result.seconds = kept["seconds"]
    return result


def data_flux_scale(obs: Observation) -> float:
    """A typical bright-pixel value of the data (image units): the 99.5th percentile of the
    unmasked pixels, used to centre amplitude priors (see :class:`difflens.model.Priors`).

    Examples
    --------
    >>> import numpy as np
    >>> from difflens.datasets.observation import Observation
    >>> img = np.zeros((100, 100)); img[0, :] = 5.0          # 1% of the pixels at 5
    >>> data_flux_scale(Observation(img, 0.1, 0.04))
    5.0
    """
    pixels = obs.image[obs.mask] if obs.mask is not None else obs.image.reshape(-1)
    pixels = pixels[np.isfinite(pixels)]
    value = float(np.percentile(pixels, 99.5)) if pixels.size else 0.0
    if not value > 0:
        raise ValueError("the image has no positive signal to set the flux scale; pass flux_scale")
    return value


def build_model(obs: Observation, *, source="vae", priors="default", psf_sigma=None,
                lens_light=0, flux_scale="auto", supersample=1, marginalise_amplitudes=False,
                source_correction=None, source_interpolation="bilinear", dtype=torch.float64,
                device="cpu", compile=False) -> LensModel:
    """The :class:`LensModel` of an observation (grid and PSF taken from it).

    Parameters
    ----------
    source : "vae", "sersic" or a VAESource
    priors : "default", "paper" or a Priors
        A preset name, or a :class:`difflens.model.Priors` (which then also fixes the lens-light
        components and amplitude scale: ``lens_light`` and ``flux_scale`` stay at their defaults).
    psf_sigma : float, optional
        Gaussian PSF sigma (arcsec) used when the observation carries no PSF kernel.
    lens_light : int
        Number of elliptical Sersic lens-light components (0 when the lens light is subtracted).
    flux_scale : float or "auto"
        Centre of the amplitude priors, image units; "auto" takes :func:`data_flux_scale`.
    supersample : int
        Sub-pixels per pixel side for ray tracing (>= 1).
    marginalise_amplitudes : bool
        Integrate the source and lens-light amplitudes out analytically instead of sampling
        them (:meth:`Priors.with_amplitudes_marginalised`): fewer, better-behaved directions
        for the sampler; their values are reported at the conditional mean (MAP) and drawn
        per posterior draw.
    source_correction : float or PixelCorrection, optional
        Give the VAE source a pixelated correction (:meth:`Priors.with_source_correction`): a
        number is its prior sd as a fraction of the source amplitude prior's median (the data's
        flux scale), on a 64 x 64 grid; a
        :class:`~difflens.sources.correction.PixelCorrection` sets grid and flux too.  For
        sources the VAE cannot draw (real galaxies with clumps).  Experimental: compare modes by
        :func:`difflens.infer.evidence.correction_evidence` (docs/fitting.md).
    source_interpolation : "bilinear" or "cubic"
        How the VAE stamp is read between pixel centres (:class:`LensModel`); "cubic" gives
        the likelihood a continuous gradient, for HMC on bright arcs.
    dtype : torch.dtype
        Of every model tensor (float64 default; float32 halves memory and time, see
        docs/benchmarks.md for its accuracy).
    device : str or torch.device
        Where the model lives and every fit on it runs ("cpu", "cuda", "cuda:1"): the image,
        noise, grid, PSF, VAE and the fit's parameters are all made there.
    compile : bool
        Ray tracing, source reading, lens light and PSF as one ``torch.compile``-d graph
        (:class:`~difflens.simulate.Simulator`; needs a C compiler on CPU).  Pays in float32:
        on lens 3 of docs/real_data_studies.md a potential + gradient of 8 chains costs 51-55 ms
        against 83-102 ms eager and 159-163 ms in float64 (2-core CPU,
        benchmarks/RESULTS.md), after a one-off compilation of 20-40 s per batch size.

    Examples
    --------
    >>> from difflens.datasets.mocks import simulate_mock
    >>> obs = simulate_mock(3, noise_sigma=0.05, npix=48, pixel_scale=0.16, source="sersic")
    >>> build_model(obs, source="sersic", lens_light=1).lens_sites[0]
    'r_ein'
    """
    src = _source_model(source)
    kind = "sersic" if isinstance(src, str) else "vae"
    if source_correction is not None and kind != "vae":
        raise ValueError("a source correction needs the VAE source, not a Sersic profile")
    if source_correction is not None and marginalise_amplitudes:
        raise ValueError("source_correction and marginalise_amplitudes cannot be combined: the "
                         "correction is not scaled by the source amplitude, so that amplitude "
                         "must be sampled")
    if isinstance(priors, Priors):
        # a Priors object already holds the light components and amplitude scale: refuse to
        # ignore a count or scale given beside it
        if lens_light not in (0, len(priors.lens_light)):
            raise ValueError(f"lens_light={lens_light!r} but the Priors given have "
                             f"{len(priors.lens_light)} lens-light components; set them in the "
                             "Priors (Priors.default(..., lens_light=N)) or pass a preset name")
        if flux_scale != "auto":
            raise ValueError("flux_scale sets the preset priors' amplitudes; with a Priors object "
                             "set it there (Priors.default(..., flux_scale=F))")
        pri = priors
    else:
        scale = data_flux_scale(obs) if flux_scale == "auto" else flux_scale
        pri = Priors.preset(priors, kind, lens_light=lens_light, flux_scale=scale)
    if marginalise_amplitudes:
        pri = pri.with_amplitudes_marginalised()
    if source_correction is not None:
        corr = source_correction
        pri = (pri.with_source_correction(corr.sigma, corr.pixels, corr.flux, corr.smoothing,
                                          corr.regularisation, corr.frame)
               if isinstance(corr, PixelCorrection) else pri.with_source_correction(corr))
    if obs.psf is None and psf_sigma is None:
        raise ValueError("the observation has no PSF: give psf_sigma (arcsec) or a PSF kernel")
    if not (isinstance(supersample, int) and supersample >= 1):
        raise ValueError(f"supersample must be an integer >= 1, got {supersample!r}")
    device = _checked_device(device)
    sim = Simulator(npix=obs.shape, pixel_scale=obs.pixel_scale,
                    psf=torch.as_tensor(obs.psf, device=device) if obs.psf is not None else None,
                    psf_sigma=psf_sigma, supersample=supersample, dtype=dtype, device=device,
                    compile=compile)
    return LensModel(obs.image, obs.noise_sigma, sim, source=src, priors=pri, mask=obs.mask,
                     source_interpolation=source_interpolation)


def _checked_device(device) -> torch.device:
    """``device`` as a torch.device, with a clear error where it cannot be used here."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this torch ({torch.__version__}) "
                         "sees no CUDA GPU; use device='cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but only "
                         f"{torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


@dataclass
class LensFit:
    """Result of :func:`fit_lens`: the observation, model, MAP and (optionally) posterior.

    Examples
    --------
    >>> fit = fit_lens(obs, samples=200)                         # doctest: +SKIP
    >>> fit.summary()["map"]["r_ein"], fit.map.reduced_chi2      # doctest: +SKIP
    >>> fit.save("fit_output")      # summary.json, fit.png, posterior.nc, corner.png  # doctest: +SKIP
    """

    observation: Observation
    model: LensModel
    map: MAPResult
    posterior: Posterior | None = None
    modes: ModeMixture | None = None
    umbrella: Umbrella | None = None

    def summary(self) -> dict:
        """JSON-ready summary: MAP values (lens keys r_ein, q, phi, gamma, x0, y0, g1, g2 in
        method.md conventions, source parameters beside them), lenstronomy conversions, reduced
        chi^2, and the posterior's mean / sd / 94% HDI with R-hat and ESS when sampled."""
        m = self.map
        out = {"map": {k: float(m.params[k]) for k in LENS_PARAMS}}
        for k, v in m.params.items():
            if k.startswith(("src_", "light")) and v.numel() == 1:   # not src_correction
                out["map"][k] = float(v)
        if "z" in m.params:
            out["map"]["z"] = m.params["z"].cpu().numpy().round(6).tolist()
        lensed = to_lenstronomy_epl(*(out["map"][k] for k in ("r_ein", "q", "phi", "gamma", "x0",
                                                              "y0")))
        out["map_lenstronomy"] = {k: float(v) for k, v in lensed.items()}
        out["reduced_chi2"] = m.reduced_chi2
        out["log_posterior"] = m.log_posterior
        out["n_pixels"] = self.model.n_pixels
        out["device"] = str(self.model.device)
        corr = self.model.priors.source_correction
        if corr is not None:
            out["source_correction"] = {"sigma": corr.sigma, "pixels": corr.pixels,
                                        "flux": corr.flux, "smoothing": corr.smoothing,
                                        "regularisation": corr.regularisation,
                                        "frame": corr.frame}
        out["seconds"] = {"map": round(m.seconds, 2) if np.isfinite(m.seconds) else None}
        if self.posterior is not None:
            out["posterior"] = self.posterior.summary()
            out["seconds"].update({k: round(v, 2) for k, v in self.posterior.seconds.items()})
            if self.posterior.tempering:
                out["tempering"] = dict(self.posterior.tempering)
        if self.modes is not None:
            out["modes"] = self.modes.summary()
        if self.umbrella is not None:
            out["umbrella"] = self.umbrella.summary()
        if self.observation.truth:
            out["truth"] = {k: v for k, v in self.observation.truth.items() if np.ndim(v) == 0}
        return out

    def table(self) -> str:
        """Truth (mocks) vs MAP vs posterior mean/sd/R-hat of the lens parameters, as text."""
        s = self.summary()
        truth, post = s.get("truth", {}), s.get("posterior", {})
        nan = float("nan")
        lines = [f"reduced chi^2 {s['reduced_chi2']:.3f}",
                 f"{'param':7s} {'truth':>9s} {'MAP':>9s} {'post. mean':>11s} {'sd':>8s} "
                 f"{'R-hat':>6s}"]
        for k in LENS_PARAMS:
            p = post.get(k, {})
            lines.append(f"{k:7s} {truth.get(k, nan):9.4f} {s['map'][k]:9.4f} "
                         f"{p.get('mean', nan):11.4f} {p.get('sd', nan):8.4f} "
                         f"{p.get('r_hat', nan):6.3f}")
        return "\n".join(lines)

    def sample(self, samples=500, *, warmup=200, chains=4, sampler="hmc", max_tree_depth=7,
               sample_lens_light=True, hold=(), per_chain_metric=False, pilot=None,
               pilot_flow=False, modes=(), mode_steps=2000, tempering=None, seed=0,
               progress=True, checkpoint=None) -> "LensFit":
        """This fit with a posterior sampled from its MAP (see :func:`fit_lens` for the
        arguments); the MAP can be saved before a long sampling run starts.

        With ``checkpoint`` (HMC only) this fit's MAP is kept beside it
        (``<checkpoint>.map.pt``), so that a rerun of :func:`fit_lens` with the same checkpoint
        starts from it again; sampling from another MAP with that checkpoint is refused.

        ``hold`` names further scalar sites held at their MAP values while sampling (e.g.
        ``("src_s",)``: the VAE stamp's half-width, which trades off against the size of the
        galaxy drawn in the latent); the posterior is then conditional on them.

        ``pilot`` (HMC only): an earlier run's posterior of the same model, held sites
        included (a ``Posterior`` or ``posterior.nc``), whose covariance whitens the sampler
        and whose draws start the chains (:func:`difflens.infer.sample_posterior`);
        ``pilot_flow=True`` also fits a normalising flow to its draws and samples in the
        flow's latent space (for curved ridges).

        ``modes`` (HMC only): the posterior's other basins, each named as in
        :meth:`sample_modes` by overrides of the MAP's values (e.g. ``[{"q": 0.85}]``); a MAP
        fit from each (``mode_steps`` Adam steps) finds its mode, and the chains add
        mode-jumping moves between all of them (:func:`difflens.infer.sample_posterior`).

        ``tempering`` (HMC only): parallel tempering, each chain a ladder of K tempered chains
        (an int K, or the inverse temperatures; :func:`difflens.infer.sample_posterior`); the
        summary then reports the exchange rates and round trips.

        Examples
        --------
        >>> fit = fit_lens(obs)                         # MAP only            # doctest: +SKIP
        >>> fit.save("out")                                                   # doctest: +SKIP
        >>> fit = fit.sample(300, chains=4); fit.save("out")                  # doctest: +SKIP
        """
        if checkpoint is not None and sampler == "hmc":
            self._keep_map_beside(checkpoint)
        model, sites = self._sampled_model(hold, sample_lens_light)
        if sampler == "laplace":
            if (checkpoint is not None or per_chain_metric or pilot is not None or pilot_flow
                    or modes or tempering is not None):
                raise ValueError("sampler='laplace' draws at once: it keeps no checkpoint, "
                                 "adapts no metric, tempers nothing and jumps between no "
                                 "modes (checkpoint / per_chain_metric / pilot / tempering / "
                                 "modes; see sample_modes)")
            post = sample_laplace(model, sites, num_samples=samples * chains, seed=seed)
        else:
            if modes and tempering is not None:      # before the modes' MAPs, not after them
                raise ValueError("tempering and modes (mode-jumping moves) are not combined; "
                                 "use one")
            others = [m.sample_sites() for m in
                      self._other_modes(model, sites, modes, mode_steps, seed, progress)]
            post = sample_posterior(model, sites, num_samples=samples, warmup=warmup,
                                    chains=chains, seed=seed, method=sampler,
                                    max_tree_depth=max_tree_depth, progress=progress,
                                    per_chain_metric=per_chain_metric, pilot=pilot,
                                    pilot_flow=pilot_flow, modes=others or None,
                                    tempering=tempering, checkpoint=checkpoint)
        return LensFit(self.observation, self.model, self.map, post)

    def sample_modes(self, starts, samples=4000, *, sample_lens_light=True, hold=(), steps=2000,
                     df=5.0, scale=1.2, seed=0, progress=True) -> "LensFit":
        """This fit with a posterior over several modes, by importance sampling from a Laplace
        approximation at each (:func:`difflens.infer.importance.sample_modes`).

        For posteriors with separated basins that HMC chains cross too rarely to weigh (lens 3
        of docs/real_data_studies.md).  The first mode is this fit's MAP; each entry of ``starts``
        names another basin by overriding some of the MAP's values (summary conventions:
        ``r_ein`` in arcsec, ``q``, ``phi`` in radians, ``g1``, ...), and a MAP fit from there
        (``steps`` Adam steps, no restarts) finds its mode.  Sites held while sampling
        (``hold``, the lens light unless ``sample_lens_light``) stay at this fit's MAP for
        every mode, as in :meth:`sample`.

        Returns
        -------
        LensFit
            With ``posterior`` (the resampled draws; their ``ess`` is the importance-sampling
            ESS) and ``modes`` (:class:`~difflens.infer.importance.ModeMixture`: each basin's
            weight and evidence, the PSIS ``pareto_k`` that says whether to trust them, and
            each mode's MAP).  ``summary()`` reports both.

        Examples
        --------
        >>> fit = fit_lens(obs)                                              # doctest: +SKIP
        >>> fit = fit.sample_modes([{"q": 0.85, "r_ein": 1.4, "g1": -0.05}]) # doctest: +SKIP
        >>> fit.modes.mode_weights, fit.modes.pareto_k                       # doctest: +SKIP
        """
        model, sites = self._sampled_model(hold, sample_lens_light)
        maps = [self.map] + self._other_modes(model, sites, starts, steps, seed, progress)
        inits = [sites] + [m.sample_sites() for m in maps[1:]]
        mix = sample_modes(model, inits, num_samples=samples, df=df, scale=scale, seed=seed)
        mix.maps = [{k: float(m.params[k]) for k in LENS_PARAMS}
                    | {"theta_E": float(m.params["q"] ** 0.5 * m.params["r_ein"])}
                    for m in maps]
        return LensFit(self.observation, self.model, self.map, mix.posterior, mix)

    def sample_umbrella(self, centres, samples=1000, *, coordinate="q", kappa=None, warmup=300,
                        chains_per_window=1, pilot=None, sample_lens_light=True, hold=(), seed=0,
                        progress=True, checkpoint=None) -> "LensFit":
        """This fit with a posterior from umbrella sampling along one slow coordinate
        (:func:`difflens.infer.umbrella.sample_umbrella`).

        For posteriors with one direction that chains cross only by a slow random walk (lens
        3's q, 0.4-0.85, docs/real_data_studies.md): each chain is held by a harmonic restraint
        near one of ``centres`` (q, or a scalar sampled site named by ``coordinate``), mixes
        fast there, and MBAR reweights all windows' draws into the posterior.  ``samples`` and
        ``warmup`` are per chain; ``pilot`` (an earlier run's draws, unconverged is fine)
        starts each chain at a draw near its window.  ``hold`` and
        ``sample_lens_light`` as in :meth:`sample`; ``checkpoint`` resumes or extends a run.

        Returns
        -------
        LensFit
            With ``posterior`` (the reweighted draws, resampled) and ``umbrella``
            (:class:`~difflens.infer.umbrella.Umbrella`: the windows' own chains, their
            diagnostics, MBAR free energies and the profile along the coordinate).
            ``summary()`` reports both; ``save`` adds ``windows.nc`` and ``profile.png``.

        Examples
        --------
        >>> fit = fit_lens(obs)                                              # doctest: +SKIP
        >>> fit = fit.sample_umbrella(numpy.linspace(0.4, 0.85, 10), 1000)   # doctest: +SKIP
        >>> fit.umbrella.theta_E_se, fit.umbrella.profile()                  # doctest: +SKIP
        """
        if checkpoint is not None:
            self._keep_map_beside(checkpoint)
        model, sites = self._sampled_model(hold, sample_lens_light)
        if pilot is not None:
            pilot = read_pilot(pilot)
        u = sample_umbrella(model, sites, centres, coordinate=coordinate, kappa=kappa,
                            num_samples=samples, warmup=warmup,
                            chains_per_window=chains_per_window, pilot=pilot, seed=seed,
                            progress=progress, checkpoint=checkpoint)
        return LensFit(self.observation, self.model, self.map, u.posterior, umbrella=u)

    def _keep_map_beside(self, checkpoint):
        """Keep this fit's MAP beside the HMC ``checkpoint`` (``<checkpoint>.map.pt``), or check
        that it is the MAP kept there: the chains' start and whitening, and the values of held
        sites, follow from the MAP, so a run resumes only from the MAP it started from."""
        kept = _kept(self.model, checkpoint)
        if kept is None:
            # only a fresh run keeps its MAP: a checkpoint written before MAPs were kept has
            # none, and its own check (u0, start_potential) refuses another start
            if not Path(checkpoint).exists():
                _keep_map(checkpoint, self.map)
            return
        ours = self.map.sample_sites()
        if any(not torch.equal(kept["values"][k].double(), ours[k].detach().cpu().double())
               for k in ours):
            raise ValueError(f"HMC checkpoint {checkpoint} started from another MAP, kept in "
                             f"{_kept_map_path(checkpoint).name}: pass checkpoint= to fit_lens "
                             "too, which then reads that MAP instead of searching again (the "
                             "search is not bit-reproducible in float32 or compiled), or delete "
                             "both files to start afresh")

    def _other_modes(self, model, sites, starts, steps, seed, progress):
        """MAP fits of ``model`` from this MAP's ``sites`` with the overrides of each entry of
        ``starts`` (summary conventions), one per other mode."""
        base = self.summary()["map"]
        results = []
        for i, start in enumerate(starts):
            unknown = set(start) - set(base)
            if unknown:
                raise ValueError(f"starts[{i}]: unknown parameter(s) {sorted(unknown)}; "
                                 f"known: {sorted(base)}")
            init = {**sites, **start_from_summary(model, {"map": {**base, **start}})}
            results.append(fit_map(model, steps=steps, restarts=1, init=init, data_guess=False,
                                   encode_source=False, seed=seed, progress=progress))
        return results

    def _sampled_model(self, hold, sample_lens_light):
        """The model with the sites in ``hold`` (and the lens light unless
        ``sample_lens_light``) held at their MAP values, and the MAP of the sites left."""
        sites, model = self.map.sample_sites(), self.model
        model.check_site_names(hold, "hold")
        held = {k: v for k, v in sites.items()
                if k in hold or (not sample_lens_light and k.startswith("light"))}
        if held:
            model = model.with_fixed(held)
            sites = {k: v for k, v in sites.items() if k not in held}
        return model, sites

    def save(self, out_dir, coolest=False) -> Path:
        """Write summary.json, fit.png and (when sampled) posterior.nc, corner.png and trace.png
        (every chain's draws, :func:`difflens.plots.plot_trace`); after umbrella sampling also
        windows.nc (the restrained chains, traced in trace.png) and profile.png
        (:func:`difflens.plots.plot_umbrella_profile`); with
        ``coolest=True`` also the COOLEST model (``coolest.json`` and its FITS files, see
        :mod:`difflens.coolest`).

        Files are written to a temporary folder first and moved into ``out_dir`` only when all
        of them exist, so a failure leaves nothing half-written.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ._io import atomic_directory
        from .coolest import write_coolest_files
        from .plots import plot_corner, plot_fit, plot_trace, plot_umbrella_profile

        with atomic_directory(out_dir) as tmp:
            (tmp / "summary.json").write_text(json.dumps(self.summary(), indent=1))
            fig = plot_fit(self.observation, self.map, true_source=self._true_source())
            fig.savefig(tmp / "fit.png", dpi=100)
            plt.close(fig)
            if self.posterior is not None:
                self.posterior.idata.to_netcdf(str(tmp / "posterior.nc"))
                fig = plot_corner(self.posterior, truths=self.observation.truth)
                fig.savefig(tmp / "corner.png", dpi=90)
                plt.close(fig)
                # resampled draws have no chains to trace: an umbrella run traces its windows
                fig = plot_trace(self.posterior if self.umbrella is None
                                 else self.umbrella.windows)
                fig.savefig(tmp / "trace.png", dpi=80)
                plt.close(fig)
            if self.umbrella is not None:
                self.umbrella.windows.idata.to_netcdf(str(tmp / "windows.nc"))
                fig = plot_umbrella_profile(self.umbrella)
                fig.savefig(tmp / "profile.png", dpi=90)
                plt.close(fig)
            if coolest:
                write_coolest_files(self, tmp)
        return Path(out_dir)

    def _true_source(self):
        t = self.observation.truth or {}
        if "z" in t and self.model.source_kind == "vae":
            z = self.model.tensor(t["z"])
            with torch.no_grad():
                return (float(t.get("src_amp", 1.0)) * self.model.vae.decode(z)).cpu().numpy()
        return None


def start_from_summary(model: LensModel, summary) -> dict:
    """Site values of ``model`` at the MAP of an earlier fit, to start from (``fit_lens(init=)``).

    Converts the written parameters (method.md conventions) to the sites ``model`` samples:
    ``q, phi -> e1, e2`` and ``r_ein -> theta_E = sqrt(q) r_ein`` where the model samples
    theta_E, so a fit made with either Einstein-radius coordinate can seed the other.  Sites the
    summary lacks are left out (the fit draws them from the prior).

    Parameters
    ----------
    model : LensModel
    summary : dict, or str / Path of a ``summary.json`` or of the folder holding it
        As written by :meth:`LensFit.save` (its ``"map"`` entry is used).

    Examples
    --------
    >>> from difflens.datasets.mocks import simulate_mock
    >>> obs = simulate_mock(3, noise_sigma=0.05, npix=48, pixel_scale=0.16, source="sersic")
    >>> model = build_model(obs, source="sersic", priors=Priors.default("sersic").with_theta_E())
    >>> start = start_from_summary(model, {"map": {"r_ein": 1.0, "q": 0.64, "phi": 0.0}})
    >>> sorted(start), round(float(start["theta_E"]), 6)
    (['e1', 'e2', 'theta_E'], 0.8)
    """
    if not isinstance(summary, dict):
        path = Path(summary)
        path = path / "summary.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no summary.json at {path}")
        summary = json.loads(path.read_text())
    if "map" not in summary:
        raise ValueError("the summary has no 'map' entry (write it with LensFit.save)")
    values = dict(summary["map"])
    if "q" in values and "phi" in values:
        values["e1"], values["e2"] = q_phi_to_ellipticity(model.tensor(values["q"]),
                                                          model.tensor(values["phi"]))
        if "r_ein" in values:
            values["theta_E"] = values["q"] ** 0.5 * values["r_ein"]
    sites = model.site_names()
    return {k: model.tensor(v) for k, v in values.items() if k in sites}


def fit_lens(obs: Observation, *, source="vae", priors="default", psf_sigma=None, lens_light=0,
             flux_scale="auto", supersample=1, steps=400, restarts=4, finals=1,
             encode_source=True, samples=0, warmup=200,
             chains=4, sampler="hmc", max_tree_depth=7, sample_lens_light=True, hold=(), seed=0,
             marginalise_amplitudes=False, source_correction=None, dtype=torch.float64,
             device="cpu", progress=True, init=None, checkpoint=None, pilot=None,
             pilot_flow=False, tempering=None, source_interpolation="bilinear",
             compile=False) -> LensFit:
    """MAP fit and, if ``samples > 0``, a posterior (HMC or NUTS) started at the MAP.

    Parameters
    ----------
    obs : Observation
    source : "vae" (shipped VAE), "sersic", or a VAESource
    priors : "default" or "paper" (or a Priors)
    psf_sigma : float, optional
        Gaussian PSF sigma in arcsec if ``obs`` has no kernel.
    lens_light, flux_scale, supersample, marginalise_amplitudes, dtype, device, compile :
        See :func:`build_model`; ``device="cuda"`` runs the whole fit on a GPU;
        ``dtype=torch.float32, compile=True`` samples about 3x faster on a CPU.
    source_correction : float or PixelCorrection, optional
        A pixelated correction of the VAE stamp (:func:`build_model`).
    steps, restarts, finals, encode_source : MAP settings (see :func:`difflens.infer.fit_map`)
    samples, warmup, chains : sampler settings (draws and warm-up per chain)
    sampler : "hmc" (all chains in one batched likelihood), "nuts" (Pyro, chain after chain),
        see :func:`difflens.infer.sample_posterior`; or "laplace": ``samples x chains``
        independent draws from the Gaussian approximation at the MAP
        (:func:`difflens.infer.sample_laplace`; seconds instead of minutes, exact only where the
        posterior is Gaussian; ``warmup`` unused)
    max_tree_depth : NUTS only
    sample_lens_light : bool
        With lens light: sample its parameters too (default), or hold them at the MAP so the
        posterior is that of mass and source given the light (which then ignores the light's
        uncertainty).  Holding helps where a light profile presses against a prior bound (the
        JWST ring: early HMC steps 0.05-0.2 instead of 0.01-0.03), though there warm-up still
        drifted to long trajectories.
    hold : sequence of str
        Further scalar sites held at their MAP while sampling (:meth:`LensFit.sample`).
    seed : int
        Makes the whole fit reproducible.
    init : dict, or str / Path, optional
        Site values for the first MAP restart, or an earlier fit's ``summary.json`` (or its
        folder), converted by :func:`start_from_summary`.
    checkpoint : str or Path, optional
        HMC state file: the sampler saves its state there as it runs, and the same call resumes
        an interrupted run from it (same draws).  The MAP the run started from is kept beside
        it (``<checkpoint>.map.pt``); where that file exists the MAP is read from it instead of
        searched again (``steps``, ``restarts``, ``init`` ... then unused), so runs whose MAP
        search is not bit-reproducible (float32, ``compile``) resume too.
    pilot : Posterior, arviz.InferenceData or str / Path, optional
        HMC only: an earlier posterior of the same model (e.g. its ``posterior.nc``) whose
        draws' covariance whitens the sampler in place of the Laplace approximation, with
        chains started at its draws and no metric adaptation
        (:func:`difflens.infer.sample_posterior`); for posteriors too curved or too slow for
        warm-up to measure.
    pilot_flow : bool
        With ``pilot``: also fit a normalising flow to the pilot's draws and run HMC in its
        latent space (NeuTra, :func:`difflens.infer.mcmc.pilot_flow_fit`), for curved ridges
        that a covariance cannot make round.
    tempering : int or sequence of float, optional
        HMC only: parallel tempering, each of the ``chains`` a ladder of K chains at inverse
        temperatures from 1 down (an int K spaces them for the model's dimension), exchanging
        positions; for posteriors with modes or ridge ends that plain chains cross too rarely
        (:func:`difflens.infer.sample_posterior`).  Costs K times the chains.
    source_interpolation : "bilinear" or "cubic"
        As in :func:`build_model`.

    Examples
    --------
    >>> from difflens.datasets.mocks import simulate_mock
    >>> obs = simulate_mock(3, noise_sigma=0.05, npix=96, pixel_scale=0.08, source="sersic")
    >>> fit = fit_lens(obs, source="sersic", steps=800, restarts=2, samples=200)  # doctest: +SKIP
    >>> print(fit.table()); fit.save("fit_output")                                # doctest: +SKIP
    """
    if sampler not in ("hmc", "nuts", "laplace"):     # before the MAP, not after it
        raise ValueError(f"sampler must be 'hmc', 'nuts' or 'laplace', got {sampler!r}")
    if checkpoint is not None and sampler != "hmc":
        raise ValueError(f"checkpoints are kept by sampler='hmc' only, not by {sampler!r}")
    if pilot is not None and sampler != "hmc":
        raise ValueError(f"a pilot posterior is used by sampler='hmc' only, not by {sampler!r}")
    if pilot_flow and pilot is None:
        raise ValueError("pilot_flow fits a flow to a pilot's draws: pass pilot too")
    if tempering is not None and sampler != "hmc":
        raise ValueError(f"tempering is done by sampler='hmc' only, not by {sampler!r}")
    if pilot is not None:
        pilot = read_pilot(pilot)                  # a missing or unreadable file: before the MAP
    model = build_model(obs, source=source, priors=priors, psf_sigma=psf_sigma,
                        lens_light=lens_light, flux_scale=flux_scale, supersample=supersample,
                        marginalise_amplitudes=marginalise_amplitudes,
                        source_correction=source_correction,
                        source_interpolation=source_interpolation, dtype=dtype, device=device,
                        compile=compile)
    model.check_site_names(hold, "hold")           # before the MAP, not after it
    if init is not None and not isinstance(init, dict):
        init = start_from_summary(model, init)
    result = None if checkpoint is None else _kept_map(model, checkpoint)
    if result is None:
        result = fit_map(model, steps=steps, restarts=restarts, finals=finals,
                         encode_source=encode_source, seed=seed, progress=progress, init=init)
    elif progress:
        print(f"MAP read from {_kept_map_path(checkpoint)} (the run being resumed started there)")
    fit = LensFit(obs, model, result)
    if samples > 0:
        fit = fit.sample(samples, warmup=warmup, chains=chains, sampler=sampler,
                         max_tree_depth=max_tree_depth, sample_lens_light=sample_lens_light,
                         hold=hold, seed=seed, progress=progress, checkpoint=checkpoint,
                         pilot=pilot, pilot_flow=pilot_flow, tempering=tempering)
    return fit


def fit_lenses(observations, *, source="vae", priors="default", psf_sigma=None, lens_light=0,
               flux_scale="auto", supersample=1, steps=1000, restarts=8, encode_source=True,
               finals=2, chunk=64, samples=0, warmup=300, chains=4, sampler="hmc",
               tempering=None, seed=0,
               marginalise_amplitudes=False, source_correction=None,
               source_interpolation="bilinear", dtype=torch.float64, device="cpu",
               progress=True) -> list:
    """MAP fits (and posteriors) of many observations at once, vectorised over lenses.

    The MAP is :func:`difflens.infer.fit_map_batch`; with ``samples > 0`` the posteriors follow
    from :func:`difflens.infer.sample_posterior_batch` (all lenses x chains in one HMC batch).

    All observations must share the grid (shape, pixel scale) and the PSF, as survey cutouts do;
    their images, noise and masks differ.  One model is built and re-used for every lens
    (:meth:`LensModel.with_data`), so a thousand lenses share one VAE decoder.

    Parameters
    ----------
    observations : list of Observation
    source, priors, psf_sigma, lens_light, supersample, marginalise_amplitudes, dtype, device :
        As in :func:`build_model` (``device="cuda"``: every lens and chain on one GPU).
    source_correction : float or PixelCorrection, optional
        As in :func:`build_model`.
    source_interpolation : "bilinear" or "cubic"
        How the VAE stamp is read between its pixels, as in :func:`build_model`.
    flux_scale : float or "auto"
        Centre of the amplitude priors, shared by all lenses; "auto" takes the median of
        :func:`data_flux_scale` over the observations.
    steps, restarts : int
        Adam steps of the final run and restarts per lens (all lenses' restarts run as one batch;
        default 8, see :func:`difflens.infer.fit_map_batch`).
    encode_source : bool
        With a VAE source, one more short run per lens from the source read off its arcs
        (see :func:`difflens.infer.fit_map_batch`).
    finals : int or "all"
        Best short runs per lens continued with Adam; the highest log posterior is kept.
    chunk : int
        Lenses (x restarts) per batched likelihood call of the MAP: bounds memory.
    samples, warmup, chains : int
        HMC draws kept and warm-up iterations per chain, chains per lens (``samples=0``: MAP
        only).  The HMC batch holds every lens x chain at once: split very large sets.
    sampler : "hmc" or "laplace"
        ``"laplace"``: ``samples x chains`` independent draws per lens from the Gaussian
        approximation at its MAP (:func:`difflens.infer.sample_laplace`), lens after lens.
    tempering : int or sequence of float, optional
        HMC only: parallel tempering, every lens's chains each a ladder of K tempered chains
        (as in :func:`fit_lens`); the batch then holds lenses x chains x K chains.

    Returns
    -------
    list of LensFit
        One per observation, with ``posterior`` when ``samples > 0``.

    Examples
    --------
    >>> from difflens.datasets.mocks import simulate_mock
    >>> mocks = [simulate_mock(s, npix=64, pixel_scale=0.12, source="sersic") for s in range(8)]
    >>> fits = fit_lenses(mocks, source="sersic", steps=600, restarts=2)   # doctest: +SKIP
    >>> [f.map.lens()["r_ein"] for f in fits]                              # doctest: +SKIP
    """
    from .infer import fit_map_batch, sample_posterior_batch

    observations = list(observations)
    if not observations:
        raise ValueError("fit_lenses needs at least one observation")
    if sampler not in ("hmc", "laplace"):
        raise ValueError(f"fit_lenses samples with 'hmc' or 'laplace', got {sampler!r}")
    if tempering is not None and sampler != "hmc":
        raise ValueError(f"tempering is done by sampler='hmc' only, not by {sampler!r}")
    first = observations[0]
    for i, obs in enumerate(observations[1:], 1):
        if obs.shape != first.shape or obs.pixel_scale != first.pixel_scale:
            raise ValueError(f"observation {i} has grid {obs.shape} at {obs.pixel_scale}\"/px, "
                             f"observation 0 {first.shape} at {first.pixel_scale}\"/px: "
                             "fit_lenses needs one grid")
        same_psf = (obs.psf is None and first.psf is None) or (
            obs.psf is not None and first.psf is not None and obs.psf.shape == first.psf.shape
            and np.array_equal(obs.psf, first.psf))
        if not same_psf:
            raise ValueError(f"observation {i} has a different PSF from observation 0")
    if flux_scale == "auto":
        flux_scale = float(np.median([data_flux_scale(o) for o in observations]))
    model = build_model(first, source=source, priors=priors, psf_sigma=psf_sigma,
                        lens_light=lens_light, flux_scale=flux_scale, supersample=supersample,
                        marginalise_amplitudes=marginalise_amplitudes,
                        source_correction=source_correction,
                        source_interpolation=source_interpolation, dtype=dtype, device=device)
    models = [model] + [model.with_data(o.image, o.noise_sigma, o.mask)
                        for o in observations[1:]]
    results = fit_map_batch(models, steps=steps, restarts=restarts, encode_source=encode_source,
                            finals=finals, chunk=chunk, seed=seed, progress=progress)
    posts = [None] * len(models)
    if samples > 0 and sampler == "laplace":
        posts = [sample_laplace(m, r.sample_sites(), num_samples=samples * chains, seed=seed + i)
                 for i, (m, r) in enumerate(zip(models, results))]
    elif samples > 0:
        posts = sample_posterior_batch(models, [r.sample_sites() for r in results],
                                       num_samples=samples, warmup=warmup, chains=chains,
                                       tempering=tempering, seed=seed, progress=progress)
    return [LensFit(o, m, r, p) for o, m, r, p in zip(observations, models, results, posts)]

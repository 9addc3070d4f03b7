"""Every tensor a fit makes lives on the model's device (CPU or GPU).

No GPU is needed to test this: inside :class:`NoDefaultDevice` every tensor created without
naming its device (a factory like ``torch.zeros(n)``, or a conversion of a number or numpy array)
is put on PyTorch's data-less ``meta`` device.  Code that would leave such a tensor on the CPU
while the model sits on a GPU then fails here as it would there (mixing devices), while code that
takes its device from the model runs normally on the CPU.  The CUDA test at the end runs where a
GPU is present.
"""
import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from difflens.datasets.mocks import simulate_mock
from difflens.fitting import LensFit, build_model, fit_lens
from difflens.infer import fit_map, fit_map_batch, sample_posterior, sample_posterior_batch
from difflens.model import Priors
from difflens.sources.vae_training import TrainConfig, train_vae

_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.arange,
              torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint,
              torch.randperm, torch.tensor, torch.scalar_tensor}
_CONVERSIONS = {torch.as_tensor, torch.asarray}


class NoDefaultDevice(TorchFunctionMode):
    """Tensors made without naming a device land on ``meta`` (tensors passed through
    ``as_tensor`` keep theirs, as they would on a GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is None and (
                func in _FACTORIES or (func in _CONVERSIONS and not torch.is_tensor(args[0]))):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _unvalidated(prior):
    """A copy of ``prior`` (and of its base) that does not check the support: the check reads
    the values, which meta tensors do not have."""
    prior = copy.copy(prior)
    prior._validate_args = False
    if hasattr(prior, "base_dist"):
        prior.base_dist = _unvalidated(prior.base_dist)
    return prior


def _mock(seed=3):
    return simulate_mock(seed, noise_sigma=0.1, npix=32, pixel_scale=0.16, source="sersic")


def test_guard_catches_a_tensor_made_without_its_device():
    x = torch.ones(3)
    with NoDefaultDevice():
        assert (x + torch.zeros(3, device=x.device)).device == x.device
        with pytest.raises((RuntimeError, NotImplementedError)):
            float((x + torch.zeros(3)).sum())           # forgot device=: not on x's device


@pytest.mark.parametrize("source, lens_light, marginalise", [
    ("sersic", 1, False),
    ("vae", 1, True),
])
def test_map_posterior_and_outputs_keep_the_model_device(source, lens_light, marginalise,
                                                         tmp_path):
    obs = _mock()
    model = build_model(obs, source=source, lens_light=lens_light,
                        marginalise_amplitudes=marginalise)
    with NoDefaultDevice():
        result = fit_map(model, steps=20, restarts=2, restart_steps=15, polish_steps=3,
                         finals=2, progress=False)
        post = sample_posterior(model, result.sample_sites(), num_samples=4, warmup=4, chains=2,
                                progress=False, checkpoint=tmp_path / "hmc.pt")
        fit = LensFit(obs, model, result, post)
        fit.save(tmp_path / "out", coolest=True)
    assert result.params["r_ein"].device == model.device
    assert (tmp_path / "out" / "summary.json").exists()


def test_batched_fits_keep_the_model_device():
    first = build_model(_mock(0), source="sersic")
    models = [first] + [first.with_data(o.image, o.noise_sigma) for o in map(_mock, (1, 2))]
    with NoDefaultDevice():
        results = fit_map_batch(models, steps=15, restarts=2, restart_steps=10, polish_steps=2,
                                progress=False)
        posts = sample_posterior_batch(models, [r.sample_sites() for r in results],
                                       num_samples=3, warmup=3, chains=2, progress=False)
    assert len(posts) == 3


@pytest.mark.parametrize("preset", ["default", "paper"])
@pytest.mark.parametrize("source", ["sersic", "vae"])
def test_prior_log_density_stays_on_the_values_device(preset, source):
    """Prior constants are 0-d host tensors; a batch of values elsewhere (here ``meta``) must get
    its log density there (torch's Uniform casts to the bound's device: the case this guards)."""
    priors = Priors.preset(preset, source, lens_light=1, flux_scale=1.0)
    sites = dict(priors.lens)
    sites.update({"src_" + k: v for k, v in priors.source.items()})
    sites.update({f"light0_{k}": v for k, v in priors.lens_light[0].items()})
    checked = 0
    for name, prior in sites.items():
        if not hasattr(prior, "log_prob"):
            continue                                   # a fixed number or a tied centre
        value = torch.empty(5, dtype=torch.float32, device="meta")
        assert _unvalidated(prior).log_prob(value).device.type == "meta", name
        checked += 1
    assert checked >= 10


def test_unusable_devices_are_clear_errors():
    obs = _mock()
    with pytest.raises(ValueError, match="device"):
        build_model(obs, source="sersic", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            build_model(obs, source="sersic", device="cuda")
        with pytest.raises(ValueError, match="no CUDA"):
            train_vae(torch.zeros(2, 64, 64).numpy(), torch.zeros(1, 64, 64).numpy(), "unused",
                      config=TrainConfig(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_cuda_matches_cpu():
    obs = simulate_mock(3, noise_sigma=0.1, npix=64, pixel_scale=0.08, source="sersic")
    kw = dict(source="sersic", steps=300, restarts=2, samples=20, warmup=20, chains=2,
              progress=False)
    gpu, cpu = fit_lens(obs, device="cuda", **kw), fit_lens(obs, device="cpu", **kw)
    assert gpu.model.device.type == "cuda"
    assert gpu.map.params["r_ein"].device.type == "cuda"
    assert gpu.map.log_posterior == pytest.approx(cpu.map.log_posterior, abs=1.0)
    assert gpu.posterior.summary()["r_ein"]["mean"] == pytest.approx(
        cpu.posterior.summary()["r_ein"]["mean"], rel=0.05)

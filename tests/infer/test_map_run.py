"""The Adam loop of the MAP fit never returns a point worse than the best one it visited."""
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_value

from difflens.infer.map import _run


def _model():
    x = pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    pyro.sample("obs", dist.Normal(x, 0.01), obs=torch.tensor(1.0, dtype=torch.float64))


def _loss(values):
    pyro.clear_param_store()
    guide = AutoDelta(_model, init_loc_fn=init_to_value(values=values))
    with torch.no_grad():
        return float(Trace_ELBO().differentiable_loss(_model, guide))


def test_adam_that_overshoots_returns_the_best_point_visited():
    # started at the optimum (x ~ 1) with a learning rate far too large for a 0.01-wide well
    start = {"x": torch.tensor(0.9999, dtype=torch.float64)}
    values, losses = _run(_model, init_to_value(values=start), steps=15, lr=3.0,
                          lr_final_fraction=1.0, tol=0.0, window=5, progress=False,
                          desc="", seed=0)
    assert max(losses) > losses[0] + 100          # Adam did leave the optimum...
    assert _loss(values) <= _loss(start) + 1e-9   # ...but the result is where it was best
    assert abs(float(values["x"]) - 0.9999) < 1e-6
    pyro.clear_param_store()

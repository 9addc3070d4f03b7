"""The Adam loop of the MAP fit never returns a point worse than the best one it visited, and
rows of one batch follow the paths they would follow alone."""
import numpy as np
import torch

from difflens.infer.map import _adam_rows, _polish_rows


def _well(width):
    """Rows -> potential of independent 1-d Gaussian wells centred on 1 with ``width``."""
    return lambda rows: (lambda u: 0.5 * ((u[:, 0] - 1.0) / width) ** 2)


def test_adam_that_overshoots_returns_the_best_point_visited():
    # started at the optimum (x ~ 1) with a learning rate far too large for a 0.01-wide well
    u0 = torch.tensor([[0.9999]], dtype=torch.float64)
    history, u, loss = _adam_rows(_well(0.01), u0, steps=15, lr=3.0, lr_final_fraction=1.0,
                                  tol=0.0, window=5, chunk=1, progress=False, desc="")
    assert history.max() > history[0, 0] + 100        # Adam did leave the optimum...
    assert abs(float(u[0, 0]) - 0.9999) < 1e-12        # ...but the result is where it was best
    assert abs(float(loss[0]) - 0.5 * (0.0001 / 0.01) ** 2) < 1e-12     # and its loss is that


def test_rows_are_independent_and_chunks_do_not_matter():
    u0 = torch.tensor([[0.0], [3.0], [-2.0]], dtype=torch.float64)
    together = _adam_rows(_well(0.5), u0, 40, 0.1, 0.5, 0.0, 10, 3, False, "")
    apart = [_adam_rows(_well(0.5), u0[i:i + 1], 40, 0.1, 0.5, 0.0, 10, 1, False, "")
             for i in range(3)]
    for i, (history, u, _) in enumerate(apart):
        assert np.allclose(together[0][:, i], history[:, 0], rtol=0, atol=1e-12)
        assert torch.allclose(together[1][i], u[0], rtol=0, atol=1e-12)


def test_polish_reaches_the_optimum_and_reports_its_evaluations():
    u0 = torch.tensor([[0.7], [1.4]], dtype=torch.float64)
    u, seen = _polish_rows(_well(0.01), u0, max_iter=50, chunk=2)
    assert torch.allclose(u, torch.ones_like(u), atol=1e-8)
    assert len(seen) >= 2 and seen[-1] < seen[0]

"""Maximising the evidence with the correction integrated out (difflens.infer.evidence.
maximise_evidence) against independent truth: finite differences of the exact evidence
(correction_evidence, itself tested against the dense Gaussian marginal) and the sparse response
matrix of the correction."""
import pytest
import torch

from difflens.infer.evidence import (_integrate, _probes, correction_evidence,
                                     correction_images, correction_precision, correction_response,
                                     maximise_evidence, pixel_weights)
from difflens.infer.hmc import FlatSites
from difflens.infer.map import _row_values
from difflens.sources.vae import load_default_vae

from .test_correction_evidence import _model

CHECKED = ("r_ein", "e1", "e2", "gamma", "x0", "y0", "g1", "g2", "src_s", "src_amp")


@pytest.fixture(scope="module")
def vae():
    return load_default_vae().double()


def _offsets(space):
    """Position of each scalar site in the flat unconstrained vector."""
    ends = torch.cumsum(torch.tensor(space.sizes), 0).tolist()
    return {k: e - s for k, e, s in zip(space.names, ends, space.sizes)}


def _evidence_gradient(model, space, u, names, h=1e-5):
    """Central finite differences of the exact log evidence in the unconstrained coordinates of
    each site in ``names``."""
    def evidence(x):
        return correction_evidence(model, _row_values(space, x)).log_evidence

    out = {}
    for k, i in _offsets(space).items():
        if k in names:
            step = torch.zeros_like(u)
            step[i] = h
            out[k] = (evidence(u + step) - evidence(u - step)) / (2 * h)
    return out


def _bound(model, space, P, c):
    """Minus the minorant of maximise_evidence at rows ``u`` (the function it minimises)."""
    weight = torch.as_tensor(pixel_weights(model)).reshape(model.data.shape)
    potential = space.potential(model, jacobian=False)

    def f(u):
        Gv = correction_images(model, space.constrained(u), P)
        return potential(u) + 0.5 * c * (weight * Gv * Gv).sum()
    return f


def test_correction_images_match_the_response_matrix(vae):
    model, values = _model(vae, 4, 0.3, supersample=2)
    w = torch.randn(3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = torch.as_tensor(correction_response(model, values).toarray())
    images = correction_images(model, {k: v[None] for k, v in values.items()}, w)
    assert images.shape == (3, 12, 12)
    assert torch.allclose(images.reshape(3, -1), w @ G.T, atol=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(mask=True, noise_map=True)])
def test_the_bound_touches_the_evidence_with_its_gradient(vae, options):
    """At theta_0, with w at its posterior mean and the exact trace, the minorant's gradient in
    the other sites equals that of the exact log evidence (finite differences), and moving
    away it stays below the evidence."""
    n = 4
    model, values = _model(vae, n, 0.3, **options)
    ev, root = _integrate(model, values)
    space = FlatSites(model)
    u0 = space.flatten(dict(values, src_correction=ev.w_mean))
    P, c = _probes(root, None, None)
    f = _bound(model, space, torch.as_tensor(P.T.copy()), c)
    u = u0[None].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(u).sum(), u)
    expected = _evidence_gradient(model, space, u0, CHECKED)
    offsets = _offsets(space)
    scale = max(abs(v) for v in expected.values())
    assert scale > 1.0                                       # the start is not a maximum
    for k, g in expected.items():
        assert -float(grad[0, offsets[k]]) == pytest.approx(g, abs=1e-4 * scale), k
    # the minorant: -f differs from the evidence by a constant at u0 and lies below it elsewhere
    gap0 = correction_evidence(model, values).log_evidence + float(f(u0[None]))
    step = torch.zeros_like(u0)
    step[offsets["r_ein"]], step[offsets["gamma"]] = 0.05, -0.1
    moved = u0 + step
    gap = correction_evidence(model, _row_values(space, moved)).log_evidence + float(
        f(moved[None]))
    assert gap > gap0 + 1e-6


def test_maximise_evidence_climbs_to_a_stationary_point(vae):
    """From a point off the maximum the exact evidence rises round by round and ends where its
    finite-difference gradient nearly vanishes."""
    n = 4
    model, values = _model(vae, n, 0.3)
    start = dict(values, r_ein=values["r_ein"] * 1.04, gamma=values["gamma"] - 0.08)
    result = maximise_evidence(model, start, probes=None, rounds=12, max_iter=200, tol=1e-4,
                               progress=False)
    assert all(b > a for a, b in zip(result.history, result.history[1:]))
    assert result.log_evidence > result.history[0] + 1.0
    assert result.log_evidence == pytest.approx(
        correction_evidence(model, result.values).log_evidence, abs=1e-9)
    space = FlatSites(model)
    u0 = space.flatten(dict(start, src_correction=values["src_correction"]))
    u1 = space.flatten(result.values)
    before = _evidence_gradient(model, space, u0, CHECKED)
    after = _evidence_gradient(model, space, u1, CHECKED)
    assert max(map(abs, after.values())) < 0.1 * max(map(abs, before.values()))
    # no step along the remaining steepest-ascent direction gains a tenth of a nat
    offsets = _offsets(space)
    direction = torch.zeros_like(u1)
    for k, g in after.items():
        direction[offsets[k]] = g
    direction = direction / direction.norm()
    for t in (1e-5, 1e-4, 1e-3, 1e-2):
        moved = correction_evidence(model, _row_values(space, u1 + t * direction)).log_evidence
        assert moved < result.log_evidence + 0.1


def test_random_probes_estimate_the_trace(vae):
    """S S^T = A^-1 (the eigenvalues of correction_precision give tr A^-1 independently), and
    c P P^T estimates it: its trace within the Monte-Carlo error."""
    model, values = _model(vae, 4, 0.3)
    ev, root = _integrate(model, values)
    exact = float((1.0 / (1.0 + correction_precision(model, values)[2])).sum())   # tr A^-1
    assert 16 - ev.n_constrained == pytest.approx(exact, rel=1e-10)
    _, _, lam, vec = correction_precision(model, values)
    assert abs(root @ root.T - (vec / (1.0 + lam)) @ vec.T).max() < 1e-12
    P, c = _probes(root, 4000, torch.Generator().manual_seed(0))
    assert c * float((P * P).sum()) == pytest.approx(exact, rel=0.03)


def test_bad_settings_are_refused(vae):
    model, values = _model(vae, 4, 0.3)
    with pytest.raises(ValueError, match="probes"):
        maximise_evidence(model, values, probes=0, progress=False)
    with pytest.raises(ValueError, match="rounds"):
        maximise_evidence(model, values, rounds=0, progress=False)
    with pytest.raises(ValueError, match="extrapolate"):
        maximise_evidence(model, values, extrapolate=-1, progress=False)

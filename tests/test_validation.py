"""The validation studies' bookkeeping (validation/coverage.py, evidence_modes.py) on hand-made
records."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "validation" / "coverage.py"


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("coverage_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(coverage, rel_errors, phi_err=0.0, chi2=1.0):
    truth = dict(r_ein=1.5, q=0.8, phi=1.5, gamma=2.0, x0=0.0, y0=0.0, g1=0.01, g2=-0.02)
    fit = dict(truth)
    for k, e in rel_errors.items():
        fit[k] = truth[k] * (1 + e)
    fit["phi"] = truth["phi"] + phi_err
    params = {k: dict(truth=truth[k], map=fit[k]) for k in coverage.PARAMS}
    params["theta_E"] = dict(truth=math.sqrt(truth["q"]) * truth["r_ein"],
                             map=math.sqrt(fit["q"]) * fit["r_ein"])
    return dict(seed=0, reduced_chi2=chi2, snr=100.0, galaxy=0, params=params)


def test_map_bias_summary_medians(coverage):
    recs = [_record(coverage, dict(r_ein=e, gamma=-2 * e)) for e in (0.01, -0.02, 0.03)]
    s = coverage.summarise_map(recs)
    assert s["r_ein"]["median_rel"] == pytest.approx(0.01)
    assert s["r_ein"]["median_abs_rel"] == pytest.approx(0.02)
    assert s["gamma"]["median_rel"] == pytest.approx(-0.02)
    assert s["gamma"]["frac_abs_rel_below_1pc"] == 0.0
    # q exact, so theta_E = sqrt(q) r_ein carries r_ein's relative error
    assert s["theta_E"]["median_rel"] == pytest.approx(0.01)
    assert s["n"] == 3 and s["failure_rate"] == 0.0


def test_map_bias_summary_wraps_phi_and_counts_failures(coverage):
    # the ellipse has period pi: an error of pi - 0.01 is an error of -0.01
    recs = [_record(coverage, {}, phi_err=math.pi - 0.01, chi2=1.3),
            _record(coverage, {}, phi_err=0.02)]
    s = coverage.summarise_map(recs)
    assert s["phi"]["median_abs"] == pytest.approx(0.015)
    assert s["failure_rate"] == 0.5


def test_coverage_summary_counts_truths_inside_intervals(coverage):
    # quantile of the truth in the posterior: 0.5 (centre), 0.1 (inside 95% only), 0.01 (out)
    recs = []
    for u in (0.5, 0.1, 0.01, 0.9):
        recs.append(dict(seed=0, reduced_chi2=1.0, rhat=1.0,
                         params={k: dict(quantile=u, z=0.0, mean=1.0, truth=1.0)
                                 for k in coverage.PARAMS}))
    s = coverage.summarise(recs)
    assert s["r_ein"]["cover68"] == pytest.approx(0.25)
    assert s["r_ein"]["cover95"] == pytest.approx(0.75)
    assert np.isclose(s["gamma"]["median_abs_rel_bias"], 0.0)


def test_compare_records_pairs_seeds_and_derives_theta_e():
    spec = importlib.util.spec_from_file_location("compare_records",
                                                  SCRIPT.with_name("compare_records.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(seed, r_ein, q, log_post):
        return dict(seed=seed, galaxy=seed % 7, reduced_chi2=1.0, log_posterior=log_post,
                    params=dict(r_ein=dict(truth=1.5, map=r_ein), q=dict(truth=0.64, map=q),
                                gamma=dict(truth=2.0, map=2.02)))

    # r_ein +10% with q -17.36% keeps theta_E = sqrt(q) r_ein at the truth (1.1^2 * 0.8264 = 1)
    a = [record(0, 1.65, 0.64 / 1.21, 100.0), record(1, 1.5, 0.64, 50.0), record(5, 1.0, 0.5, 0.0)]
    b = [record(1, 1.53, 0.64, 40.0), record(0, 1.5, 0.64, 130.0)]
    rows, (med_a, med_b) = module.compare(a, b)
    assert [row[0] for row in rows] == [0, 1]                 # seed 5 is in one run only
    seed0 = rows[0]
    assert seed0[2]["r_ein"] == pytest.approx(10.0)
    assert seed0[2]["theta_E"] == pytest.approx(0.0, abs=1e-9)
    assert seed0[2]["gamma"] == pytest.approx(1.0)
    assert seed0[6] == pytest.approx(30.0) and rows[1][6] == pytest.approx(-10.0)
    assert med_a["r_ein"] == pytest.approx(5.0) and med_b["r_ein"] == pytest.approx(1.0)


def test_evidence_modes_table_and_figure(tmp_path, capsys):
    """validation/evidence_modes.py on hand-made from_truth.py records: the medians it prints
    are those of the records, and the figure is written."""
    import json

    spec = importlib.util.spec_from_file_location(
        "evidence_modes", SCRIPT.parent / "evidence_modes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(seed, joint, best):
        err = lambda x: dict(r_ein=x, gamma=-2 * x, theta_E=0.5 * x)  # noqa: E731
        # hand-made Laplace summaries: |z| = |error| / 2, inside 68% where |z| < 1
        lap = lambda x: {k: dict(z=x / 2, in68=abs(x) < 2, in95=abs(x) < 4)  # noqa: E731
                         for k in module.COVERED}
        return dict(seed=seed, error_percent=err(joint), laplace=lap(joint),
                    evidence_max=dict(error_percent=err(best), gain=5.0, laplace=lap(best)))

    path = tmp_path / "records.jsonl"
    rows = [record(0, 1.0, -0.5), record(1, -3.0, 0.2), record(2, 2.0, 4.0), dict(seed=3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    figure = tmp_path / "errors.png"
    module.main([str(path), "--out", str(figure)])
    out = capsys.readouterr().out.splitlines()
    last = [line for line in out if line.startswith("median")]
    assert last == ["median |error| | 2.00 / 4.00 / 1.00 | 0.50 / 1.00 / 0.25",
                    "median error | +1.00 / -2.00 / +0.50 | +0.20 / -0.40 / +0.10"]
    # joint errors 1, -3, 2: inside 68% for 1 (|x| < 2), inside 95% for all; median |z| 1.0;
    # evidence maximum -0.5, 0.2, 4: inside 68% twice, 95% twice (4 is not < 4); median 0.25
    cover = [line for line in out if line.startswith("Laplace coverage")]
    assert "r_ein 1/3 of 3 (1.0)" in cover[0] and "joint mode" in cover[0]
    assert "gamma 2/2 of 3 (0.2)" in cover[1] and "evidence maximum" in cover[1]
    assert figure.stat().st_size > 1000
    empty = tmp_path / "empty.jsonl"                # no record with an evidence maximum
    empty.write_text(json.dumps(dict(seed=0)) + "\n")
    with pytest.raises(SystemExit):
        module.main([str(empty)])


@pytest.mark.parametrize("framed", [False, True])
def test_evidence_terms_add_up(framed):
    """validation/evidence_terms.py's terms on a small corrected model obey the Gaussian
    integral over the whitened correction: log evidence = log joint at w* + n^2/2 log(2 pi)
    - 1/2 log det A, with the joint from summarise_map (an independent code path).  Shrinking
    the stamp changes how many correction values the data constrain when the grid is on the
    stamp, and not when it is fixed on the source plane (curvature-regularised here)."""
    import torch

    from difflens.sources.vae import load_default_vae

    from .infer.test_correction_evidence import FRAME, _model

    spec = importlib.util.spec_from_file_location(
        "evidence_terms", SCRIPT.parent / "evidence_terms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = dict(regularisation="curvature", frame=FRAME) if framed else {}
    model, values = _model(load_default_vae().double(), 4, 0.3, **options)
    t = module.terms(model, values)
    assert t["log_evidence"] == pytest.approx(
        t["log_posterior_at_w_star"] + 8 * math.log(2 * math.pi) + t["occam"], abs=0.15)
    assert 0 < t["n_constrained"] < 16 and t["occam"] < 0
    assert t["src_s"] == pytest.approx(float(values["src_s"]), abs=1e-4)
    moved = dict(values, src_s=torch.as_tensor(float(values["src_s"]) * 0.8))
    if framed:
        assert module.terms(model, moved)["n_constrained"] == pytest.approx(t["n_constrained"])
    else:
        assert module.terms(model, moved)["n_constrained"] != pytest.approx(t["n_constrained"])


def test_evidence_line_parabola_peak():
    """validation/evidence_terms.py --line's peak: the vertex of a sampled parabola is recovered
    exactly; a best value at an end of the line gives None."""
    spec = importlib.util.spec_from_file_location(
        "evidence_terms", SCRIPT.parent / "evidence_terms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ts = [-0.5, 0.0, 0.5, 1.0, 1.5]
    for vertex in (0.0, 0.37, 0.9):
        values = [100.0 - 7.0 * (t - vertex) ** 2 for t in ts]
        assert module.parabola_peak(ts, values) == pytest.approx(vertex)
    assert module.parabola_peak(ts, [5.0 - t for t in ts]) is None      # best at t = -0.5
    assert module.parabola_peak(ts, [1.0] * 5) is None                  # flat: best at an end
    # a tie: the parabola through (-0.5, 0), (0, 1), (0.5, 1) peaks half-way, at 0.25
    assert module.parabola_peak(ts, [0.0, 1.0, 1.0, 1.0, 0.0]) == pytest.approx(0.25)


def test_oracle_source_recovers_a_nearly_noiseless_mock():
    """validation/oracle_source.py: a galaxy-source mock (galaxy 1 of 2, rotated by 90
    degrees for seed 3) at tiny noise, fitted with the stamp ``galaxy_stamp`` gives, returns
    the true lens within 4 of its (tiny) Fisher sds, a few 1e-5 relative -- which fails if the
    stamp's rotation, the ellipticity convention or the placement parameters do not match the
    simulation."""
    spec = importlib.util.spec_from_file_location(
        "oracle_source", SCRIPT.parent / "oracle_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    from difflens.datasets.mocks import galaxy_stamp, simulate_mock

    y, x = np.mgrid[-1:1:64j, -1:1:64j]
    blobs = [np.exp(-((x - 0.3) ** 2 + (y + 0.1) ** 2) / 0.05)
             + 0.5 * np.exp(-((x + 0.2) ** 2 + (y - 0.4) ** 2) / 0.02),
             np.exp(-((x + 0.25) ** 2 / 0.08 + (y - 0.2) ** 2 / 0.02))
             + 0.7 * np.exp(-((x - 0.35) ** 2 + (y + 0.3) ** 2) / 0.01)]
    obs = simulate_mock(3, noise_sigma=1e-4, npix=48, pixel_scale=0.12, source="galaxy",
                        galaxies=np.stack(blobs))
    assert (obs.truth["galaxy"], obs.truth["rotation_deg"]) == (1, 90)
    est, truth, cov, chi2 = module.oracle_fit(obs, torch.as_tensor(galaxy_stamp(blobs, 3)[0]))
    sd = np.sqrt(np.diag(cov.numpy()))
    assert np.all(sd < 1e-3 * truth.numpy())
    assert np.all(np.abs((est - truth).numpy()) < 4 * sd)
    assert chi2 / obs.image.size == pytest.approx(1.0, abs=0.1)


def test_oracle_source_vae_drawing_of_a_decode_is_the_decode():
    """validation/oracle_source.py --template vae: the VAE's closest drawing of a stamp it
    decoded itself (peak-normalised) is that stamp, to 1% of its norm (~1e-4 in practice; a
    real galaxy leaves 11-160%)."""
    import torch

    from difflens.sources.vae import load_default_vae

    spec = importlib.util.spec_from_file_location(
        "oracle_source", SCRIPT.parent / "oracle_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vae = load_default_vae(with_encoder=True)
    with torch.no_grad():
        z = vae.prior.mean + 0.5 * (vae.prior.scale_tril / 3.0) @ torch.randn(
            vae.prior.mean.shape[0], generator=torch.Generator().manual_seed(1))
        stamp = vae.decode(z[None].to(vae.prior.mean.dtype).float())[0].double()
    stamp = stamp / stamp.max()
    drawing = module.vae_drawing(stamp, vae)
    assert float(drawing.max()) == pytest.approx(1.0)
    assert float((drawing - stamp).norm() / stamp.norm()) < 0.01


def test_oracle_source_main_reads_vae_dir_and_records_failed_fits(tmp_path, monkeypatch, capsys):
    """validation/oracle_source.py end to end on a small stand-in: ``--vae-dir`` loads those
    weights (a tiny untrained VAE here: its drawing of a blob is poor, so the recorded template
    residual is large), a fit that leaves the lens's domain is one ``failed`` line naming the
    reason and the study goes on with the next seed."""
    import torch

    from difflens.sources.vae import Decoder, Encoder, LatentPrior, VAEConfig, VAESource

    spec = importlib.util.spec_from_file_location(
        "oracle_source", SCRIPT.parent / "oracle_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    cfg = VAEConfig(width=0.125)
    tiny = VAESource(Decoder(cfg).eval(), LatentPrior(torch.zeros(64), torch.eye(64)), cfg,
                     Encoder(cfg).eval(), {})
    tiny.save(tmp_path / "vae_decoder.pt", tmp_path / "vae_encoder.pt")
    y, x = np.mgrid[-1:1:64j, -1:1:64j]
    blobs = np.stack([np.exp(-((x - 0.2) ** 2 + y ** 2) / 0.05)] * 2)
    split_of = []        # whose card names the held-out galaxies
    monkeypatch.setattr(module, "held_out_galaxies", lambda root, vae, apodise: (
        split_of.append(vae.config), (blobs, None))[1])
    small = module.simulate_mock
    monkeypatch.setattr(module, "simulate_mock", lambda seed, **kw: small(
        seed, npix=32, pixel_scale=0.16, **kw))
    seen = []

    def fit(obs, stamp, interpolation):
        assert interpolation == "bilinear"           # the fit's default reading of the stamp
        seen.append(stamp)
        if len(seen) == 1:
            raise ValueError("gamma left its domain")
        t = torch.tensor([obs.truth["r_ein"], obs.truth["gamma"], obs.truth["q"], 1.0],
                         dtype=torch.float64)
        return t * 1.01, t, torch.diag((0.01 * t) ** 2), float(obs.image.size)

    monkeypatch.setattr(module, "oracle_fit", fit)
    drawn_by = []
    draw = module.vae_drawing
    monkeypatch.setattr(module, "vae_drawing", lambda stamp, vae: (
        drawn_by.append(vae.config), draw(stamp, vae, steps=3))[1])
    module.main(["--seeds", "0", "1", "--template", "vae", "--vae-dir", str(tmp_path)])
    assert drawn_by == [cfg, cfg]
    assert split_of == [cfg]          # the held-out split of the weights in --vae-dir
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert lines[0]["seed"] == 0 and lines[0]["failed"] == "gamma left its domain"
    assert lines[1]["seed"] == 1 and "failed" not in lines[1]
    assert lines[1]["r_ein"]["error_percent"] == pytest.approx(1.0)
    assert lines[1]["r_ein"]["z"] == pytest.approx(1.0)
    assert lines[1]["interpolation"] == "bilinear -> bilinear"
    # the template is the tiny VAE's drawing (peak 1), not the blob itself
    assert float(seen[1].max()) == pytest.approx(1.0)
    assert lines[1]["template_residual"] > 0.05
    with pytest.raises(FileNotFoundError, match="folder not found: .*none"):
        module.main(["--seeds", "0", "--template", "vae", "--vae-dir", str(tmp_path / "none")])
    (tmp_path / "vae_encoder.pt").unlink()
    with pytest.raises(FileNotFoundError, match="encoder weights not found"):
        module.main(["--seeds", "0", "--template", "vae", "--vae-dir", str(tmp_path)])


def _adaptive_script():
    path = Path(__file__).resolve().parents[1] / "validation" / "adaptive_source.py"
    spec = importlib.util.spec_from_file_location("adaptive_source_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adaptive_inversion_evidence_is_the_gaussian_marginal():
    """The semi-linear inversion's evidence at a fixed lambda against the marginal likelihood
    of the linear-Gaussian model written out densely: d ~ N(0, N + B (lambda H)^-1 B^T)."""
    from difflens.datasets.mocks import simulate_mock

    adaptive = _adaptive_script()
    obs = simulate_mock(2, noise_sigma=0.1, npix=40, pixel_scale=0.1, source="sersic")
    truth = {k: float(obs.truth[k]) for k in ("r_ein", "q", "phi", "gamma", "x0", "y0", "g1",
                                               "g2")}
    inv = adaptive.AdaptiveInversion(obs, step=3, mask_radius=1.9)
    B, H, log_det_H = inv.matrices(truth)
    assert B.shape == (int(inv.mask.sum()), inv.n_source)
    assert np.isclose(log_det_H, np.linalg.slogdet(H)[1])
    for log_lam in (-1.0, 2.0):
        cov = np.diag(1.0 / inv.weight) + B.toarray() @ np.linalg.solve(
            math.exp(log_lam) * H, B.toarray().T)
        sign, log_det = np.linalg.slogdet(2 * math.pi * cov)
        direct = -0.5 * inv.data @ np.linalg.solve(cov, inv.data) - 0.5 * log_det
        assert sign > 0
        got = inv.evidence(truth, log_lambda=log_lam)
        assert got["log_evidence"] == pytest.approx(direct, abs=1e-3)
        parts = inv.norm - 0.5 * got["chi2"] - got["regularisation"] + got["occam"]
        assert got["log_evidence"] == pytest.approx(parts)
    # maximised over lambda: at least the value at either fixed lambda
    assert inv.evidence(truth)["log_evidence"] >= inv.evidence(truth, 2.0)["log_evidence"] - 1e-6


def test_adaptive_surface_search_finds_a_noisy_gaussian_peak():
    """The response-surface search against a known Gaussian log density with 1-nat noise
    (the triangulation's roughness): it recovers the peak and the covariance."""
    adaptive = _adaptive_script()
    rng = np.random.default_rng(1)
    lens = dict(r_ein=1.5, q=0.8, phi=0.4, gamma=2.05, x0=0.02, y0=-0.03, g1=0.01, g2=-0.02)
    peak = adaptive.vector_from_lens(lens)
    sd = adaptive.SCALES * np.array([0.7, 1.2, 0.9, 1.5, 1.0, 0.8, 1.1, 0.6])
    corr = np.eye(8)
    corr[0, 3] = corr[3, 0] = 0.6                      # r_ein-gamma correlated
    cov = sd[:, None] * corr * sd[None, :]
    precision = np.linalg.inv(cov)

    class Noisy:
        def evidence(self, trial):
            d = adaptive.vector_from_lens(trial) - peak
            return dict(log_evidence=-0.5 * d @ precision @ d + rng.standard_normal())

    start = peak + 2.0 * sd
    centre, found, evaluations = adaptive.surface(Noisy(), start, seed=0)
    assert evaluations == 480
    assert found is not None
    assert np.all(np.abs(centre - peak) < 0.3 * sd)
    assert np.allclose(np.sqrt(np.diag(found)), sd, rtol=0.3)


def test_adaptive_grid_reproduces_a_linear_source_exactly():
    """Barycentric interpolation on the traced centres' triangulation is exact for a source
    linear in the source-plane position: with no PSF, B s equals that plane at every traced
    pixel inside the triangulation, and pixels outside it see no source."""
    from difflens.datasets.mocks import simulate_mock
    from scipy.spatial import Delaunay

    adaptive = _adaptive_script()
    obs = simulate_mock(3, noise_sigma=0.1, npix=40, pixel_scale=0.1, source="sersic",
                        psf_sigma=None)
    lens = {k: float(obs.truth[k]) for k in ("r_ein", "q", "phi", "gamma", "x0", "y0", "g1",
                                              "g2")}
    inv = adaptive.AdaptiveInversion(obs, step=3, mask_radius=1.9)
    B, _, _ = inv.matrices(lens)
    lens_t = {k: torch.tensor(v, dtype=torch.float64) for k, v in lens.items()}
    centres = inv._trace(inv.cx, inv.cy, lens_t)
    plane = lambda p: 0.3 + 1.7 * p[:, 0] - 0.9 * p[:, 1]         # noqa: E731
    traced = inv._trace(inv.x, inv.y, lens_t)
    # with a 1 x 1 PSF there is no padding: B's rows are the unmasked pixels themselves
    pixel = {r: i for i, r in enumerate(inv.rows)}
    rows = [pixel[k] for k in np.flatnonzero(inv.mask)]
    inside = Delaunay(centres).find_simplex(traced[rows]) >= 0
    got = B @ plane(centres)
    assert inside.sum() > 100 and (~inside).sum() > 0
    assert np.allclose(got[inside], plane(traced[rows])[inside], atol=1e-10)
    assert np.all(got[~inside] == 0.0)

"""Time the simulator on the peer-benchmark workload (../shared/bench/peers.py), side by side.

256x256 pixels at 0.04", SPLE + external shear, elliptical Sersic source, 13x13 Gaussian PSF
(sigma 0.05"), Gaussian log-likelihood (``Simulator.log_likelihood``: image and likelihood in one
compiled graph with ``compile=True``).  Reports median milliseconds for one forward image, for
value + gradient w.r.t. all 15 lens and source parameters, and per image in a batch of 64 -- a
forward batch, as the peers measure it, and a value + gradient batch -- in float32 and float64, for
both SPLE methods, eager and ``torch.compile``-d (``Simulator(compile=True)``).

With ``--peers-python`` (a Python with caustics / herculens / lenstronomy installed, see
``../shared/bench/README.md``) the peers run first, in the same job, and a table of ratios to the
best peer follows.

    python benchmarks/simulator.py [--runs 20] [--batch 64] [--device cpu] [--out FILE.json]
                                   [--peers-python /path/to/venv/bin/python] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, median_ms  # noqa: E402

from difflens.instrument import add_noise, gaussian_psf  # noqa: E402
from difflens.simulate import Simulator  # noqa: E402
from difflens.sources import Sersic  # noqa: E402

LENS = dict(x0=0.05, y0=-0.03, r_ein=1.2, q=0.75, phi=0.5, gamma=2.1, g1=0.03, g2=-0.02)
SOURCE = dict(x0=0.10, y0=0.05, q=0.8, phi=1.0, n=1.5, r_e=0.25, amp=1.0)
LENS_EVAL = dict(x0=0.063, y0=-0.017, r_ein=1.22, q=0.73, phi=0.52, gamma=2.05, g1=0.035,
                 g2=-0.015)
SOURCE_EVAL = dict(x0=0.11, y0=0.04, q=0.78, phi=1.05, n=1.4, r_e=0.26, amp=1.05)


PEERS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peers.py"


def run(dtype, method, runs, batch, device, compile=False):
    psf = gaussian_psf(0.05, 0.04, size=13, dtype=dtype, device=device)
    sim = Simulator(npix=256, pixel_scale=0.04, psf=psf, deflection_method=method, dtype=dtype,
                    device=device, compile=compile)
    gen = torch.Generator(device=device).manual_seed(12345)
    data = add_noise(sim.image(LENS, Sersic(**SOURCE)), 0.1, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def params(values, n=None):
        return {k: torch.tensor(v, dtype=dtype, device=device).repeat(n) if n else
                torch.tensor(v, dtype=dtype, device=device) for k, v in values.items()}

    def forward(n=None):
        with torch.no_grad():
            sim.image(params(LENS_EVAL, n), Sersic(**params(SOURCE_EVAL, n)))
        sync()

    def value_and_grad(n=None):
        lens = {k: v.requires_grad_() for k, v in params(LENS_EVAL, n).items()}
        src = {k: v.requires_grad_() for k, v in params(SOURCE_EVAL, n).items()}
        logl = sim.log_likelihood(data, 0.1, lens, Sersic(**src)).sum()
        torch.autograd.grad(logl, [*lens.values(), *src.values()])
        sync()

    return dict(
        forward=median_ms(forward, runs),
        value_and_grad=median_ms(value_and_grad, runs),
        batch_forward_per_image=median_ms(lambda: forward(batch), max(3, runs // 4)) / batch,
        batch_value_and_grad_per_image=median_ms(lambda: value_and_grad(batch),
                                                 max(3, runs // 4)) / batch,
    )


def run_peers(python, runs, batch):
    """Run ../shared/bench/peers.py under ``python``; {"peer[dtype]": {forward, ...} ms}."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, str(PEERS), "--peers", "lenstronomy,caustics,herculens",
                        "--runs", str(runs), "--batch", str(batch)], check=True,
                       env=dict(os.environ, PEERS_OUT=tmp))
        raw = json.loads(next(Path(tmp).glob("peers_*.json")).read_text())["peers"]
    out = {}
    for key, r in raw.items():
        if r.get("ok"):
            ms = lambda d, k="median_s": 1e3 * d[k] if isinstance(d, dict) and k in d else None  # noqa
            out[key] = dict(forward=ms(r.get("forward")), value_and_grad=ms(r.get("value_and_grad")),
                            batch_forward_per_image=ms(r.get("batch"), "per_image_s"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--peers-python", default=None,
                    help="Python with the peers installed: run them first, in this job")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = header(device)
    peers = {}
    if args.peers_python:
        if not PEERS.exists():
            raise SystemExit(f"peer benchmark not found at {PEERS}")
        peers = run_peers(args.peers_python, args.runs, args.batch)
    rows = []
    cols = ("forward", "value_and_grad", "batch_forward_per_image", "batch_value_and_grad_per_image")
    print(f"{'method':8s} {'dtype':8s} {'compiled':8s} {'forward':>8s} {'val+grad':>9s} "
          f"{'batch fwd/img':>14s} {'batch v+g/img':>14s}   (median ms, batch {args.batch})")
    variants = [("table", False), ("series", False)] + ([] if args.no_compile else
                                                          [("table", True)])
    for method, compiled in variants:
        for dtype in (torch.float32, torch.float64):
            r = run(dtype, method, args.runs, args.batch, device, compile=compiled)
            rows.append(dict(method=method, dtype=str(dtype).replace("torch.", ""),
                             compiled=compiled, **r))
            print(f"{method:8s} {rows[-1]['dtype']:8s} {str(compiled):8s} "
                  + " ".join(f"{r[c]:{w}.2f}" for c, w in zip(cols, (8, 9, 14, 14))))
    ratios = {}
    if peers:
        print("\npeers (same job):")
        for key, r in peers.items():
            print(f"{key:24s} " + " ".join(f"{r[c]:9.2f}" if r[c] is not None else f"{'n/a':>9s}"
                                         for c in cols[:3]))
        for c in cols[:3]:
            best_peer = min((r[c], k) for k, r in peers.items() if r[c] is not None)
            best_ours = min((r[c], f"{r['method']} {r['dtype']}" + (" compiled" if r["compiled"]
                                                                       else "")) for r in rows)
            ratios[c] = dict(difflens=best_ours, peer=best_peer, ratio=best_ours[0] / best_peer[0])
            print(f"{c:24s} difflens {best_ours[0]:7.2f} ({best_ours[1]})  best peer "
                  f"{best_peer[0]:7.2f} ({best_peer[1]})  ratio {ratios[c]['ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(info, results=rows, peers=peers, ratios=ratios),
                                             indent=1))


if __name__ == "__main__":
    main()

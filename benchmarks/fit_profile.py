"""Where the Gaussian fit's time goes, next to what this machine's kernels can do.

``vs_anomalib.py`` times the Gaussian fit whole (``PatchGaussianDetector.fit``
on patch embeddings, minus the threshold pass it ends with). This script splits
that time into its phases, counts each phase's floating-point work, and measures
in the same process what the machine's own kernels reach at comparable shapes,
so that a reader can see which phase is far from the hardware and which is not.

Each configuration runs in a fresh Python process on random patch embeddings of
the shapes ``vs_anomalib.py`` uses (the time does not depend on the values):
ResNet-18 / Rd100 (448 channels, 100 kept) and Wide-ResNet-50 / Rd550 (1792
channels, 550 kept), 200 training images, a 56 x 56 grid, a fixed shrinkage of
0.01, batches of 32. Phases, timed by wrapping the functions that do them:

* ``select``: the detector's random channel subset (a copy of the kept channels);
* ``accumulate``: the streamed sums per position (matrix products over up to
  128 images at a time, lower block triangle only past 128 channels), the last
  images' products included (added when the finalisation begins);
* ``cholesky``: the blocked Cholesky factorisation of the shrunk covariances;
* ``finalise, rest``: centring and shrinkage, writing the factors, and the
  inverses of their diagonal blocks that the blocked solves need;
* ``scoring set-up``: what the first scoring call prepares once (whitening
  matrices up to 1 GiB of factors, else the diagonal-block inverses if the fit
  did not already make them);
* ``threshold pass``: the rest of that first scoring call, the detector's
  scoring of its training images for ``offset_`` (not part of the Gaussian fit);
* ``other``: what the listed phases leave of the detector's ``fit``.

The phases add up to ``fit``. ``Gaussian fit`` is ``fit`` minus a second,
identical threshold pass, as ``vs_anomalib.py`` counts it; shares are of it (the
two threshold passes differ by a few percent, so the shares add up to about 1).

Machine reference, measured in the same process after the fit:

* ``gemm``: a float32 2048 x 2048 matrix product (the machine's practical peak);
* ``accumulate's products``: one batched product of the accumulation's shape;
* ``LAPACK cholesky``: ``torch.linalg.cholesky_ex`` on a chunk of whole matrices;
* ``first touch``: seconds per GiB to write memory just allocated, minus writing
  it again (page faults), next to the size of the one allocation that holds the
  statistics and then the factors (touched partly while accumulating, the rest
  when the factors are written). The rate varies from process to process.

    python benchmarks/fit_profile.py [--configs r18 wr50] [--n-train 200] [--threads 2]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

CONFIGS = {
    "r18": {"label": "ResNet-18 / Rd100", "channels": 448, "n_features": 100},
    "wr50": {"label": "Wide-ResNet-50 / Rd550", "channels": 1792, "n_features": 550},
}
GRID = 56
PHASES = ("select", "accumulate", "cholesky", "finalise, rest", "scoring set-up", "threshold pass",
          "other")
COLUMNS = ("config", "phase", "seconds", "share of fit", "GFLOP", "GFLOP/s", "of gemm")


class _Timed:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``totals[key]``
    (``key`` a string, or a function giving it at each call)."""

    def __init__(self, owner, name, totals, key):
        self.owner, self.name, self.totals, self.key = owner, name, totals, key

    def __enter__(self):
        original = self.original = getattr(self.owner, self.name)
        totals, key = self.totals, self.key

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                k = key() if callable(key) else key
                totals[k] = totals.get(k, 0.0) + time.perf_counter() - start

        setattr(self.owner, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)
        return False


def _rate(f, flops, repeats=3):
    f()
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    seconds = (time.perf_counter() - start) / repeats
    return flops / seconds / 1e9


def _lower_block_values(c):
    """Values per position that the accumulation's products write (see _ScatterBlocks)."""
    from skpadim.covariance import _row_block

    rows = _row_block(c)
    return sum((min(r0 + rows, c) - r0) * min(r0 + rows, c) for r0 in range(0, c, rows))


def worker(cfg):
    import contextlib

    import numpy as np
    import torch

    import skpadim.covariance as cov
    import skpadim.detector as det_module
    from skpadim import PatchEmbeddings, PatchGaussianDetector

    common.set_threads(cfg["threads"])
    n, c_in, c = cfg["n_train"], cfg["channels"], cfg["n_features"]
    p = GRID * GRID
    rng = torch.Generator().manual_seed(0)
    X = PatchEmbeddings(torch.randn(n, c_in, GRID, GRID, generator=rng).numpy(),
                        resize_shape=(4 * GRID, 4 * GRID))  # fmt: skip
    # Warm-up: lazy library loading and first-call set-up are not timed.
    PatchGaussianDetector(n_features=8, shrinkage=0.01, pooling=1, random_state=0).fit(X[:4])
    det = PatchGaussianDetector(n_features=c, shrinkage=0.01, pooling=1, image_score="max",
                                batch_size=32, random_state=0)  # fmt: skip
    t = {}
    # The first scoring pass selects channels too: counted there, not in "select".
    scoring = []
    wrappers = [
        _Timed(det_module._ChannelTaker, "__call__", t,
               lambda: "select in pass" if scoring else "select"),
        _Timed(cov.PatchCovariance, "_accumulate", t, "accumulate"),
        # The last images' products, added when the finalisation begins.
        _Timed(cov._Moments, "release", t, "last products"),
        _Timed(cov.PatchCovariance, "_finalize", t, "finalise"),
        _Timed(cov, "_cholesky_blocked_", t, "cholesky"),
        _Timed(cov.PatchCovariance, "_whitening_matrices", t, "whitening"),
        _Timed(cov.PatchCovariance, "_diagonal_inverses", t, "diagonal inverses"),
        _Timed(det_module.PatchGaussianDetector, "_score_samples", t, "first pass"),
    ]
    plain_score_samples = det_module.PatchGaussianDetector._score_samples

    def flagged_score_samples(*args, **kwargs):
        scoring.append(True)
        try:
            return plain_score_samples(*args, **kwargs)
        finally:
            scoring.pop()

    with contextlib.ExitStack() as stack:
        det_module.PatchGaussianDetector._score_samples = flagged_score_samples
        stack.callback(setattr, det_module.PatchGaussianDetector, "_score_samples",
                       plain_score_samples)  # fmt: skip
        for w in wrappers:
            stack.enter_context(w)
        start = time.perf_counter()
        det.fit(X)
        fit_s = time.perf_counter() - start
    start = time.perf_counter()
    det.score_samples(X)
    threshold_s = time.perf_counter() - start
    gaussian_s = fit_s - threshold_s
    # Set-up done once by the first scoring call (the threshold pass in fit).
    setup = t.get("whitening", 0.0) + t.get("diagonal inverses", 0.0)
    phases = {
        "select": t.get("select", 0.0),
        "accumulate": t["accumulate"] + t["last products"],
        "cholesky": t.get("cholesky", 0.0),
        "finalise, rest": t["finalise"] - t.get("cholesky", 0.0) - t["last products"],
        "scoring set-up": setup,
        "threshold pass": t["first pass"] - setup,
    }
    phases["other"] = fit_s - sum(phases.values())
    flops = {
        "accumulate": 2.0 * n * p * _lower_block_values(c),
        "cholesky": p * c**3 / 3.0,
        "scoring set-up": p * c**3 / 3.0 if t.get("whitening") else None,
    }

    # The machine's kernels, same process, after the fit.
    gemm = common.gemm_gflops(cfg["threads"])
    # One product of the accumulation: the images waiting at once, over a
    # cache-sized chunk of positions.
    k = min(n, cov._PENDING_IMAGES)
    chunk = max(1, min(p, cov._GATHER_BYTES // (k * c * 4)))
    rows = cov._row_block(c)
    Y = torch.randn(chunk, k, c)
    out = torch.empty(chunk, min(rows, c), c)
    products = _rate(lambda: torch.bmm(Y[:, :, : min(rows, c)].mT, Y, out=out),
                     2.0 * chunk * k * min(rows, c) * c)  # fmt: skip
    chunk = min(p, 98)  # the Cholesky's chunk of 550-wide matrices
    A = torch.randn(chunk, c, c + 16)
    A = A @ A.mT / (c + 16) + 0.01 * torch.eye(c)
    lapack = _rate(lambda: torch.linalg.cholesky_ex(A), chunk * c**3 / 3.0)
    del A, Y, out
    gib = 2**30
    buf = torch.empty(gib // 4)
    start = time.perf_counter()
    buf.fill_(1.0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    buf.fill_(2.0)
    again = time.perf_counter() - start
    del buf
    storage_gib = p * c * c * 4 / gib

    rows_out = []
    for phase in PHASES:
        seconds = phases[phase]
        f = flops.get(phase)
        rate = f / seconds / 1e9 if f and seconds > 0 else None
        rows_out.append({
            "config": cfg["label"], "phase": phase, "seconds": seconds,
            "share of fit": None if phase == "threshold pass" else seconds / gaussian_s,
            "GFLOP": None if f is None else f / 1e9,
            "GFLOP/s": rate, "of gemm": None if rate is None else rate / gemm,
        })  # fmt: skip
    rows_out.append({"config": cfg["label"], "phase": "fit", "seconds": fit_s})
    rows_out.append({"config": cfg["label"], "phase": "second threshold pass", "seconds": threshold_s})
    rows_out.append({"config": cfg["label"], "phase": "Gaussian fit", "seconds": gaussian_s,
                     "share of fit": 1.0})  # fmt: skip
    machine = {
        "gemm 2048 GFLOP/s": gemm,
        "accumulate's products GFLOP/s": products,
        "LAPACK cholesky GFLOP/s": lapack,
        "first touch s/GiB": first - again,
        "statistics and factors GiB": storage_gib,
    }
    return {"rows": rows_out, "machine": machine}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cfg = json.loads(Path(args.worker).read_text())
        result = worker(cfg)
        Path(cfg["result_path"]).write_text(json.dumps(result))
        return
    env = common.environment(args.threads)
    common.print_environment(env)
    rows, machines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            cfg = dict(CONFIGS[name], n_train=args.n_train, threads=args.threads)
            print(f"[{name}] fitting in a fresh process ...", flush=True)
            result = common.run_worker(Path(__file__).resolve(), cfg, tmp, args.threads, name)
            rows += result["rows"]
            machines[cfg["label"]] = result["machine"]
    print(common.format_table(rows, COLUMNS))
    for label, machine in machines.items():
        print(f"{label}: " + ", ".join(f"{k} {v:.3g}" for k, v in machine.items()))
    meta = {"config": {k: v for k, v in vars(args).items() if k != "worker"},
            "shapes": {k: dict(v, grid=GRID) for k, v in CONFIGS.items()},
            "machine_reference": machines, "environment": env}  # fmt: skip
    common.write_results("fit_profile", rows, COLUMNS, meta)


if __name__ == "__main__":
    main()

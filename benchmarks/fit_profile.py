"""Where the Gaussian fit's time goes, next to what this machine's kernels can do.

``vs_anomalib.py`` times the Gaussian fit whole (``PatchGaussianDetector.fit``
on patch embeddings, minus the threshold pass it ends with). This script splits
that time into its phases, counts each phase's floating-point work, and measures
in the same process what the machine's own kernels reach at comparable shapes,
so that a reader can see which phase is far from the hardware and which is not.

Each configuration runs in a fresh Python process on random patch embeddings of
the shapes ``vs_anomalib.py`` gives the detector (the time does not depend on
the values): the channels anomalib keeps, which that script copies out in the
feature step on both sides, so the detector keeps every channel it is given
(``n_features=None``): ResNet-18 / Rd100 and Wide-ResNet-50 / Rd550, 200
training images, a 56 x 56 grid, a fixed shrinkage of 0.01, batches of 32.
Phases, timed by wrapping the functions that do them:

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
With ``--repeats``, each configuration is fitted that many times, each in a
fresh process, and the table gives every phase's median (which add up to
``fit`` only roughly); each run's figures are kept in the JSON file and its
Gaussian fit printed, since a fit's time varies by 10-25% from run to run.

Machine reference, measured in the same process, after the fit unless stated:

* ``gemm``: a float32 2048 x 2048 matrix product (the machine's practical peak);
* ``accumulate's products``: one batched product of the accumulation's shape;
* ``LAPACK cholesky``: ``torch.linalg.cholesky_ex`` on a chunk of whole matrices;
* ``first touch``: seconds per GiB to write memory just allocated, minus writing
  it again (page faults), measured twice: at the start of the process, and after
  the fit, when the process holds the embeddings and the fitted model (its RSS
  is given). Next to it, the size of the one allocation that holds the
  statistics and then the factors (touched partly while accumulating, the rest
  when the factors are written). On some virtual machines the rate grows with
  the memory the process already holds (presumably as new pages must first be
  backed by the host); the two figures bracket the sizes the process went
  through during the fit.

    python benchmarks/fit_profile.py [--configs r18 wr50] [--n-train 200] [--threads 2] [--repeats 1]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

CONFIGS = {
    "r18": {"label": "ResNet-18 / Rd100", "n_features": 100},
    "wr50": {"label": "Wide-ResNet-50 / Rd550", "n_features": 550},
}
GRID = 56
GIB = 2**30
PHASES = ("accumulate", "cholesky", "finalise, rest", "scoring set-up", "threshold pass", "other")
COLUMNS = ("config", "phase", "seconds", "share of fit", "GFLOP", "GFLOP/s", "of gemm")


class _Timed:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``totals[key]``."""

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
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

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


def _first_touch_s_per_gib():
    """Seconds per GiB that page faults add to writing memory just allocated."""
    import torch

    buf = torch.empty(GIB // 4)
    start = time.perf_counter()
    buf.fill_(1.0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    buf.fill_(2.0)
    return first - (time.perf_counter() - start)


def worker(cfg):
    import contextlib

    import torch

    import skpadim.covariance as cov
    import skpadim.detector as det_module
    from skpadim import PatchEmbeddings, PatchGaussianDetector

    common.set_threads(cfg["threads"])
    touch_at_start = _first_touch_s_per_gib()
    n, c = cfg["n_train"], cfg["n_features"]
    p = GRID * GRID
    rng = torch.Generator().manual_seed(0)
    X = PatchEmbeddings(torch.randn(n, c, GRID, GRID, generator=rng).numpy(),
                        resize_shape=(4 * GRID, 4 * GRID))  # fmt: skip
    # Warm-up: lazy library loading and first-call set-up are not timed.
    PatchGaussianDetector(n_features=8, shrinkage=0.01, pooling=1, random_state=0).fit(X[:4])
    det = PatchGaussianDetector(n_features=None, shrinkage=0.01, pooling=1, image_score="max",
                                batch_size=32, random_state=0)  # fmt: skip
    t = {}
    wrappers = [
        _Timed(cov.PatchCovariance, "_accumulate", t, "accumulate"),
        # The last images' products, added when the finalisation begins.
        _Timed(cov._Moments, "release", t, "last products"),
        _Timed(cov.PatchCovariance, "_finalize", t, "finalise"),
        _Timed(cov, "_cholesky_blocked_", t, "cholesky"),
        _Timed(cov.PatchCovariance, "_whitening_matrices", t, "whitening"),
        _Timed(cov.PatchCovariance, "_diagonal_inverses", t, "diagonal inverses"),
        _Timed(det_module.PatchGaussianDetector, "_score_samples", t, "first pass"),
    ]
    with contextlib.ExitStack() as stack:
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
    rss_after_fit = common.current_rss_bytes()
    touch_after_fit = _first_touch_s_per_gib()

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
    storage_gib = p * c * c * 4 / GIB

    seconds = dict(phases, **{"fit": fit_s, "second threshold pass": threshold_s,
                              "Gaussian fit": gaussian_s})  # fmt: skip
    machine = {
        "gemm 2048 GFLOP/s": gemm,
        "accumulate's products GFLOP/s": products,
        "LAPACK cholesky GFLOP/s": lapack,
        "first touch s/GiB, process start": touch_at_start,
        "first touch s/GiB, after the fit": touch_after_fit,
        "RSS GiB after the fit": rss_after_fit / GIB,
        "statistics and factors GiB": storage_gib,
    }
    return {"seconds": seconds, "flops": flops, "machine": machine}


def _table_rows(label, runs):
    """One row per phase: the median seconds over ``runs`` (worker results), with
    the phase's share of the median Gaussian fit and its rate, against the median
    float32 product rate of those runs."""
    median = {key: float(np.median([r["seconds"][key] for r in runs])) for key in runs[0]["seconds"]}
    gemm = float(np.median([r["machine"]["gemm 2048 GFLOP/s"] for r in runs]))
    gaussian = median["Gaussian fit"]
    rows = []
    for phase in PHASES:
        f = runs[0]["flops"].get(phase)
        rate = f / median[phase] / 1e9 if f and median[phase] > 0 else None
        rows.append({
            "config": label, "phase": phase, "seconds": median[phase],
            "share of fit": None if phase == "threshold pass" else median[phase] / gaussian,
            "GFLOP": None if f is None else f / 1e9,
            "GFLOP/s": rate, "of gemm": None if rate is None else rate / gemm,
        })  # fmt: skip
    rows.append({"config": label, "phase": "fit", "seconds": median["fit"]})
    rows.append({"config": label, "phase": "second threshold pass",
                 "seconds": median["second threshold pass"]})  # fmt: skip
    rows.append({"config": label, "phase": "Gaussian fit", "seconds": gaussian, "share of fit": 1.0})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per configuration; the table gives medians")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cfg = json.loads(Path(args.worker).read_text())
        result = worker(cfg)
        common.write_worker_result(cfg, result)
        return
    env = common.environment(args.threads)
    common.print_environment(env)
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            cfg = dict(CONFIGS[name], n_train=args.n_train, threads=args.threads)
            label = cfg["label"]
            runs[label] = []
            for i in range(args.repeats):
                print(f"[{name}] fitting in a fresh process ({i + 1} of {args.repeats}) ...", flush=True)
                runs[label].append(
                    common.run_worker(Path(__file__).resolve(), cfg, tmp, args.threads, f"{name}{i}"))
            rows += _table_rows(label, runs[label])
    print(common.format_table(rows, COLUMNS))
    for label, results in runs.items():
        fits = ", ".join(f"{r['seconds']['Gaussian fit']:.2f}" for r in results)
        print(f"{label}: Gaussian fit of each run (s): {fits}")
        for i, r in enumerate(results):
            print(f"  run {i + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in r["machine"].items()))
    meta = {"config": {k: v for k, v in vars(args).items() if k != "worker"},
            "shapes": {k: dict(v, grid=GRID) for k, v in CONFIGS.items()},
            "runs": runs, "environment": env}  # fmt: skip
    common.write_results("fit_profile", rows, COLUMNS, meta)


if __name__ == "__main__":
    main()

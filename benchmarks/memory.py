"""Peak memory of fitting against the number of images, and of scoring a long stream.

``fit``: each configuration runs in a fresh process whose peak RSS (``ru_maxrss``)
is that fit's alone; ``--repeats`` runs each number of images several times, as
the peak of the same fit varies by a few percent from process to process (ratios
are to the median of the first number's runs). The training images are real
texture tiles produced on demand from their index, so the data itself takes no
memory and what grows, if anything, is the detector's. The RSS is also sampled
every 20 ms during the fit (its median and 99th percentile are reported), and
where the C library is glibc, so are the largest amounts of memory its allocator
had in use and kept free: each batch allocates and frees the backbone's
activations, the allocator keeps part of the freed memory to serve later
batches, and the peak RSS is the moment when the most of both coincide.
skpadim hands that memory's pages back to the system before each batch (the
allocator still counts it as kept free, so that figure does not fall);
``--freed-memory keep`` leaves it to the allocator instead (the baseline), and
``both`` alternates the two settings process by process.

``stream``: one detector scores a generator of images (``iter_anomaly_maps``), and
the RSS is sampled every ``--every`` images: it should stay flat.

    python benchmarks/memory.py fit --backbone resnet18 --weights none --n-features 100 --n 200 5000
    python benchmarks/memory.py fit --backbone resnet18 --weights none --n-features 100 --n 200 5000 \
        --repeats 3 --freed-memory both --tag r3_freed-memory
    python benchmarks/memory.py fit --backbone wide_resnet50_2 --weights none --n-features 550 --n 200 400
    python benchmarks/memory.py stream --n 10000
    python benchmarks/memory.py fit --image-size auto --n-features auto --tile 500 1260 --n 200

The last is the defaults (EfficientNet-Lite0, every channel, a frame with the
images' proportions) on parts as elongated as on many inspection lines.
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MIB,
    PeakRSS,
    current_rss_bytes,
    environment,
    format_table,
    max_rss_bytes,
    run_worker,
    set_threads,
    write_results,
    write_worker_result,
)


class TextureTiles(Sequence):
    """``n`` RGB uint8 tiles of real texture photographs, made from their index.

    Random crops (position, flip) of scikit-image's brick / grass / gravel, so
    that memory holds no image set; indexing twice gives the same tile.
    ``size``: an int (square) or ``(height, width)``; the 512 x 512 photograph
    is mirrored at its borders where a tile is larger.
    """

    def __init__(self, n, size=224, texture="brick", seed=0):
        from skimage import data

        self.n, self.seed = n, seed
        self.size = (size, size) if np.isscalar(size) else tuple(size)
        source = getattr(data, texture)()
        pad = [(0, max(0, s - d)) for s, d in zip(self.size, source.shape)]
        self.source = np.pad(source, pad, mode="symmetric")

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.RandomState(self.seed * 1_000_003 + i)
        (h, w), (th, tw) = self.source.shape, self.size
        y, x = rng.randint(0, h - th + 1), rng.randint(0, w - tw + 1)
        tile = self.source[y : y + th, x : x + tw]
        if rng.rand() < 0.5:
            tile = tile[:, ::-1]
        return np.repeat(tile[..., None], 3, axis=-1).copy()


def _detector(cfg):
    from skpadim import PatchGaussianDetector, TorchvisionExtractor

    weights = None if cfg["weights"] == "none" else cfg["weights"]
    if weights == "default":
        weights = "DEFAULT"
    size, n_features = cfg["image_size"], cfg["n_features"]
    ext = TorchvisionExtractor(cfg["backbone"], weights=weights, device=cfg["device"],
                               image_size=size if size == "auto" else int(size))
    return PatchGaussianDetector(ext, random_state=0,
                                 n_features=n_features if n_features == "auto" else int(n_features),
                                 batch_size=cfg["batch_size"], device=cfg["device"])


def fit_worker(cfg):
    set_threads(cfg["threads"])
    import torch

    torch.manual_seed(0)  # the same random weights in every process
    base = current_rss_bytes()
    det = _detector(cfg)
    if cfg["freed_memory"] == "keep":
        # The baseline: the allocator keeps what each batch freed, as it does
        # by default (skpadim hands it back to the system between batches).
        import skpadim._images

        skpadim._images.release_freed_memory = lambda: False
    start = time.perf_counter()
    with PeakRSS(interval=0.02, heap=True) as sampled:
        det.fit(TextureTiles(cfg["n"], _tile_size(cfg)))
    in_use, kept = sampled.heap_in_use, sampled.heap_kept_free
    return {"n_images": cfg["n"], "freed_memory": cfg["freed_memory"],
            "fit_s": time.perf_counter() - start,
            "rss_base_mib": base / MIB, "peak_rss_mib": max_rss_bytes() / MIB,
            "rss_median_mib": sampled.quantile(0.5) / MIB, "rss_p99_mib": sampled.quantile(0.99) / MIB,
            "malloc_in_use_max_mib": None if in_use is None else in_use / MIB,
            "malloc_kept_free_max_mib": None if kept is None else kept / MIB,
            "frame": "x".join(map(str, det.input_shape_)),
            "n_features": len(det.channel_indices_)}


def _tile_size(cfg):
    """The training tiles' (height, width): ``--tile``, else the square ``--image-size``."""
    if cfg.get("tile"):
        return tuple(cfg["tile"])
    if cfg["image_size"] == "auto":
        return (224, 224)
    return int(cfg["image_size"])


def run_fit(args):
    rows = []
    # With "both", the two settings alternate, so that a drift of the machine
    # over the run affects both alike.
    settings = ["release", "keep"] if args.freed_memory == "both" else [args.freed_memory]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            for run in range(1, args.repeats + 1):
                for setting in settings:
                    cfg = dict(vars(args), n=n, func=None, freed_memory=setting)
                    print(f"fitting on {n} images (run {run} of {args.repeats}, freed memory: "
                          f"{setting}) ...", flush=True)
                    rows.append(dict(run_worker(__file__, cfg, tmp, args.threads,
                                                f"fit{n}_{run}_{setting}"), run=run))
    # Ratios to the median of the first size's runs with the same setting.
    for setting in settings:
        same = [r for r in rows if r["freed_memory"] == setting]
        first = [r for r in same if r["n_images"] == args.n[0]]
        for key, ratio in (("peak_rss_mib", "vs_first"), ("rss_median_mib", "median_vs_first"),
                           ("rss_p99_mib", "p99_vs_first")):
            base = float(np.median([r[key] for r in first]))
            for r in same:
                r[ratio] = r[key] / base
    columns = ["n_images", "freed_memory", "run", "frame", "n_features", "fit_s", "rss_base_mib",
               "peak_rss_mib", "vs_first", "rss_median_mib", "median_vs_first", "rss_p99_mib", "p99_vs_first",
               "malloc_in_use_max_mib", "malloc_kept_free_max_mib"]
    print(format_table(rows, columns))
    summary = []
    for setting in settings:
        first = None
        for n in args.n:
            runs = [r for r in rows if r["n_images"] == n and r["freed_memory"] == setting]
            peaks = [r["peak_rss_mib"] for r in runs]
            entry = {"n_images": n, "freed_memory": setting, "runs": len(peaks),
                     "peak_rss_min_mib": min(peaks), "peak_rss_median_mib": float(np.median(peaks)),
                     "peak_rss_max_mib": max(peaks),
                     "fit_s_median": float(np.median([r["fit_s"] for r in runs]))}
            first = first or entry
            entry["median_vs_first"] = entry["peak_rss_median_mib"] / first["peak_rss_median_mib"]
            summary.append(entry)
    if args.repeats > 1 or len(settings) > 1:
        print(format_table(summary, list(summary[0])))
    name = f"memory_fit_{args.backbone}_rd{args.n_features}"
    if args.tile:
        name += f"_tile{args.tile[0]}x{args.tile[1]}"
    if args.tag:
        name += f"_{args.tag}"
    meta = {"config": {k: v for k, v in vars(args).items() if k != "func"},
            "peak_rss_by_size": summary, "environment": environment(args.threads)}
    write_results(name, rows, columns, meta)


def run_stream(args):
    set_threads(args.threads)
    det = _detector(dict(vars(args)))
    det.fit(TextureTiles(args.n_train, _tile_size(vars(args)), seed=1))
    stream = (TextureTiles(args.n, _tile_size(vars(args)), seed=2)[i] for i in range(args.n))
    rows, start = [], time.perf_counter()
    for i, _ in enumerate(det.iter_anomaly_maps(stream), start=1):
        if i % args.every == 0 or i == args.n:
            rows.append({"images_scored": i, "rss_mib": current_rss_bytes() / MIB,
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    first = rows[0]["rss_mib"]
    for r in rows:
        r["vs_first"] = r["rss_mib"] / first
    columns = ["images_scored", "seconds", "rss_mib", "vs_first"]
    print(format_table(rows, columns))
    meta = {"config": {k: v for k, v in vars(args).items() if k != "func"},
            "environment": environment(args.threads),
            "peak_rss_mib": max_rss_bytes() / MIB}
    write_results(f"memory_stream_{args.backbone}_{args.n}", rows, columns, meta)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        cfg = json.loads(Path(argv[1]).read_text())
        write_worker_result(cfg, fit_worker(cfg))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, func in (("fit", run_fit), ("stream", run_stream)):
        p = sub.add_parser(mode)
        p.set_defaults(func=func)
        p.add_argument("--backbone", default="efficientnet_lite0")
        p.add_argument("--weights", default="default", help="'default', 'none' or a path")
        p.add_argument("--n-features", default="100", help="an int or 'auto'")
        p.add_argument("--image-size", default="224", help="an int (square) or 'auto'")
        p.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"),
                       help="training tiles of this shape (default: square, of --image-size)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=2)
    sub.choices["fit"].add_argument("--n", type=int, nargs="+", default=[200, 400])
    sub.choices["fit"].add_argument("--tag", default="", help="extra text for the result file names")
    sub.choices["fit"].add_argument(
        "--freed-memory", choices=["release", "keep", "both"], default="release",
        help="'release': as skpadim does, hand the memory each batch freed back to the system; "
             "'keep': leave it to the allocator (the baseline); 'both': alternate the two")
    sub.choices["fit"].add_argument("--repeats", type=int, default=1,
                                    help="fresh processes per number of images")
    sub.choices["stream"].add_argument("--n", type=int, default=10000)
    sub.choices["stream"].add_argument("--n-train", type=int, default=50)
    sub.choices["stream"].add_argument("--every", type=int, default=1000)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

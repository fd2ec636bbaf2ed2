"""Accuracy, speed and memory of PatchGaussianDetector on MVTec-layout data sets.

For each category of a folder in the MVTec AD layout, fit a detector on
``train/good`` and evaluate it on ``test``: image AUROC, pixel AUROC and AUPRO
(FPR <= 0.3), with the anomaly maps at each test image's own resolution; fit
time, scoring throughput and peak memory. Each category runs in a fresh Python
process so that its peak RSS is its own. The PaDiM paper's published figures
for MVTec AD are printed alongside.

Examples (from the repository root)::

    # the real magnetic-tile set that sits beside the checkout
    python benchmarks/mvtec.py --root ../shared/data/magnetic_tile
    # MVTec AD, paper recipe (needs the ResNet-18 ImageNet state dict)
    python benchmarks/mvtec.py --root /data/mvtec_ad --backbone resnet18 \\
        --weights /path/to/resnet18-f37072fd.pth --n-features 100 --shrinkage 0.01 \\
        --pooling 1 --image-score max
    # the built-in real-texture set, no data needed
    python benchmarks/mvtec.py --textures
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
DEFAULT_N_FEATURES = {"efficientnet_lite0": 100, "resnet18": 100, "wide_resnet50_2": 550}
TEXTURES = ("brick", "grass", "gravel")

# Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
# Detection and Localization", ICPR 2020 workshops (arXiv:2011.08785), in %.
# Table II (localisation): pixel AUROC of PaDiM-R18-Rd100 and of
# PaDiM-WR50-Rd550, and the PRO score of PaDiM-WR50-Rd550, per category.
# Table III (detection) gives image AUROC only as averages, so there is no
# per-category image AUROC to print; its all-class average for WR50-Rd550 is in
# PAPER_MEAN.
PAPER = {
    #               R18 pixel  WR50 pixel  WR50 PRO
    "carpet":      (98.9,      99.1,       96.2),
    "grid":        (94.9,      97.3,       94.6),
    "leather":     (99.1,      99.2,       97.8),
    "tile":        (91.2,      94.1,       86.0),
    "wood":        (93.6,      94.9,       91.1),
    "bottle":      (98.1,      98.3,       94.8),
    "cable":       (95.8,      96.7,       88.8),
    "capsule":     (98.3,      98.5,       93.5),
    "hazelnut":    (97.7,      98.2,       92.6),
    "metal_nut":   (96.7,      97.2,       85.6),
    "pill":        (94.7,      95.7,       92.7),
    "screw":       (97.4,      98.5,       94.4),
    "toothbrush":  (98.7,      98.8,       93.1),
    "transistor":  (97.2,      97.5,       84.5),
    "zipper":      (98.2,      98.5,       95.9),
}  # fmt: skip
PAPER_COLUMNS = (
    "paper_r18_image_auroc",
    "paper_r18_pixel_auroc",
    "paper_wr50_image_auroc",
    "paper_wr50_pixel_auroc",
    "paper_wr50_pro",
)
# Published averages over the 15 categories (used when all 15 are run).
PAPER_MEAN = {
    "paper_r18_pixel_auroc": 96.7,
    "paper_wr50_image_auroc": 95.3,
    "paper_wr50_pixel_auroc": 97.5,
    "paper_wr50_pro": 92.1,
}

COLUMNS = (
    "category", "n_train", "n_test", "n_defective",
    "image_auroc", "pixel_auroc", "aupro",
    "fit_s", "score_img_per_s", "maps_img_per_s",
    "rss_base_mib", "peak_rss_fit_mib", "peak_rss_mib",
    *PAPER_COLUMNS,
)  # fmt: skip
HEADERS = (
    "category", "train", "test", "defect",
    "img AUROC", "px AUROC", "AUPRO",
    "fit s", "score im/s", "maps im/s",
    "RSS base MiB", "RSS fit MiB", "RSS MiB",
    "p R18 img", "p R18 px", "p WR50 img", "p WR50 px", "p WR50 PRO",
)  # fmt: skip


def paper_row(category):
    values = PAPER.get(category.lower())
    if values is None:
        return dict.fromkeys(PAPER_COLUMNS)
    r18_px, wr50_px, wr50_pro = values
    return {
        "paper_r18_image_auroc": None,
        "paper_r18_pixel_auroc": r18_px,
        "paper_wr50_image_auroc": None,
        "paper_wr50_pixel_auroc": wr50_px,
        "paper_wr50_pro": wr50_pro,
    }


# -- worker: one category in its own process -----------------------------------
def _weights_arg(weights):
    if weights.lower() == "none":
        return None
    if weights.lower() == "default":
        return "DEFAULT"
    return str(Path(weights).expanduser().resolve())


def worker(cfg):
    import torch

    from skpadim import PatchCovariance, PatchGaussianDetector, TorchvisionExtractor
    from skpadim.datasets import load_masks, load_mvtec
    from skpadim.metrics import aupro, image_auroc, pixel_auroc

    threads = common.set_threads(cfg["threads"])
    cuda = cfg["device"] == "cuda"
    # Untimed warm-up of the linear algebra (its libraries load on first use).
    toy = np.random.RandomState(0).rand(4, 3, 2, 2)
    PatchCovariance(device=cfg["device"]).fit(toy).mahalanobis(toy)
    rss_base = common.current_rss_bytes()  # torch and skpadim imported, nothing else
    frame = load_mvtec(cfg["category_dir"])
    train = frame[frame.split == "train"]
    test = frame[frame.split == "test"]
    if cfg["max_train"] and cfg["max_train"] < len(train):
        train = train.iloc[common.spread_over_aspects(train.path, cfg["max_train"])]
    test = test.iloc[common.spaced_indices(len(test), cfg["max_test"])]
    train_paths = train.path.tolist()
    test_paths = test.path.tolist()
    y = test.label.to_numpy()

    torch.manual_seed(cfg["seed"])  # random backbone weights (--weights none) are reproducible
    extractor = TorchvisionExtractor(
        cfg["backbone"],
        layers=cfg["layers"],
        weights=_weights_arg(cfg["weights"]),
        image_size=cfg["image_size"],
        crop_size=cfg["crop_size"],
        batch_size=cfg["batch_size"],
        device=cfg["device"],
    )
    det = PatchGaussianDetector(
        extractor,
        n_features=cfg["n_features"],
        shrinkage=cfg["shrinkage"],
        **{k: cfg[k] for k in ("pooling", "image_score", "size_calibration", "localization")
           if cfg.get(k) is not None},
        batch_size=cfg["batch_size"],
        device=cfg["device"],
        random_state=cfg["seed"],
    )
    # Images are passed as paths: decoding is part of every timing, as in use.
    with common.Timer(cuda) as t_fit:
        det.fit(train_paths)
    rss_fit = common.max_rss_bytes()
    with common.Timer(cuda) as t_score:
        scores = -det.score_samples(test_paths)
    with common.Timer(cuda) as t_maps:
        maps = det.anomaly_maps(test_paths)
    rss = common.max_rss_bytes()

    maps = list(maps)
    masks = load_masks(test.mask_path.tolist(), shapes=[m.shape for m in maps])
    both = 0 < y.sum() < len(y)
    result = {
        "category": cfg["category"],
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "n_defective": int(y.sum()),
        "image_auroc": 100 * image_auroc(y, scores) if both else None,
        "pixel_auroc": 100 * pixel_auroc(masks, maps) if y.sum() else None,
        "aupro": 100 * aupro(masks, maps, max_fpr=0.3) if y.sum() else None,
        "fit_s": t_fit.seconds,
        "score_img_per_s": len(test_paths) / t_score.seconds,
        "maps_img_per_s": len(test_paths) / t_maps.seconds,
        "rss_base_mib": rss_base / common.MIB,
        "peak_rss_fit_mib": rss_fit / common.MIB,
        "peak_rss_mib": rss / common.MIB,
        "torch_threads": threads,
        "layers": list(det.feature_extractor_.layers_),
        "n_channels": det.n_features_in_,
        "grid_shape": list(det.gaussian_.grid_shape_),
    }
    if cuda:
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / common.MIB
    common.write_worker_result(cfg, result)


# -- driver --------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes a table, CSV and JSON to benchmarks/results/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--root",
        help="a folder in the MVTec AD layout: either one category folder (holding train/good) "
        "or a folder of category folders. In this project the real magnetic-tile set is at "
        "../shared/data/magnetic_tile relative to the repository root.",
    )
    src.add_argument(
        "--textures",
        action="store_true",
        help="write the built-in real-texture set (skpadim.datasets.write_mvtec: brick, grass, "
        "gravel) to a temporary folder and run on it",
    )
    p.add_argument("--categories", nargs="+", help="categories to run (default: all found)")
    p.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0")
    p.add_argument(
        "--weights",
        default="default",
        help="'default' (ImageNet: shipped with pip for efficientnet_lite0, read from torch's hub "
        "cache for the ResNets), 'none' (random, seeded by --seed), or a path to a state dict",
    )
    p.add_argument("--layers", nargs="+", help="backbone layers (default: the extractor's choice)")
    p.add_argument(
        "--n-features",
        type=int,
        help="channels kept at random (default: 100, or 550 for wide_resnet50_2 as in the paper)",
    )
    p.add_argument(
        "--shrinkage",
        default="ledoit-wolf",
        help="'ledoit-wolf' (default) or a fixed eps added to the covariance diagonal (paper: 0.01)",
    )
    p.add_argument(
        "--pooling", type=int,
        help="neighbourhood pooling of the embeddings (default: the detector's, 3; paper: 1)",
    )
    p.add_argument(
        "--image-score",
        help="'max' (paper) or the top fraction of the map averaged (default: the detector's, 0.01)",
    )
    p.add_argument(
        "--size-calibration",
        choices=("on", "off"),
        help="put maps of differently sized images on one scale (default: the detector's, on; "
        "paper: off). It changes nothing when the training images all have one size",
    )
    p.add_argument(
        "--localization",
        choices=("auto", "frame", "tiled"),
        help="where the maps come from (default: the detector's, auto: tiled when the training "
        "images' sizes differ, else frame; paper: frame)",
    )
    p.add_argument("--image-size", type=int, default=224, help="resize side (default: 224)")
    p.add_argument("--crop-size", type=int, help="centre crop after the resize (paper: 256 then 224)")
    p.add_argument(
        "--max-train",
        type=int,
        help="at most this many training images per category, spread over their aspect ratios",
    )
    p.add_argument(
        "--max-test",
        type=int,
        help="at most this many test images per category, spread evenly over the defect types",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default here)")
    p.add_argument("--seed", type=int, default=0, help="channel subset and random weights")
    p.add_argument("--texture-n-train", type=int, default=60, help="with --textures (default: 60)")
    p.add_argument("--texture-n-test", type=int, default=40, help="with --textures (default: 40)")
    p.add_argument("--texture-size", type=int, default=128, help="with --textures (default: 128)")
    p.add_argument("--results-dir", help="where to write CSV/JSON (default: benchmarks/results)")
    p.add_argument("--tag", default="", help="extra text for the result file names")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None and not args.root and not args.textures:
        p.error("give --root DIR or --textures")
    return args


def find_categories(root):
    """[(name, folder)] of the MVTec categories under root (or root itself)."""
    root = Path(root)
    if (root / "train" / "good").is_dir():
        return [(root.resolve().name, root)]
    found = sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise SystemExit(f"{root} holds no train/good folder nor category folders with one.")
    return [(p.name, p) for p in found]


def run_name(args, dataset, n_features, shrinkage):
    weights = args.weights.lower()
    if weights not in ("default", "none"):
        weights = Path(args.weights).stem
    parts = [
        "mvtec", dataset, args.backbone, f"w-{weights}", f"nf{n_features}",
        f"shrink-{shrinkage}", f"s{args.image_size}",
    ]  # fmt: skip
    if args.crop_size:
        parts.append(f"crop{args.crop_size}")
    if args.pooling is not None:
        parts.append(f"pool{args.pooling}")
    if args.image_score is not None:
        parts.append(f"score-{args.image_score}")
    if args.size_calibration is not None:
        parts.append(f"calibration-{args.size_calibration}")
    if args.localization is not None:
        parts.append(f"maps-{args.localization}")
    if args.max_train:
        parts.append(f"train{args.max_train}")
    if args.max_test:
        parts.append(f"test{args.max_test}")
    parts.append(args.device)
    if args.tag:
        parts.append(args.tag)
    return "_".join(common.slug(p) for p in parts)


def mean_row(rows):
    row = {"category": "mean"}
    for col in COLUMNS[1:]:
        if col in PAPER_COLUMNS:
            continue
        values = [r[col] for r in rows if r.get(col) is not None]
        row[col] = float(np.mean(values)) if values else None
    names = {r["category"].lower() for r in rows}
    for col in PAPER_COLUMNS:
        values = [r[col] for r in rows if r.get(col) is not None]
        if names >= set(PAPER) and col in PAPER_MEAN:
            row[col] = PAPER_MEAN[col]  # the published average
        elif values and len(values) == len(rows):
            row[col] = round(float(np.mean(values)), 2)
        else:
            row[col] = None
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    n_features = args.n_features or DEFAULT_N_FEATURES[args.backbone]
    shrinkage = args.shrinkage if args.shrinkage == "ledoit-wolf" else float(args.shrinkage)
    image_score = args.image_score
    if image_score is not None and image_score != "max":
        image_score = float(image_score)
    env = common.environment(threads, args.device)
    common.print_environment(env)

    with tempfile.TemporaryDirectory(prefix="skpadim-bench-") as tmp:
        if args.textures:
            from skpadim.datasets import write_mvtec

            root = Path(tmp) / "textures"
            for i, texture in enumerate(TEXTURES):
                write_mvtec(
                    root, texture, n_train=args.texture_n_train, n_test=args.texture_n_test,
                    image_size=args.texture_size, random_state=args.seed + i,
                )  # fmt: skip
            dataset = f"textures{args.texture_size}"
        else:
            root = Path(args.root)
            dataset = root.resolve().name
        categories = find_categories(root)
        if args.categories:
            known = dict(categories)
            missing = [c for c in args.categories if c not in known]
            if missing:
                raise SystemExit(f"unknown categories {missing}; found {sorted(known)}")
            categories = [(c, known[c]) for c in args.categories]

        rows = []
        for name, folder in categories:
            cfg = {
                "category": name, "category_dir": str(folder), "backbone": args.backbone,
                "weights": args.weights, "layers": args.layers, "n_features": n_features,
                "shrinkage": shrinkage, "image_size": args.image_size, "crop_size": args.crop_size,
                "pooling": args.pooling, "image_score": image_score,
                "size_calibration": None if args.size_calibration is None
                else args.size_calibration == "on",
                "localization": args.localization,
                "max_train": args.max_train, "max_test": args.max_test, "device": args.device,
                "batch_size": args.batch_size, "seed": args.seed, "threads": threads,
            }  # fmt: skip
            print(f"[{name}] fitting and scoring in a fresh process ...", flush=True)
            result = common.run_worker(__file__, cfg, tmp, threads, common.slug(name))
            result.update(paper_row(name))
            rows.append(result)
            print(common.format_table([result], COLUMNS[:13], HEADERS[:13]).splitlines()[-1], flush=True)

    table_rows = rows + ([mean_row(rows)] if len(rows) > 1 else [])
    print()
    print(
        f"{args.backbone} weights={args.weights} layers={rows[0]['layers']} "
        f"channels={n_features}/{rows[0]['n_channels']} shrinkage={shrinkage} "
        f"image_size={args.image_size} crop={args.crop_size} device={args.device} threads={threads}"
    )
    print(common.format_table(table_rows, COLUMNS, HEADERS))
    print(
        "AUROCs and AUPRO in %; AUPRO integrates the PRO curve to FPR 0.3. 'p ...' columns: "
        "Defard et al. 2021 (Table II pixel AUROC and PRO per category; image AUROC only as "
        "the all-category mean); blank where the paper gives no figure or for non-MVTec data. "
        "fit s includes building the backbone, decoding the images and the detector's second "
        "pass over the training images for its threshold. RSS base: after importing torch and "
        "skpadim; RSS fit: peak up to the end of fit; RSS: peak up to the end of scoring (each "
        "category in a fresh process)."
    )
    name = run_name(args, dataset, n_features, shrinkage)
    meta = {
        "benchmark": "mvtec",
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "n_features": n_features,
        "shrinkage": shrinkage,
        "environment": env,
    }
    csv_path, json_path = common.write_results(name, table_rows, COLUMNS, meta, args.results_dir)
    print(f"wrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()

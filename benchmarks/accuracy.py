"""Accuracy of the paper's recipe, the defaults and ablations on an MVTec-layout category.

Every configuration is fitted on ``train/good`` (optionally with defective test
images mixed in, ``--contaminate``) in a fresh Python process, and evaluated on
the test images: image AUROC, pixel AUROC and AUPRO (FPR <= 0.3), with maps at
each test image's own resolution; fit seconds, scoring images/s (maps
included) and peak RSS.

Validation protocol. The test images are split once, per defect type (and the
good ones), into two halves with a fixed seed: ``val`` and ``final``. Every
choice of default since the split was made on ``val`` only, and the two made
before it (Ledoit-Wolf shrinkage, a frame with the images' proportions) were
kept after checking them there; ``final`` is the held-out report.
The table shows both halves and the whole test set (``all``, the figure to
compare with published ones).

Configurations (``--configs``): ``paper`` (the PaDiM recipe: EfficientNet-Lite0,
images squashed to 224 x 224, 100 random channels, Sigma + 0.01 I, sigma=4 blur,
image score = map maximum), ``defaults`` (``PatchGaussianDetector()`` with no
arguments) and ablations of the defaults, one change each (see ``CONFIGS``).

Contamination study (``--contaminate 0.02 0.05``): defective test images, drawn
at random, are added to ``train/good`` until they make up that fraction of the
training set, and leave the evaluation; each level runs, on that reduced test
set, the defaults fitted on the clean training set (the reference), on the
contaminated one, and on the contaminated one with ``trim`` set to the same
fraction, by image and by patch (the remedies). ``test of`` names the level whose
test set a row used, ``trim bad`` how many of the images ``trim`` left out were
defective (by image only).

Examples (from the repository root)::

    python benchmarks/accuracy.py --root ../shared/data/magnetic_tile
    python benchmarks/accuracy.py --root ../shared/data/magnetic_tile --configs defaults \\
        --contaminate 0.02 0.05
    python benchmarks/accuracy.py --textures
    python benchmarks/accuracy.py --textures --elongated

``--strips 3`` (with ``--root``) lays every image and mask three times side by
side, the middle copy mirrored, so that magnetic tile's parts (median
height/width 1.18) become 1:2.5 strips that keep their real, small defects at
full resolution.

``--elongated`` cuts the texture set's 504 x 504 tiles into strips of 200 x 504
pixels (the 1:2.5 proportions of many inspection lines' parts, 500 x 1260 px),
each defective strip around its defect, so that the paper's square frame and
the defaults' frame with the images' proportions can be compared on
elongated parts.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# Changes from the defaults, one per ablation; "paper" is the full recipe.
PAPER = {"image_size": 224, "n_features": 100, "shrinkage": 0.01, "pooling": 1, "image_score": "max",
         "size_calibration": False, "localization": "frame"}
CONFIGS = {
    "paper": PAPER,
    "defaults": {},
    "square-224": {"image_size": 224},
    "short-288": {"image_size": "short288"},
    "area-224": {"image_size": "area224"},
    "lite1": {"backbone": "efficientnet_lite1"},
    "lite2": {"backbone": "efficientnet_lite2"},
    # Which blocks of Lite0 (default: the ends of the stride 4, 8 and 16 stages):
    # the stride-32 stage added (368 channels, so 200 drawn at random), or the
    # stride-4 one dropped (a grid half as fine).
    "blocks-4-8-16-32": {"layers": ("_blocks.2", "_blocks.4", "_blocks.10", "_blocks.14")},
    "blocks-8-16": {"layers": ("_blocks.4", "_blocks.10")},
    "rd100": {"n_features": 100},
    "eps-0.01": {"shrinkage": 0.01},
    "no-pooling": {"pooling": 1},
    "score-max": {"image_score": "max"},
    "no-size-calibration": {"size_calibration": False},
    # Maps from the frame's Gaussians, as the scores (the defaults take them from
    # Gaussians on windows at one pixel scale when image sizes differ).
    "frame-maps": {"localization": "frame"},
    "sigma-2": {"sigma": 2.0},
    "sigma-8": {"sigma": 8.0},
    # The paper's recipe with ImageNet's mean and std instead of the Lite
    # weights' own (0.5, 0.5): what a pipeline written for ResNets would feed.
    "paper-imagenet-norm": {**PAPER, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    # The defaults inside TiledDetector: every image at one pixel scale (the
    # median shorter side at 224 px), windows of the defaults' frame.
    "tiled": {"tiled": True},
}
EXTRACTOR_KEYS = ("backbone", "layers", "image_size", "mean", "std")
DEFAULT_CONFIGS = ("paper", "defaults")
SPLIT_SEED = 0

COLUMNS = (
    "config", "n_train", "n_test",
    "image_auroc_val", "pixel_auroc_val", "aupro_val",
    "image_auroc_final", "pixel_auroc_final", "aupro_final",
    "image_auroc", "pixel_auroc", "aupro", "false_alarm_pct", "detected_pct", "false_alarm_in_sample_pct",
    "fit_s", "maps_img_per_s", "peak_rss_mib", "contamination", "trim", "trim_by", "test_set",
    "trimmed_defective",
)  # fmt: skip
HEADERS = (
    "config", "train", "test",
    "img val", "px val", "PRO val", "img fin", "px fin", "PRO fin",
    "img all", "px all", "PRO all", "FA %", "det %", "FA in %", "fit s", "im/s", "RSS MiB",
    "contam", "trim", "by", "test of", "trim bad",
)  # fmt: skip


def split_halves(frame, seed=SPLIT_SEED):
    """Boolean ``val`` flags: half of each defect type's test images (and of the good)."""
    rng = np.random.RandomState(seed)
    val = np.zeros(len(frame), bool)
    for _, group in frame.groupby("defect_type", sort=True):
        idx = np.arange(len(frame))[frame.index.isin(group.index)]
        rng.shuffle(idx)
        val[idx[: len(idx) // 2]] = True
    return val


def build(cfg):
    """The detector of a configuration (its changes applied to the defaults)."""
    from skpadim import PatchGaussianDetector, TiledDetector, TorchvisionExtractor

    change = CONFIGS[cfg["config"]]
    det = PatchGaussianDetector(random_state=cfg["seed"], trim=cfg["trim"],
                                trim_by=cfg.get("trim_by") or "image")
    det.set_params(**{k: v for k, v in change.items() if k not in EXTRACTOR_KEYS + ("tiled",)})
    ext = {k: change[k] for k in ("backbone", "layers", "mean", "std") if k in change}
    size = change.get("image_size")
    if isinstance(size, int):
        ext["image_size"] = size
    elif size == "short288":
        from skpadim.feature_extraction import auto_image_size

        ext["image_size"] = auto_image_size(cfg["train_paths"], short_side=288)
    elif size == "area224":
        from skpadim._images import image_shapes

        ratio = float(np.median([h / w for h, w in image_shapes(cfg["train_paths"])]))
        elong = max(ratio, 1 / ratio)
        short = 224 / np.sqrt(elong)
        sides = (max(32, int(round(short / 32)) * 32), max(32, int(round(short * elong / 32)) * 32))
        ext["image_size"] = sides[::-1] if ratio > 1 else sides
    det.set_params(feature_extractor=TorchvisionExtractor(**ext))
    return TiledDetector(det) if change.get("tiled") else det


def cut_strips(frame, height, seed):
    """Crop every image of an MVTec-layout ``frame`` (and its mask) to ``height`` rows, in place.

    A defective image's strip holds its defect's central row (at a random place
    in the strip); other strips lie at random.
    """
    from PIL import Image

    rng = np.random.RandomState(seed)
    for path, mask_path in zip(frame.path, frame.mask_path):
        image = Image.open(path)
        top = rng.randint(0, image.height - height + 1)
        if isinstance(mask_path, str) and mask_path:
            mask = Image.open(mask_path)
            rows = np.flatnonzero(np.asarray(mask).reshape(mask.height, -1).any(axis=1))
            centre = int(np.median(rows))
            top = int(np.clip(centre - rng.randint(20, height - 20), 0, image.height - height))
            mask.crop((0, top, mask.width, top + height)).save(mask_path)
        image.crop((0, top, image.width, top + height)).save(path)


def lay_side_by_side(root, out, copies):
    """A copy of the MVTec-layout folder ``root`` in ``out``, every image and mask
    laid ``copies`` times side by side, every other copy mirrored (lossless PNG)."""
    from PIL import Image

    for path in sorted(Path(root).rglob("*")):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            continue
        a = np.asarray(Image.open(path))
        strip = np.concatenate([a if i % 2 == 0 else a[:, ::-1] for i in range(copies)], axis=1)
        target = (out / path.relative_to(root)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).save(target)
    return out


def _metrics(y, scores, masks, maps, sel):
    from skpadim.metrics import aupro, image_auroc, pixel_auroc

    idx = np.flatnonzero(sel)
    m = [masks[i] for i in idx]
    a = [maps[i] for i in idx]
    return (100 * image_auroc(y[idx], scores[idx]), 100 * pixel_auroc(m, a),
            100 * aupro(m, a, max_fpr=0.3))  # fmt: skip


def worker(cfg):
    from skpadim.datasets import load_masks

    common.set_threads(cfg["threads"])
    from skpadim.detector import _to_image_resolution, _image_scores_from_maps
    from skpadim import TiledDetector
    from skpadim.tiling import _resized

    det = build(cfg)
    with common.Timer() as t_fit:
        det.fit(cfg["train_paths"])
    # One pass for maps and image scores: what anomaly_maps and score_samples
    # each compute, from the same maps on the preprocessed frame; two where the
    # maps come from a localizer (the scores from the frame, the maps from windows).
    maps, scores = [], []
    tiled = isinstance(det, TiledDetector)
    with common.Timer() as t_maps:
        if tiled:  # maps on each image's resized pixels, stitched from its windows
            for amap, shape in det._iter_image_maps(cfg["test_paths"]):
                scores.append([det._image_score(amap)])
                maps.append(_resized(amap, shape).numpy())
        else:
            localized = det.localizer_ is not None  # maps from its windows, scores from the frame
            for frame_maps, emb in det._iter_maps(cfg["test_paths"]):
                scores.append(_image_scores_from_maps(frame_maps, det.image_score).cpu().numpy())
                if not localized:
                    maps += [_to_image_resolution(m, shape, emb.resize_shape, emb.crop_box).cpu().numpy()
                             for m, shape in zip(frame_maps, emb.image_shapes)]  # fmt: skip
            if localized:
                maps = list(det.iter_anomaly_maps(cfg["test_paths"]))
    scores = np.concatenate(scores).astype(np.float64)
    head = cfg["test_paths"][:4]
    np.testing.assert_allclose(-det.score_samples(head), scores[:4], rtol=1e-6)
    for ours, public in zip(maps, det.anomaly_maps(head)):
        np.testing.assert_allclose(ours, public, rtol=1e-6, atol=1e-6)
    inner = det.detector_ if tiled else det
    masks = load_masks(cfg["mask_paths"], shapes=[m.shape for m in maps])
    y = np.asarray(cfg["labels"])
    val = np.asarray(cfg["val"])
    result = {"config": cfg["config"], "n_train": len(cfg["train_paths"]),
              "n_test": len(y), "fit_s": t_fit.seconds,
              "maps_img_per_s": len(y) / t_maps.seconds,
              "peak_rss_mib": common.max_rss_bytes() / common.MIB,
              "contamination": cfg["contamination"], "trim": cfg["trim"],
              "trim_by": (cfg.get("trim_by") or "image") if cfg["trim"] else "",
              "test_set": cfg.get("test_reduced_for", 0.0),
              "params": {k: repr(v) for k, v in inner.get_params().items()
                         if not k.startswith("feature_extractor__") or k.endswith(
                             ("backbone", "image_size", "layers"))},
              "resize_shape": list(inner.feature_extractor_.resize_shape_),
              "trimmed": len(inner.trimmed_indices_),
              # The defective images added to the training set come last.
              "trimmed_defective": int(np.sum(inner.trimmed_indices_ >= cfg["n_clean_train"]))}  # fmt: skip
    if tiled:
        result.update(scale=det.scale_, n_windows=det.n_windows_)
    elif det.localizer_ is not None:
        result.update(scale=det.localizer_.scale_, n_windows=det.localizer_.n_windows_,
                      window=list(det.localizer_.window_))
    # predict() at the threshold fit set from contamination (0.01): the good
    # test images it rejects and the defective ones it catches, in %.
    flagged = -scores < det.offset_
    result["false_alarm_pct"] = 100 * float(np.mean(flagged[y == 0]))
    result["detected_pct"] = 100 * float(np.mean(flagged[y == 1]))
    if cfg.get("in_sample"):
        # The same quantile of the training images' in-sample scores, as a
        # threshold would be without leaving each image out.
        in_sample = np.percentile(det.score_samples(cfg["train_paths"]), 100 * inner.contamination)
        result["false_alarm_in_sample_pct"] = 100 * float(np.mean(-scores[y == 0] < in_sample))
    for suffix, sel in (("_val", val), ("_final", ~val), ("", np.ones_like(val))):
        img, px, pro = _metrics(y, scores, masks, maps, sel)
        result.update({f"image_auroc{suffix}": img, f"pixel_auroc{suffix}": px, f"aupro{suffix}": pro})
    if cfg.get("figure"):
        draw_figure(cfg, maps, masks, y)
    common.write_worker_result(cfg, result)


def draw_figure(cfg, maps, masks, y, height=192):
    """Two test images of each defect type and two good ones, with their maps.

    Top: the image with the true defect outlined in magenta; bottom: the map
    overlaid, on one colour scale for all (1st to 99.9th percentile of the maps).
    """
    from PIL import Image

    from skpadim.__main__ import figure_rows
    from skpadim.datasets import load_images

    types = [Path(p).parent.name for p in cfg["test_paths"]]
    shown = []
    for kind in sorted(set(types) - {"good"}) + ["good"]:
        shown += [i for i, t in enumerate(types) if t == kind][:2]
    values = np.concatenate([m.ravel() for m in maps])
    vmin, vmax = np.percentile(values, 1), np.percentile(values, 99.9)

    def fit_height(a, resample):
        w = max(1, round(a.shape[1] * height / a.shape[0]))
        return np.asarray(Image.fromarray(a).resize((w, height), resample))

    images, shown_maps, shown_masks = [], [], []
    for i, img in zip(shown, load_images([cfg["test_paths"][i] for i in shown])):
        img = (np.asarray(img) * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        images.append(fit_height(img, Image.BILINEAR))
        shown_maps.append(fit_height(maps[i].astype(np.float32), Image.BILINEAR))
        shown_masks.append(fit_height(masks[i].astype(np.uint8) * 255, Image.NEAREST) > 127)
    Image.fromarray(figure_rows(images, shown_maps, shown_masks, vmin, vmax)).save(
        cfg["figure"], quality=90
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--root", help="one category folder in the MVTec AD layout")
    src.add_argument("--textures", action="store_true",
                     help="the built-in real-texture set (brick) written in the MVTec layout")  # fmt: skip
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help=f"configurations to run, of {sorted(CONFIGS)} or 'all'")  # fmt: skip
    p.add_argument("--contaminate", nargs="+", type=float, default=[],
                   help="fractions of defective images added to train/good (runs the defaults "
                   "with and without trim)")  # fmt: skip
    p.add_argument("--strips", type=int,
                   help="with --root: lay each image (and mask) this many times side by side, "
                   "every other copy mirrored, into an elongated part")
    p.add_argument("--elongated", action="store_true",
                   help="with --textures: strips of 200 x 504 px cut from 504 px tiles")
    p.add_argument("--max-train", type=int, help="at most this many training images")
    p.add_argument("--figure", help="write a figure of test images and the maps of the first "
                   "configuration to this path (e.g. doc/images/magnetic_tile.jpg)")
    p.add_argument("--in-sample", action="store_true",
                   help="also report the false alarms of a threshold on in-sample training scores "
                        "(one more pass over the training images)")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir")
    p.add_argument("--tag", default="")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None and not args.root and not args.textures:
        p.error("give --root DIR or --textures")
    if args.elongated and not args.textures:
        p.error("--elongated applies to --textures")
    if args.strips is not None and (not args.root or args.strips < 2):
        p.error("--strips applies to --root and takes a count of at least 2")
    if args.configs == ["all"]:
        args.configs = list(CONFIGS)
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return
    import torch

    from skpadim.datasets import load_mvtec, write_mvtec

    threads = args.threads or torch.get_num_threads()
    env = common.environment(threads)
    common.print_environment(env)
    with tempfile.TemporaryDirectory(prefix="skpadim-acc-") as tmp:
        if args.textures:
            root = write_mvtec(Path(tmp) / "textures", "brick", n_train=60, n_test=40,
                               image_size=504 if args.elongated else 128,
                               random_state=args.seed)  # fmt: skip
            dataset = "textures-brick"
            if args.elongated:
                cut_strips(load_mvtec(root), height=200, seed=args.seed)
                dataset += "-elongated"
        else:
            root = Path(args.root)
            dataset = root.resolve().name
            if args.strips:
                root = lay_side_by_side(root, Path(tmp) / dataset, args.strips)
                dataset += f"-strips{args.strips}"
        frame = load_mvtec(root)
        train = frame[frame.split == "train"]
        test = frame[frame.split == "test"].reset_index(drop=True)
        if args.max_train:
            train = train.iloc[common.spread_over_aspects(train.path, args.max_train)]
        val = split_halves(test)
        # (config, contamination, trim, defective images in training): per level,
        # a clean fit scored on the same reduced test set as the contaminated
        # ones, so that the three rows of a level compare like with like.
        runs = [(c, 0.0, 0.0, "", False) for c in args.configs]
        runs += [("defaults", frac, trim, by, mixed) for frac in args.contaminate
                 for trim, by, mixed in ((0.0, "", False), (0.0, "", True),
                                         (frac, "image", True), (frac, "patch", True))]  # fmt: skip
        name = "_".join(common.slug(p) for p in ("accuracy", dataset, args.tag) if p)
        if args.contaminate:
            name += "_contamination"
        meta = {"benchmark": "accuracy",
                "config": {k: v for k, v in vars(args).items() if k != "worker"},
                "split_seed": SPLIT_SEED, "configs": {k: CONFIGS[k] for k in args.configs},
                "environment": env}  # fmt: skip

        def save(rows):
            return common.write_results(name, rows, COLUMNS, meta, args.results_dir)

        rows = []
        for i, (config, frac, trim, trim_by, mixed) in enumerate(runs):
            keep = np.ones(len(test), bool)
            extra = []
            if frac:
                # Defective images drawn at random join the training set and leave the test set.
                rng = np.random.RandomState(args.seed)
                bad = np.flatnonzero(test.label.to_numpy() == 1)
                n_bad = int(round(frac * len(train) / (1 - frac)))
                moved = rng.choice(bad, n_bad, replace=False)
                keep[moved] = False
                extra = test.path[moved].tolist() if mixed else []
            cfg = {"config": config, "seed": args.seed, "threads": threads,
                   "contamination": frac if mixed else 0.0, "trim": trim, "trim_by": trim_by,
                   "n_clean_train": len(train), "test_reduced_for": frac,
                   "train_paths": train.path.tolist() + extra,
                   "test_paths": test.path[keep].tolist(),
                   "mask_paths": test.mask_path[keep].tolist(),
                   "labels": test.label[keep].tolist(), "val": val[keep].tolist(),
                   "figure": args.figure if i == 0 else None, "in_sample": args.in_sample}  # fmt: skip
            print(f"[{config} contamination={frac if mixed else 0.0} trim={trim} {trim_by}, test set of "
                  f"level {frac}] ...", flush=True)
            result = common.run_worker(__file__, cfg, tmp, threads, f"run{i}")
            rows.append(result)
            print(common.format_table([result], COLUMNS, HEADERS), flush=True)
            save(rows)  # after every run: a long study that is cut short keeps its rows
    print()
    print(f"{dataset}: test split per defect type into val / final halves (seed {SPLIT_SEED}); "
          "AUROCs and AUPRO@0.3 in %. fit s: every pass of fit (statistics, threshold; "
          "trim adds two, a localizer one), images decoded from disk; im/s: anomaly maps at "
          "image resolution and image scores (one pass; with a localizer, one for each); "
          "FA % / det %: good test images rejected / defective ones caught by predict at the "
          "threshold of the fit (contamination 0.01); FA in %: good test images rejected by a "
          "threshold on in-sample training scores (--in-sample).")  # fmt: skip
    print(common.format_table(rows, COLUMNS, HEADERS))
    csv_path, json_path = save(rows)
    print(f"wrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()

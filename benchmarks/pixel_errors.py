"""Where the pixel AUROC is lost: which normal pixels outscore the defects.

Fits ``PatchGaussianDetector(localization="frame")`` (the defaults, their maps
taken from the frame that scores the images) on ``train/good`` of an
MVTec-layout category and takes its anomaly maps of the test images at their own
resolution. The pixel AUROC pits every defect pixel against every normal pixel;
this script splits the normal pixels into groups and gives the AUROC of the
defect pixels against each group alone:

* ``good images``: all pixels of the defect-free test images;
* ``defective, d px``: normal pixels of the defective test images, by their
  distance ``d`` to the nearest defect pixel (bands 0-8, 8-16, 16-32, 32-64 and
  over 64 px). Near a defect, the blur and the patches' receptive fields spread
  its score; far from it, a high score means the whole image looks unusual.

Per defect type: the pixel AUROC with the good images, the median over images of
each map's median value, and the fraction of normal pixels above the good
images' 99th percentile (1% on good images by construction).

Geometry: every image is resized to the detector's one frame, so images of
different sizes are magnified differently, and one whose height/width differs
from the frame's is stretched one way. A second table gives, per group of test
images, the Spearman correlation of the median score of the image's normal
pixels with the magnification along each axis (``log(frame H / H)``,
``log(frame W / W)``) and with the stretch (``|log((H / W) / (frame H /
frame W))|``): whether the whole map rises with the resize.

A third table asks whether the image scores rest on the defects themselves:
per defect type, the share of defective images whose map maximum lies within
16 px of a defect pixel, and the image AUROC against all good test images,
overall and within each third of the test images by width (narrow, middle,
wide).

``--tiled`` runs ``TiledDetector()`` (every image at one pixel scale) instead of
the defaults; its images are not resized into one frame, so the second table is
left out.

Example (from the repository root)::

    python benchmarks/pixel_errors.py --root ../shared/data/magnetic_tile
    python benchmarks/pixel_errors.py --root ../shared/data/magnetic_tile --tiled
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _common as common  # noqa: E402

BANDS = ((0, 8), (8, 16), (16, 32), (32, 64), (64, np.inf))
COLUMNS = ("group", "n_pixels", "auroc_vs_defects", "median_map", "frac_above_good_q99")
HEADERS = ("normal pixels of", "pixels", "AUROC %", "median map", "> good q99")


def auroc(positives, negatives):
    """AUROC of ``positives`` against ``negatives`` (1-D), with skpadim.metrics."""
    from skpadim.metrics import pixel_auroc

    return 100 * pixel_auroc(
        [np.ones((1, positives.size), bool), np.zeros((1, negatives.size), bool)],
        [positives[None], negatives[None]],
    )


def analyse(maps, masks, defect_types):
    """Rows of the table from maps and masks (lists of 2-D arrays) and each image's type."""
    from scipy.ndimage import distance_transform_edt

    from skpadim.metrics import pixel_auroc

    types = np.asarray(defect_types)
    good = np.flatnonzero(types == "good")
    bad = np.flatnonzero(types != "good")
    defects = np.concatenate([maps[i][masks[i]] for i in bad])
    good_pixels = np.concatenate([maps[i].ravel() for i in good])
    q99 = np.quantile(good_pixels, 0.99)

    def row(group, values, medians=None):
        # The median map is a figure of whole images: none for a distance band.
        return {"group": group, "n_pixels": int(values.size),
                "auroc_vs_defects": auroc(defects, values),
                "median_map": None if medians is None else float(np.median(medians)),
                "frac_above_good_q99": float(np.mean(values > q99))}  # fmt: skip

    medians = np.array([np.median(m) for m in maps])
    rows = [row("good images", good_pixels, medians[good])]
    bands = {band: [] for band in BANDS}
    for i in bad:
        distance = distance_transform_edt(~masks[i])
        for lo, hi in BANDS:
            bands[lo, hi].append(maps[i][~masks[i] & (distance > lo) & (distance <= hi)])
    for (lo, hi), values in bands.items():
        name = f"defective, {lo}-{hi:g} px" if np.isfinite(hi) else f"defective, > {lo} px"
        rows.append(row(name, np.concatenate(values)))
    for kind in sorted(set(types[bad])):
        idx = np.flatnonzero(types == kind)
        normal = np.concatenate([maps[i][~masks[i]] for i in idx])
        r = row(f"{kind} images (all normal px)", normal, medians[idx])
        sel = np.concatenate([good, idx])
        r["pixel_auroc_with_good"] = 100 * pixel_auroc([masks[i] for i in sel], [maps[i] for i in sel])
        rows.append(r)
    rows.append({"group": "all normal pixels", "n_pixels": int(sum(m.size for m in maps) - defects.size),
                 "auroc_vs_defects": 100 * pixel_auroc(masks, maps)})  # fmt: skip
    return rows


def geometry(maps, masks, defect_types, frame):
    """Rows: per group of images, how the median of the normal pixels' scores follows
    the resize into ``frame`` (Spearman's rho)."""
    from scipy.stats import spearmanr

    types = np.asarray(defect_types)
    shapes = np.array([m.shape for m in maps], dtype=float)
    zoom_h, zoom_w = np.log(frame[0] / shapes[:, 0]), np.log(frame[1] / shapes[:, 1])
    stretch = np.abs(zoom_h - zoom_w)
    level = np.array([np.median(m[~k]) for m, k in zip(maps, masks)])
    rows = []
    for group in ["good"] + sorted(set(types) - {"good"}) + ["all"]:
        sel = np.ones(len(types), bool) if group == "all" else types == group
        rows.append({"images": group, "n": int(sel.sum()),
                     "rho_zoom_h": float(spearmanr(zoom_h[sel], level[sel])[0]),
                     "rho_zoom_w": float(spearmanr(zoom_w[sel], level[sel])[0]),
                     "rho_stretch": float(spearmanr(stretch[sel], level[sel])[0])})  # fmt: skip
    return rows


def localisation(maps, masks, scores, defect_types, near=16):
    """Rows: per defect type, where each map peaks and how the image scores
    separate the type from the good images, by thirds of the images' width."""
    from scipy.ndimage import distance_transform_edt

    from skpadim.metrics import image_auroc

    types = np.asarray(defect_types)
    widths = np.array([m.shape[1] for m in maps])
    edges = np.quantile(widths, [1 / 3, 2 / 3])
    third = np.searchsorted(edges, widths, side="right")  # 0 narrow, 1 middle, 2 wide
    good = types == "good"
    rows = []
    for kind in sorted(set(types) - {"good"}):
        idx = np.flatnonzero(types == kind)
        peaks_near = [distance_transform_edt(~masks[i]).ravel()[np.argmax(maps[i])] <= near for i in idx]
        row = {"defect_type": kind, "n": len(idx), "peak_near_defect_pct": 100 * float(np.mean(peaks_near))}
        for t, name in enumerate(("all", "narrow", "middle", "wide"), start=-1):
            sel = good | (types == kind)
            if t >= 0:
                sel &= third == t
            y = (types[sel] != "good").astype(int)
            row[f"image_auroc_{name}"] = 100 * image_auroc(y, scores[sel]) if 0 < y.sum() < len(y) else None
            row[f"n_{name}"] = int(y.sum())
        rows.append(row)
    return rows, [int(e) for e in edges]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="MVTec-layout category folder")
    parser.add_argument("--max-train", type=int, default=None, help="training images, spread (quick runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--tiled", action="store_true",
                        help="TiledDetector() instead of the defaults (default: off)")
    args = parser.parse_args(argv)
    import torch

    from skpadim import PatchGaussianDetector, TiledDetector
    from skpadim.datasets import load_masks, load_mvtec

    threads = args.threads or torch.get_num_threads()
    common.set_threads(threads)
    env = common.environment(threads)
    common.print_environment(env)
    root = Path(args.root)
    frame = load_mvtec(root)
    train = frame[frame.split == "train"]
    test = frame[frame.split == "test"].reset_index(drop=True)
    if args.max_train:
        train = train.iloc[common.spread_over_aspects(train.path, args.max_train)]
    # The frame's maps, whose levels follow each image's magnification onto the
    # frame (the defaults take their maps from windows when image sizes differ).
    det = PatchGaussianDetector(random_state=args.seed, localization="frame")
    det = (TiledDetector(det) if args.tiled else det).fit(train.path.tolist())
    maps = list(det.anomaly_maps(test.path.tolist()))
    scores = -det.score_samples(test.path.tolist())
    masks = [m > 0 for m in load_masks(test.mask_path.tolist(), shapes=[m.shape for m in maps])]
    types = test.defect_type.tolist()
    rows = analyse(maps, masks, types)
    peak_rows, width_edges = localisation(maps, masks, scores, types)
    parts = ("pixel_errors", root.resolve().name, "tiled" if args.tiled else "")
    name = "_".join(common.slug(p) for p in parts if p)
    columns = COLUMNS + ("pixel_auroc_with_good",)
    meta = {"benchmark": "pixel_errors", "config": vars(args), "n_train": len(train),
            "n_test": len(test), "localisation": peak_rows, "width_thirds_px": width_edges,
            "environment": env}  # fmt: skip
    print(common.format_table(rows, columns, HEADERS + ("px AUROC w/ good",)))
    if not args.tiled:
        geometry_rows = geometry(maps, masks, types, det.input_shape_)
        meta.update(frame=list(det.input_shape_), geometry=geometry_rows)
        print(f"\nSpearman's rho of the median score of each image's normal pixels with its "
              f"resize into the {det.input_shape_[0]} x {det.input_shape_[1]} frame:")
        print(common.format_table(geometry_rows, tuple(geometry_rows[0]),
                                  ("images", "n", "magnified H", "magnified W", "stretch")))
    print(f"\nMap maxima within 16 px of a defect, and image AUROC (%) against the good images, "
          f"overall and by width (thirds of the test images: < {width_edges[0]} px, "
          f"{width_edges[0]}-{width_edges[1]}, >= {width_edges[1]}; defective images in each):")
    print(common.format_table(peak_rows, tuple(peak_rows[0]),
                              ("defect", "n", "peak near %", "img all", "n", "narrow", "n", "middle", "n",
                               "wide", "n")))
    csv_path, json_path = common.write_results(name, rows, columns, meta, args.results_dir)
    print(f"wrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()

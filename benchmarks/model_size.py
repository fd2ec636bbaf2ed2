"""Size of a fitted detector on disk, and what ``compact=True`` costs in accuracy.

Sizes: for each configuration a detector is fitted on a few texture tiles (the
size depends on the backbone, the grid and ``n_features``, not on the number of
training images) and written with ``joblib.dump`` and with ``skpadim.save``,
with and without ``compact``.

Accuracy: with ``--root``, the default detector is fitted on ``--max-train``
good images of an MVTec-layout folder twice, with ``compact=False`` and
``compact=True`` (the same channels and statistics: only the stored factors
differ), and both are evaluated on the whole test set: image AUROC, pixel
AUROC and the largest change of an image score.

    python benchmarks/model_size.py [--root ../shared/data/magnetic_tile --max-train 200]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# (name, backbone, n_features, image size)
CONFIGS = (
    ("defaults (Lite0, all 176 channels)", "efficientnet_lite0", "auto", 224),
    ("resnet18 / Rd100", "resnet18", 100, 224),
    ("wide_resnet50_2 / Rd550", "wide_resnet50_2", 550, 224),
)


def sizes(tmp):
    import joblib
    import torch

    import skpadim
    from skpadim import PatchGaussianDetector, TorchvisionExtractor
    from skpadim.datasets import make_textures

    X = make_textures("brick", n_train=8, n_test=2, image_size=224, random_state=0).X_train
    rows = []
    for name, backbone, n_features, size in CONFIGS:
        torch.manual_seed(0)
        weights = "DEFAULT" if backbone.startswith("efficientnet_lite") else None
        row = {"config": name}
        for compact in (False, True):
            det = PatchGaussianDetector(
                TorchvisionExtractor(backbone, weights=weights, image_size=size),
                n_features=n_features, compact=compact, random_state=0).fit(X)
            suffix = "compact" if compact else "float32"
            path = Path(tmp) / f"model_{suffix}.joblib"
            joblib.dump(det, path)
            row[f"joblib {suffix} (MB)"] = path.stat().st_size / 1e6
            path.unlink()
            path = Path(tmp) / f"model_{suffix}.npz"
            skpadim.save(det, path)
            row[f"save {suffix} (MB)"] = path.stat().st_size / 1e6
            path.unlink()
            row["positions"] = int(np.prod(det.gaussian_.grid_shape_))
            row["n_features"] = int(len(det.channel_indices_))
            del det
        row["compact / float32"] = row["joblib compact (MB)"] / row["joblib float32 (MB)"]
        rows.append(row)
        print(common.format_table([row], list(row)), flush=True)
    return rows


def accuracy(root, max_train, tmp):
    from skpadim import PatchGaussianDetector, TorchvisionExtractor
    from skpadim.datasets import load_masks, load_mvtec
    from skpadim.metrics import image_auroc, pixel_auroc

    frame = load_mvtec(root)
    train = frame[frame.split == "train"].path.tolist()
    train = [train[i] for i in common.spread_over_aspects(train, max_train)]
    test = frame[frame.split == "test"]
    y = test.label.to_numpy()
    out = {}
    for compact in (False, True):
        # The embeddings are cached on disk: the second fit reads them back.
        det = PatchGaussianDetector(TorchvisionExtractor(memory=tmp), compact=compact,
                                    random_state=0).fit(train)
        maps = det.anomaly_maps(test.path.tolist())
        out[compact] = (-det.score_samples(test.path.tolist()), maps)
    masks = load_masks(test.mask_path.tolist(), shapes=[m.shape for m in out[False][1]])
    rows = []
    for compact, (scores, maps) in out.items():
        rows.append({"compact": compact, "image AUROC": image_auroc(y, scores),
                     "pixel AUROC": pixel_auroc(masks, maps),
                     "max |score change|": float(np.max(np.abs(scores - out[False][0]))),
                     "max score": float(np.max(out[False][0]))})
    for r in rows[1:]:
        r["image AUROC change"] = r["image AUROC"] - rows[0]["image AUROC"]
        r["pixel AUROC change"] = r["pixel AUROC"] - rows[0]["pixel AUROC"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="an MVTec-layout category for the accuracy of compact=True")
    p.add_argument("--max-train", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    meta = {"config": vars(args), "environment": common.environment(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        rows = sizes(tmp)
        columns = ["config", "positions", "n_features", "joblib float32 (MB)",
                   "joblib compact (MB)", "save float32 (MB)", "save compact (MB)",
                   "compact / float32"]
        print(common.format_table(rows, columns))
        common.write_results("model_size", rows, columns, meta)
        if args.root:
            rows = accuracy(args.root, args.max_train, tmp)
            columns = ["compact", "image AUROC", "pixel AUROC", "image AUROC change",
                       "pixel AUROC change", "max |score change|", "max score"]
            print(common.format_table(rows, columns))
            name = "model_size_compact_" + common.slug(Path(args.root).resolve().name)
            common.write_results(name, rows, columns, meta)


if __name__ == "__main__":
    main()

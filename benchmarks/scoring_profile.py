"""Where scoring time goes: backbone vs. Mahalanobis vs. upsampling and blur.

A detector is fitted once per backbone (untimed); then batches of test images
go through the same steps as ``PatchGaussianDetector.anomaly_maps``, each timed
on its own:

* ``preprocess``: resize to the extractor's frame and normalise;
* ``backbone``: the forward pass to the chosen layers, and their concatenation
  on the first layer's grid, of the detector's channel subset only (the
  default extractor computes those alone, as the detector asks it to);
* ``select``: what the detector then does to them before the distances:
  neighbourhood pooling (``pooling``);
* ``mahalanobis``: the distance of every patch to its position's Gaussian;
* ``upsample+blur``: bilinear upsampling to the frame and the Gaussian blur;
* ``image score``: the score of each map;
* ``to input size``: each map resized back to its image's own resolution.

The first batch is a warm-up and not counted. The sum of the steps is checked
against timing ``anomaly_maps`` whole on the same batches. The non-backbone
share is everything but ``preprocess`` and ``backbone``.

    python benchmarks/scoring_profile.py [--backbones resnet18 wide_resnet50_2]
        [--n-images 96] [--batch-size 32] [--threads 2] [--root DIR]

Without ``--root`` the images are built-in texture tiles (224 px); with it, test
images of an MVTec-layout folder at their own sizes. Weights: the pip-shipped
ImageNet weights for EfficientNet-Lite0, random ones (seeded) for the ResNets:
speed does not depend on the values.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

DEFAULT_N_FEATURES = {"efficientnet_lite0": "auto", "resnet18": 100, "wide_resnet50_2": 550}
STEPS = ("preprocess", "backbone", "select", "mahalanobis", "upsample+blur", "image score",
         "to input size")


def load_images(args):
    from skpadim.datasets import load_images as read, load_mvtec, make_textures

    if args.root is None:
        data = make_textures("brick", n_train=args.n_train, n_test=args.n_images + args.batch_size,
                             image_size=224, random_state=0)
        return list(data.X_train), list(data.X_test)
    frame = load_mvtec(args.root)
    train = frame[frame["split"] == "train"]["path"].tolist()[: args.n_train]
    test = frame[frame["split"] == "test"]["path"].tolist()
    idx = common.spaced_indices(len(test), min(len(test), args.n_images + args.batch_size))
    return read(train), read([test[i] for i in idx])


def profile(backbone, n_features, train, test, args):
    import torch

    from skpadim import PatchGaussianDetector, TorchvisionExtractor
    from skpadim._images import ValidatedImages, iter_image_batches
    from skpadim.feature_extraction import _concat_on_first_grid
    from skpadim.detector import (
        _computes_subsets, _to_image_resolution, _image_scores_from_maps, _upsample_and_blur,
    )

    torch.manual_seed(0)
    weights = "DEFAULT" if backbone.startswith("efficientnet_lite") else None
    det = PatchGaussianDetector(
        TorchvisionExtractor(backbone, weights=weights, batch_size=args.batch_size),
        n_features=n_features, batch_size=args.batch_size, random_state=0,
    ).fit(train)
    ext = det.feature_extractor_
    if not _computes_subsets(ext, test):
        raise RuntimeError("the detector no longer has its extractor compute the kept channels alone")
    channels = det.channel_indices_
    device = torch.device("cpu")
    totals = dict.fromkeys(STEPS, 0.0)
    batches = list(iter_image_batches(test, args.batch_size))
    n_timed = 0
    for b, batch in enumerate(batches):
        t = {}
        t0 = time.perf_counter()
        x = ext._preprocess(batch, device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            emb = _concat_on_first_grid(ext._features(x, device), channels).numpy()
        t2 = time.perf_counter()
        selected = det._pooled(emb)
        t3 = time.perf_counter()
        dist = det.gaussian_._mahalanobis_tensor(selected)
        t4 = time.perf_counter()
        maps = _upsample_and_blur(dist, ext.resize_shape_, det.sigma)
        t5 = time.perf_counter()
        _image_scores_from_maps(maps, det.image_score)
        t6 = time.perf_counter()
        for amap, img in zip(maps, batch):
            _to_image_resolution(amap, tuple(img.shape[1:]), ext.resize_shape_, ext.crop_box_)
        t7 = time.perf_counter()
        t = dict(zip(STEPS, np.diff([t0, t1, t2, t3, t4, t5, t6, t7])))
        if b == 0:
            continue  # warm-up
        n_timed += len(batch)
        for k, v in t.items():
            totals[k] += v
    # The same batches through the public method, for a check of the sum.
    start = time.perf_counter()
    for batch in batches[1:]:
        det.anomaly_maps(ValidatedImages(batch))
    whole = time.perf_counter() - start
    per_image = {k: 1000 * v / n_timed for k, v in totals.items()}
    backbone_ms = per_image["preprocess"] + per_image["backbone"]
    rest_ms = sum(v for k, v in per_image.items() if k not in ("preprocess", "backbone"))
    return {
        "backbone": backbone, "n_features": int(len(det.channel_indices_)),
        "grid": "x".join(map(str, det.gaussian_.grid_shape_)), "images": n_timed,
        **{f"{k} (ms/img)": v for k, v in per_image.items()},
        "sum of steps (ms/img)": sum(per_image.values()),
        "anomaly_maps (ms/img)": 1000 * whole / n_timed,
        "images/s": n_timed / whole,
        "non-backbone / backbone": rest_ms / backbone_ms,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=list(DEFAULT_N_FEATURES))
    p.add_argument("--n-features", nargs="+", help="one per backbone (default: 'auto', 100, 550)")
    p.add_argument("--n-images", type=int, default=96, help="timed test images (after a warm-up batch)")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", help="an MVTec-layout category folder instead of texture tiles")
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    n_features = args.n_features or [DEFAULT_N_FEATURES.get(b, "auto") for b in args.backbones]
    n_features = [v if v == "auto" else int(v) for v in n_features]
    train, test = load_images(args)
    rows = [profile(b, k, train, test, args) for b, k in zip(args.backbones, n_features)]
    columns = ["backbone", "n_features", *[f"{k} (ms/img)" for k in STEPS],
               "sum of steps (ms/img)", "anomaly_maps (ms/img)", "images/s",
               "non-backbone / backbone"]
    print(common.format_table(rows, columns))
    meta = {"config": vars(args), "environment": common.environment(threads)}
    name = "scoring_profile" + ("" if args.root is None else "_" + common.slug(Path(args.root).name))
    common.write_results(name, rows, columns, meta)


if __name__ == "__main__":
    main()

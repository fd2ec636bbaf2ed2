"""Time a 6-candidate grid search with and without the embedding cache.

The grid varies only detector parameters (n_features x shrinkage), the case the
cache of ``TorchvisionExtractor(memory=...)`` is for: without it the backbone runs
again for every candidate and fold; with it, once per image. Both searches run in
this process, on the same images, folds and thread count, so their ratio is fair.

    python benchmarks/grid_cache.py [--n-train 40] [--n-test 40] [--image-size 224]
    python benchmarks/grid_cache.py --root ../shared/data/magnetic_tile --n-train 60 --n-test 60

Without ``--root`` the images are built-in texture tiles with synthetic defects;
with it, ``--n-train`` good training images and ``--n-test`` test images (good
and defective, drawn at random with seed 0) of an MVTec-layout folder.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GridSearchCV

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (also puts this checkout on sys.path)
from skpadim import PatchGaussianDetector, TorchvisionExtractor
from skpadim.datasets import load_images, load_mvtec, make_textures
from skpadim.metrics import image_auroc_scorer
from skpadim.model_selection import NormalOnlyKFold

RESULTS = Path(__file__).resolve().parent / "results"


def run_search(X, y, image_size, memory):
    det = PatchGaussianDetector(
        TorchvisionExtractor(image_size=image_size, memory=memory), random_state=0
    )
    grid = {"n_features": [25, 50, 100], "shrinkage": ["ledoit-wolf", 0.01]}
    search = GridSearchCV(det, grid, scoring=image_auroc_scorer,
                          cv=NormalOnlyKFold(3, shuffle=True, random_state=0), refit=False)
    start = time.perf_counter()
    search.fit(X, y)
    return time.perf_counter() - start, search


def load_real(root, n_train, n_test, image_size):
    """Good training images and a random draw of test images, resized to a square."""
    frame = load_mvtec(root)
    rng = np.random.default_rng(0)
    train = frame[frame["split"] == "train"].iloc[:n_train]
    test = frame[frame["split"] == "test"]
    test = test.iloc[np.sort(rng.choice(len(test), size=min(n_test, len(test)), replace=False))]
    rows = pd.concat([train, test])
    return load_images(rows["path"], size=image_size), rows["label"].to_numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--texture", default="brick")
    parser.add_argument("--root", default=None,
                        help="an MVTec-layout category folder instead of the textures")
    args = parser.parse_args(argv)

    if args.root is None:
        data = make_textures(args.texture, n_train=args.n_train, n_test=args.n_test,
                             image_size=args.image_size, random_state=0)
        X = np.concatenate([data.X_train, data.X_test])
        y = np.concatenate([np.zeros(args.n_train, int), data.y_test])
        dataset = f"textures-{args.texture}"
    else:
        X, y = load_real(args.root, args.n_train, args.n_test, args.image_size)
        dataset = Path(args.root).name.replace("_", "-")
    rows = []
    uncached_s, uncached = run_search(X, y, args.image_size, memory=None)
    with tempfile.TemporaryDirectory() as cache:
        cached_s, cached = run_search(X, y, args.image_size, memory=cache)
    for name, seconds, search in (("no cache", uncached_s, uncached), ("memory=", cached_s, cached)):
        best = search.cv_results_["params"][int(np.argmax(search.cv_results_["mean_test_score"]))]
        rows.append({"setting": name, "seconds": round(seconds, 2),
                     "best_params": best,
                     "best_score": float(np.max(search.cv_results_["mean_test_score"])),
                     "scores": [round(float(v), 6) for v in search.cv_results_["mean_test_score"]]})
    speedup = uncached_s / cached_s
    same = rows[0]["best_params"] == rows[1]["best_params"]
    same_scores = bool(np.allclose(rows[0]["scores"], rows[1]["scores"], atol=1e-6))
    print(f"6-candidate grid, 3 folds, {dataset}, {len(X)} images of {args.image_size} px, "
          f"{torch.get_num_threads()} threads")
    print(f"{'setting':<10} {'seconds':>8} {'best score':>10}  best params")
    for r in rows:
        print(f"{r['setting']:<10} {r['seconds']:>8.1f} {r['best_score']:>10.4f}  {r['best_params']}")
    print(f"candidate scores: {rows[0]['scores']}")
    print(f"speed-up with the cache: {speedup:.1f}x; same best parameters: {same}; "
          f"same scores for every candidate: {same_scores}")
    RESULTS.mkdir(exist_ok=True)
    out = {"rows": rows, "speedup": speedup, "same_best_params": same,
           "same_scores": same_scores, "dataset": dataset,
           "n_images": len(X), "n_defective": int(np.sum(y)),
           "image_size": args.image_size, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "config": vars(args), "environment": _common.environment()}
    stem = "grid_cache" if args.root is None and args.texture == "brick" else f"grid_cache_{dataset}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2, default=str))
    with open(RESULTS / f"{stem}.csv", "w") as f:
        f.write("setting,seconds,best_score,best_params\n")
        for r in rows:
            f.write(f"{r['setting']},{r['seconds']},{r['best_score']:.6f},\"{r['best_params']}\"\n")


if __name__ == "__main__":
    main()

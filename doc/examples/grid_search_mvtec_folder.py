"""
===================================================
A grid search on a folder of real inspection images
===================================================

The search of :ref:`sphx_glr_auto_examples_plot_grid_search.py`, on real
photographs with real defects: any folder in the MVTec AD layout
(``train/good``, ``test/<defect>``, ``ground_truth/<defect>``), such as the
magnetic-tile set. Good training images and a random draw of test images form
one labelled set; :class:`~skpadim.model_selection.NormalOnlyKFold` keeps the
defective ones out of every training fold, and the masks serve as ``y`` for the
image and pixel scorers. Not run when the documentation is built (it needs the
data folder)::

    python doc/examples/grid_search_mvtec_folder.py path/to/magnetic_tile
"""

import argparse
import tempfile

import numpy as np
import pandas as pd
from sklearn.model_selection import GridSearchCV

from skpadim import PatchGaussianDetector, TorchvisionExtractor
from skpadim.datasets import load_images, load_masks, load_mvtec
from skpadim.metrics import image_auroc_scorer, pixel_auroc_scorer
from skpadim.model_selection import NormalOnlyKFold

parser = argparse.ArgumentParser(description="Grid search on an MVTec-layout folder.")
parser.add_argument("root", help="a category folder in the MVTec AD layout")
parser.add_argument("--n-train", type=int, default=60, help="good training images used")
parser.add_argument("--n-test", type=int, default=60, help="test images drawn at random")
parser.add_argument("--size", type=int, default=224, help="square side the images are read at")
args = parser.parse_args()

frame = load_mvtec(args.root)
train = frame[frame["split"] == "train"].iloc[: args.n_train]
test = frame[frame["split"] == "test"].sample(n=args.n_test, random_state=0)
rows = pd.concat([train, test])
# Read once at one size, so that every candidate sees the same pixels and the
# masks line up with the maps.
X = load_images(rows["path"], size=args.size)
masks = load_masks(rows["mask_path"].tolist(), size=args.size)
print(f"{len(X)} images, {int(masks.any(axis=(1, 2)).sum())} of them defective")

with tempfile.TemporaryDirectory() as cache:
    detector = PatchGaussianDetector(
        TorchvisionExtractor(image_size=args.size, memory=cache), random_state=0
    )
    search = GridSearchCV(
        detector,
        {
            "feature_extractor__layers": [
                ("_blocks.2", "_blocks.4"),
                ("_blocks.2", "_blocks.4", "_blocks.10"),
            ],
            "n_features": [32, 64],  # the two-block set has 24 + 40 = 64 channels
            "shrinkage": ["ledoit-wolf", 0.01],
        },
        scoring={"image AUROC": image_auroc_scorer, "pixel AUROC": pixel_auroc_scorer},
        refit="image AUROC",
        cv=NormalOnlyKFold(n_splits=3, shuffle=True, random_state=0),
    )
    search.fit(X, masks)

results = pd.DataFrame(search.cv_results_)
columns = ["param_feature_extractor__layers", "param_n_features", "param_shrinkage",
           "mean_test_image AUROC", "mean_test_pixel AUROC"]
print(results[columns].sort_values("mean_test_image AUROC", ascending=False).to_string(index=False))
print("best:", search.best_params_, f"image AUROC {search.best_score_:.3f}")
assert np.isclose(search.best_score_, results["mean_test_image AUROC"].max())

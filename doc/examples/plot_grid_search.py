"""
=====================================
Choosing layers and embedding size
=====================================

PaDiM has a few choices that matter: which layers of the backbone make the
embedding, how many channels to keep (``n_features``) and how to regularise
the covariances (``shrinkage``). Because
:class:`~skpadim.PatchGaussianDetector` is an ordinary scikit-learn estimator,
:class:`~sklearn.model_selection.GridSearchCV` searches them, with two
precautions particular to anomaly detection:

* the detector must only ever be fitted on normal images, so the folds come
  from :class:`~skpadim.model_selection.NormalOnlyKFold`, whose training folds
  hold normal images only and whose test folds hold both kinds;
* the score must rank defective images above normal ones:
  :data:`~skpadim.metrics.image_auroc_scorer` takes the usual labels (1 =
  defective), or, as here, the defect masks, from which the pixel-level
  :data:`~skpadim.metrics.pixel_auroc_scorer` is computed too.
"""

# %%
# A labelled set
# --------------
# The search runs on one set of normal and defective images; its ``y`` are the
# defect masks (an image with an empty mask is normal).
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.model_selection import GridSearchCV

from skpadim import PatchGaussianDetector, TorchvisionExtractor
from skpadim.datasets import make_textures
from skpadim.metrics import image_auroc_scorer, pixel_auroc_scorer
from skpadim.model_selection import NormalOnlyKFold

data = make_textures(
    "grass", n_train=40, n_test=20, image_size=64, random_state=0
)
X = np.concatenate([data.X_train, data.X_test])
no_defect = np.zeros((len(data.X_train), 64, 64), dtype=bool)
masks = np.concatenate([no_defect, data.masks_test])
n_defective = int(masks.any(axis=(1, 2)).sum())
print(f"{len(X)} images, {n_defective} of them defective")

# %%
# The search
# ----------
# Two layer sets of EfficientNet-Lite0 (the stride 4 and 8 stages alone, or
# with the stride 16 stage as well), two embedding sizes and two covariance
# regularisations: eight candidates, two folds each.
#
# Every candidate passes the same images through the backbone. With
# ``memory=``, the extractor caches the embeddings of each image on
# disk, keyed by the pixels and by the parameters that change the features, so
# the backbone runs once per layer set and image batch instead of once per
# candidate, fold and refit.
cache = tempfile.TemporaryDirectory()
detector = PatchGaussianDetector(
    TorchvisionExtractor(image_size=64, memory=cache.name), random_state=0
)
param_grid = {
    "feature_extractor__layers": [
        ("_blocks.2", "_blocks.4"),
        ("_blocks.2", "_blocks.4", "_blocks.10"),
    ],
    "n_features": [30, 60],
    "shrinkage": ["ledoit-wolf", 0.01],
}
search = GridSearchCV(
    detector,
    param_grid,
    scoring={
        "image AUROC": image_auroc_scorer,
        "pixel AUROC": pixel_auroc_scorer,
    },
    refit="image AUROC",
    cv=NormalOnlyKFold(n_splits=2, shuffle=True, random_state=0),
)
search.fit(X, masks)
print("best parameters:")
for name, value in search.best_params_.items():
    print(f"  {name} = {value}")

# %%
# Results
# -------
# ``cv_results_`` holds the mean and spread of each score over the folds.
results = pd.DataFrame(search.cv_results_)
table = pd.DataFrame(
    {
        "layers": results["param_feature_extractor__layers"].map(
            lambda layers: "blocks "
            + " + ".join(name.removeprefix("_blocks.") for name in layers)
        ),
        "n_features": results["param_n_features"],
        "shrinkage": results["param_shrinkage"],
        "image AUROC": results["mean_test_image AUROC"].round(3),
        "pixel AUROC": results["mean_test_pixel AUROC"].round(3),
        "fit time (s)": results["mean_fit_time"].round(2),
    }
).sort_values("image AUROC", ascending=False, ignore_index=True)
table

# %%
# The same scores as a plot, one panel per layer set.
fig, axes = plt.subplots(
    1, 2, figsize=(8, 3.4), sharey=True, layout="constrained"
)
for ax, (layers, group) in zip(axes, table.groupby("layers", sort=False)):
    for shrinkage, rows in group.groupby("shrinkage", sort=False):
        rows = rows.sort_values("n_features")
        ax.plot(rows["n_features"], rows["image AUROC"], "o-",
                label=f"shrinkage={shrinkage}")
    ax.set_title(layers)
    ax.set_xlabel("n_features")
    ax.set_xticks(param_grid["n_features"])
axes[0].set_ylabel("mean image AUROC (2 folds)")
axes[0].legend()
plt.show()

# %%
# With two folds of a few dozen small images the differences are noisy; on real
# data, search on more images and more folds. The refitted best detector is in
# ``search.best_estimator_``; it was refitted on all normal images of ``X``
# (``fit`` leaves out the images whose mask is not empty).
n_fitted = search.best_estimator_.gaussian_.n_samples_seen_
print(n_fitted, "images in the final fit")
cache.cleanup()

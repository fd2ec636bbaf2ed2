"""
===============================================
Ledoit-Wolf or fixed shrinkage, by sample size
===============================================

Each patch position gets a Gaussian with a ``C x C`` covariance matrix
(``C = n_features``). With fewer training images than channels the sample
covariance is singular, and with not many more it is badly conditioned: its
smallest eigenvalues are far too small, and the Mahalanobis distance, which
divides by them, over-reacts along those directions.

The PaDiM paper adds a fixed ``0.01 * I`` to every covariance
(``shrinkage=0.01``). Ledoit-Wolf shrinkage (``shrinkage="ledoit-wolf"``, the
default) instead estimates, for each position, how far to pull the covariance
towards a multiple of the identity from the data themselves: strongly when
there are few images, hardly at all when there are many. This example compares
the two as the number of training images grows.
"""

# %%
# Embed once, fit many times
# --------------------------
# The detector also accepts patch embeddings instead of images: the backbone
# runs once per image here, and each of the many fits below only estimates the
# Gaussians. Three textures, up to 200 training images each, 64 x 64 pixels.
import warnings

import matplotlib.pyplot as plt
import numpy as np

from skpadim import PatchGaussianDetector, TorchvisionExtractor
from skpadim.datasets import make_textures
from skpadim.metrics import image_auroc, pixel_auroc

extractor = TorchvisionExtractor(image_size=64).fit()
textures = ("brick", "grass", "gravel")
sizes = [10, 25, 50, 75, 100, 200]
embedded = {}
for k, texture in enumerate(textures):
    data = make_textures(texture, n_train=max(sizes), n_test=30,
                         image_size=64, random_state=k)
    embedded[texture] = (
        extractor.transform(data.X_train),
        extractor.transform(data.X_test),
        data.y_test,
        data.masks_test,
    )
brick_train = np.asarray(embedded["brick"][0])
print("embedding of one image:", brick_train.shape[1:], "(channels, grid)")
print(f"mean variance of a channel: {brick_train.var(axis=0).mean():.1f}")

# %%
# Fit with both shrinkages on growing training sets
# -------------------------------------------------
# Fifty channels are kept (``n_features=50``), so that the training sets
# range from far fewer images than channels to four times more. The image
# score is the maximum of the anomaly map, so one pass gives both. A fixed
# shrinkage warns when the images are fewer than the channels; that is the
# point here, so the warning is silenced.
n_features = 50
shrinkages = {"Ledoit-Wolf": "ledoit-wolf", "fixed eps = 0.01": 0.01}
auroc = {(name, level): np.zeros((len(textures), len(sizes)))
         for name in shrinkages for level in ("image", "pixel")}
lw_coefficient = np.zeros((len(textures), len(sizes)))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    for t, texture in enumerate(textures):
        emb_train, emb_test, y_test, masks_test = embedded[texture]
        for name, shrinkage in shrinkages.items():
            for j, n in enumerate(sizes):
                detector = PatchGaussianDetector(
                    n_features=n_features, shrinkage=shrinkage, random_state=0
                ).fit(emb_train[:n])
                maps = detector.anomaly_maps(emb_test)
                scores = maps.max(axis=(1, 2))
                auroc[name, "image"][t, j] = image_auroc(y_test, scores)
                auroc[name, "pixel"][t, j] = pixel_auroc(masks_test, maps)
                if shrinkage == "ledoit-wolf":
                    coefficients = detector.gaussian_.shrinkage_
                    lw_coefficient[t, j] = np.median(coefficients)

for name in shrinkages:
    print(f"{name:>16}: mean image AUROC",
          " ".join(f"{v:.3f}" for v in auroc[name, "image"].mean(axis=0)))

# %%
# The Ledoit-Wolf coefficient, the weight of the identity in the shrunk
# covariance, is learnt from the data: large with few images, small with many.
for n, coefficient in zip(sizes, lw_coefficient.mean(axis=0)):
    print(f"{n:3d} images: median Ledoit-Wolf coefficient {coefficient:.2f}")

# %%
# Results
# -------
# Mean AUROC over the three textures; the dotted line marks as many training
# images as channels.
fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), layout="constrained")
for ax, level in zip(axes, ("image", "pixel")):
    for name in shrinkages:
        ax.plot(sizes, auroc[name, level].mean(axis=0), "o-", label=name)
    ax.axvline(n_features, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training images")
    ax.set_title(f"{level} AUROC")
axes[0].legend()
plt.show()

# %%
# Far from the dotted line the two roughly agree. With far fewer images than
# channels, the fixed ``eps`` behaves well: the sample covariance is then
# exactly singular, and adding ``eps * I`` makes the distance, outside the few
# directions the training images span, a plain (large) Euclidean distance.
# With many more images than channels, both covariances approach the true one.
# In between, around as many images as channels, the sample covariance is
# singular or barely full rank and its smallest eigenvalues are mostly noise,
# and a fixed ``eps`` that is small compared with the features' variance
# (printed above) does not tame them: the fixed-``eps`` curves dip there,
# while Ledoit-Wolf, which sets its regularisation from the data, does not.
#
# This is why Ledoit-Wolf is the default: it needs no tuning to the number of
# images or to the scale of the backbone's features. ``shrinkage=0.01``
# reproduces the paper, which used a few hundred images per category.

"""
=======================================
Anomaly maps on a texture with defects
=======================================

Fit :class:`~skpadim.PatchGaussianDetector` on defect-free tiles of a brick
wall, then look at where it finds anomalies in test tiles: the anomaly map of
each test image is drawn over it, and the true defect is outlined.

Only normal images are needed to fit: the detector learns, for every position
of the image, the distribution of the features of normal patches, and flags the
patches that are unlikely under it.
"""

# %%
# A small data set
# ----------------
# :func:`~skpadim.datasets.make_textures` cuts tiles out of a real photograph
# shipped with scikit-image and paints one synthetic defect (a scratch, a
# stain, a hole or a pasted patch of another texture) on half of the test
# tiles, with an exact pixel mask.
import matplotlib.pyplot as plt
import numpy as np

from skpadim import PatchGaussianDetector, TorchvisionExtractor
from skpadim.datasets import make_textures
from skpadim.metrics import image_auroc, pixel_auroc

data = make_textures(
    "brick", n_train=40, n_test=16, image_size=128, random_state=0
)
print(data.X_train.shape, data.X_test.shape, data.masks_test.shape)
kinds, counts = np.unique(data.defect_types, return_counts=True)
print("test images:", ", ".join(f"{n} {k}" for k, n in zip(kinds, counts)))

# %%
# Fit on normal images
# --------------------
# The feature extractor resizes every image to ``image_size`` and reads three
# layers of an ImageNet EfficientNet-Lite0; the detector keeps a random subset
# of 100 of the embedding channels and fits one Gaussian per position of the
# feature grid.
detector = PatchGaussianDetector(
    TorchvisionExtractor(image_size=128), n_features=100, random_state=0
)
detector.fit(data.X_train)
print("feature grid:", detector.gaussian_.grid_shape_)
print("channels kept:", len(detector.channel_indices_))

# %%
# Scores and maps
# ---------------
# ``anomaly_maps`` returns one map per image at the image's own resolution;
# higher means more anomalous. The image's anomaly score is the maximum of its
# map, and ``score_samples`` returns its opposite (higher = more normal, as for
# scikit-learn's outlier detectors).
maps = detector.anomaly_maps(data.X_test)
scores = -detector.score_samples(data.X_test)
print("maps:", maps.shape)
print(f"image AUROC: {image_auroc(data.y_test, scores):.3f}")
print(f"pixel AUROC: {pixel_auroc(data.masks_test, maps):.3f}")

# %%
# Draw the maps over the images
# -----------------------------
# One colour scale for all maps, so that they can be compared with each other.
# The dashed white line is the true defect's outline.
defects = ("scratch", "stain", "hole", "patch")
shown = [int(np.flatnonzero(data.defect_types == d)[0]) for d in defects]
shown += np.flatnonzero(data.y_test == 0)[:2].tolist()
vmin, vmax = np.percentile(maps, 1), np.percentile(maps, 99.9)

fig, axes = plt.subplots(
    2, len(shown), figsize=(2.1 * len(shown) + 1, 4.6), layout="constrained"
)
for col, i in enumerate(shown):
    for ax in axes[:, col]:
        ax.imshow(data.X_test[i])
        if data.y_test[i]:
            ax.contour(data.masks_test[i], levels=[0.5], colors="white",
                       linewidths=1.2, linestyles="--")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1, col].imshow(maps[i], cmap="inferno", alpha=0.6,
                        vmin=vmin, vmax=vmax)
    axes[0, col].set_title(f"{data.defect_types[i]}\nscore {scores[i]:.1f}",
                           fontsize=10)
axes[0, 0].set_ylabel("test image")
axes[1, 0].set_ylabel("anomaly map")
colours = plt.cm.ScalarMappable(plt.Normalize(vmin, vmax), cmap="inferno")
fig.colorbar(colours, ax=axes, shrink=0.7, pad=0.01,
             label="Mahalanobis distance")
plt.show()

# %%
# The stain, the hole and the pasted patch light up where the masks are, and
# the good tiles stay dark. The scratch, a stroke two or three pixels wide,
# barely stands out: each cell of the feature grid covers 4 x 4 pixels of the
# 128 x 128 input, and the maps are smoothed by a Gaussian of standard
# deviation 4 pixels, so thin defects are diluted. Larger images
# (``image_size``) give finer maps. Throughout, the maps locate defects roughly
# rather than to the pixel.
#
# Images of other sizes
# ---------------------
# Images are resized before the backbone, and maps come back at each input
# image's resolution. A list may mix sizes, as long as the proportions match
# those of the training images.
small = data.X_test[shown[0]]
big = np.kron(small, np.ones((2, 2, 1), dtype=np.uint8))  # 256 x 256 pixels
for amap in detector.anomaly_maps([small, big]):
    print(amap.shape, f"max {amap.max():.1f}")

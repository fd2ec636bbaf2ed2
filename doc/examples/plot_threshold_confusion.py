"""
=========================================
Thresholds, predictions and the ROC curve
=========================================

An anomaly score ranks images; deciding which ones to reject needs a threshold.
:class:`~skpadim.PatchGaussianDetector` places one from ``contamination``, the
expected fraction of anomalies, on the scores of its own training images, each
taken as if that image had been left out of the fit. This example compares that
threshold with one set on held-out normal images, shows the resulting confusion
matrices, and places both on the ROC curve.
"""

# %%
# Data: training, held-out normal and test images
# -----------------------------------------------
# Forty normal tiles to fit on, twenty more normal tiles kept aside to set the
# threshold, and forty test tiles of which half have a defect.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, roc_curve

from skpadim import PatchGaussianDetector, TorchvisionExtractor
from skpadim.datasets import make_textures
from skpadim.metrics import image_auroc

data = make_textures(
    "gravel", n_train=60, n_test=40, image_size=96, random_state=1
)
X_fit, X_held_out = data.X_train[:40], data.X_train[40:]
X_test, y_test = data.X_test, data.y_test  # y_test: 1 = defective

detector = PatchGaussianDetector(
    TorchvisionExtractor(image_size=96), contamination=0.05, random_state=0
)
detector.fit(X_fit)

# %%
# Anomaly scores
# --------------
# ``score_samples`` is higher for normal images; its opposite is the anomaly
# score, higher for defective ones. ``decision_function`` is ``score_samples``
# minus ``offset_``, the threshold, and ``predict`` returns +1 (normal) where
# it is non-negative and -1 (anomalous) elsewhere.
score_fit = -detector.score_samples(X_fit)
score_held_out = -detector.score_samples(X_held_out)
score_test = -detector.score_samples(X_test)
auroc = image_auroc(y_test, score_test)
print(f"image AUROC on the test set: {auroc:.3f}")

# %%
# Two thresholds
# --------------
# With ``contamination=0.05``, ``offset_`` is chosen so that 5 % of the
# training images fall on the anomalous side. Those are the images the
# Gaussians were fitted on, and a Gaussian fits its own training data closely:
# with 40 images for 100 channels, their in-sample scores (the histogram below)
# lie far below those of new normal images. The fit therefore scores each
# training image as if it had been left out, which puts the threshold where
# new normal images are. A threshold can also be set on normal images the
# detector has not seen; here, the 95th percentile of the held-out anomaly
# scores. Assigning ``offset_`` moves the threshold that ``decision_function``
# and ``predict`` use.
threshold_fit = -detector.offset_
threshold_held_out = np.percentile(score_held_out, 95)
for name, threshold in (("fit", threshold_fit), ("held-out", threshold_held_out)):
    rejected = np.mean(score_held_out > threshold)
    print(f"{name} threshold: {threshold:.2f}, rejects {rejected:.0%} of the held-out normal images")

lowest = min(score_fit.min(), score_test.min())
bins = np.linspace(lowest, score_test.max(), 30)
fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
ax.hist(score_fit, bins, alpha=0.5, label="training, in-sample (normal)")
ax.hist(score_held_out, bins, alpha=0.5, label="held-out (normal)")
ax.hist(score_test[y_test == 0], bins, histtype="step", lw=2,
        label="test, normal")
ax.hist(score_test[y_test == 1], bins, histtype="step", lw=2,
        label="test, defective")
ax.axvline(threshold_fit, color="k", ls="--", label="threshold of the fit")
ax.axvline(threshold_held_out, color="k", ls=":", label="held-out threshold")
ax.set_xlabel("anomaly score (maximum of the anomaly map)")
ax.set_ylabel("images")
ax.legend(fontsize=8)
plt.show()

# %%
# Predictions and confusion matrices
# ----------------------------------
# ``predict`` follows scikit-learn's outlier convention: +1 normal, -1
# anomalous. The true labels of the data set are 0 (good) and 1 (defective);
# ``1 - 2 * y`` converts them.
y_true = 1 - 2 * y_test
thresholds = {"fit": threshold_fit, "held-out": threshold_held_out}
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout="constrained")
for ax, (name, threshold) in zip(axes, thresholds.items()):
    detector.offset_ = -threshold
    y_pred = detector.predict(X_test)
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=[1, -1],
        display_labels=["normal", "anomalous"], ax=ax, colorbar=False,
    )
    ax.set_title(f"{name} threshold")
plt.show()

# %%
# The ROC curve
# -------------
# The ROC curve shows every threshold at once: the rate of defective images
# caught against the rate of normal images rejected. The two thresholds above
# are two points on it.
fpr, tpr, _ = roc_curve(y_test, score_test)
fig, ax = plt.subplots(figsize=(4.5, 4.5), layout="constrained")
RocCurveDisplay(fpr=fpr, tpr=tpr, name="PaDiM", roc_auc=auroc).plot(ax=ax)
for (name, threshold), marker in zip(thresholds.items(), "os"):
    flagged = score_test > threshold
    ax.plot(flagged[y_test == 0].mean(), flagged[y_test == 1].mean(), marker,
            ms=9, label=f"{name} threshold")
ax.set_xlim(-0.03, 1.03)
ax.set_ylim(-0.03, 1.03)
ax.legend(loc="lower right")
plt.show()

"""Evaluation metrics for anomaly detection and localisation.

The metrics of the MVTec AD benchmark, as reported in the PaDiM paper:

* :func:`image_auroc` -- detection: AUROC of one score per image;
* :func:`pixel_auroc` -- localisation: AUROC over all pixels of all images;
* :func:`aupro` -- localisation: normalised area under the per-region-overlap
  curve (:func:`pro_curve`) up to a false-positive rate of 0.3 (Bergmann et
  al., "The MVTec Anomaly Detection Dataset", IJCV 2021), which, unlike the
  pixel AUROC, weighs small and large defects equally.

Labels follow the usual metric convention: 0 = normal, 1 = anomalous, and
scores and maps are higher for more anomalous images and pixels.

The pixel-level metrics are exact (every distinct threshold is used, tied
pixels enter the curves together) and equal scikit-learn's ``roc_auc_score``
and the official MVTec AD evaluation code. They work in the maps' own
floating precision (float32 maps are not upcast) and keep one copy of the
pixel values, so thousands of 224 x 224 maps can be evaluated at once.

For model selection, :data:`pixel_auroc_scorer`, :data:`aupro_scorer` and
:func:`make_pixel_scorer` build ``scoring=`` callables for estimators with an
``anomaly_maps(X)`` method; they take the ground-truth masks as ``y``.
:data:`image_auroc_scorer` and :data:`image_average_precision_scorer` score
images from ``-score_samples`` with the usual labels (1 = anomalous).
scikit-learn's ``"roc_auc"`` scorer reads ``decision_function``, which is
higher for *normal* images, so it needs labels in which the normal class is
the greater one (+1 normal, -1 anomalous, as returned by ``predict``); it
then equals :func:`image_auroc` with 1 = anomalous.
"""

import inspect
import numbers

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "aupro",
    "aupro_scorer",
    "image_auroc",
    "image_auroc_scorer",
    "image_average_precision_scorer",
    "make_pixel_scorer",
    "pixel_auroc",
    "pixel_auroc_scorer",
    "pro_curve",
]

# Ground-truth regions are 8-connected, as in the MVTec AD evaluation code
# (scipy.ndimage.label with a 3 x 3 structuring element).
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)

# Pixels processed per vectorised step, to bound temporary index arrays.
_CHUNK = 1 << 18


def image_auroc(y_true, scores):
    """Image-level area under the ROC curve.

    A validated wrapper around :func:`sklearn.metrics.roc_auc_score`.

    Parameters
    ----------
    y_true : array-like of shape (n_images,)
        Ground truth: 0 (or False) = normal, 1 (or True) = anomalous.
    scores : array-like of shape (n_images,)
        Anomaly scores, higher = more anomalous (e.g. the negated
        ``score_samples`` of a detector).

    Returns
    -------
    auroc : float
        Probability that a random anomalous image scores higher than a
        random normal one (ties count one half).

    Examples
    --------
    >>> from skpadim.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if y_true.ndim != 1 or scores.ndim != 1:
        raise ValueError(
            f"y_true and scores must be 1-D; got shapes {y_true.shape} and {scores.shape}."
        )
    if len(y_true) != len(scores):
        raise ValueError(
            f"y_true has {len(y_true)} labels but scores has {len(scores)} values."
        )
    if len(y_true) == 0:
        raise ValueError("y_true and scores are empty; the AUROC needs images of both classes.")
    y_true = _check_binary(y_true, "y_true")
    scores = _check_finite(scores, "scores")
    n_pos = int(y_true.sum())
    if n_pos == 0 or n_pos == len(y_true):
        present = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"y_true contains only {present} images; the AUROC needs both classes."
        )
    return float(roc_auc_score(y_true, scores))


def pixel_auroc(masks, maps):
    """Pixel-level area under the ROC curve over all pixels of all images.

    Equal to ``roc_auc_score(masks.ravel(), maps.ravel())``, computed with the
    Mann-Whitney rank-sum formula (tied scores count one half) on one copy of
    the pixel values in the maps' precision.

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth masks: 0 (or False) = normal pixel, 1 (or True) =
        anomalous pixel. A list may hold images of different sizes.
    maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous, each of the same shape as its
        mask.

    Returns
    -------
    auroc : float
        Probability that a random anomalous pixel scores higher than a random
        normal pixel (ties count one half).

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import pixel_auroc
    >>> masks = np.zeros((2, 4, 4), dtype=bool)
    >>> masks[1, 1:3, 1:3] = True
    >>> maps = np.where(masks, 0.9, 0.1)
    >>> pixel_auroc(masks, maps)
    1.0
    >>> maps[0, 0, 0] = 0.95  # one normal pixel above all anomalous ones
    >>> round(pixel_auroc(masks, maps), 4)  # 27 / 28
    0.9643
    """
    neg, pos, _, _ = _split_pixels(masks, maps, regions=False)
    neg.sort()
    pos.sort()  # sorted needles make the binary searches cache friendly
    # For each anomalous pixel: (#normal below) + (#normal below or equal),
    # i.e. twice its Mann-Whitney count; summed in Python ints to stay exact.
    twice_u = 0
    for start in range(0, len(pos), _CHUNK):
        block = pos[start : start + _CHUNK]
        twice_u += int(np.searchsorted(neg, block, side="left").sum())
        twice_u += int(np.searchsorted(neg, block, side="right").sum())
    return twice_u / (2 * len(pos) * len(neg))


def pro_curve(masks, maps):
    """Per-region-overlap (PRO) curve: mean region overlap against FPR.

    For a threshold ``t`` a pixel is predicted anomalous when its map value is
    ``>= t``. The false-positive rate is the fraction of normal pixels (of all
    images) predicted anomalous; the PRO is the mean, over all ground-truth
    regions of all images, of the fraction of the region's pixels predicted
    anomalous. Regions are the 8-connected components of each mask, as in
    the MVTec AD evaluation code. The curve has one point per distinct map
    value (tied pixels enter together), in decreasing order of threshold,
    preceded by the point (0, 0).

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth masks: 0 (or False) = normal pixel, 1 (or True) =
        anomalous pixel. A list may hold images of different sizes.
    maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous, each of the same shape as its
        mask.

    Returns
    -------
    fpr : ndarray of shape (n_points,)
        Non-decreasing false-positive rates, from 0 to 1.
    pro : ndarray of shape (n_points,)
        Non-decreasing per-region overlaps, from 0 to 1.

    See Also
    --------
    aupro : The normalised area under this curve up to a maximal FPR.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import pro_curve
    >>> masks = np.zeros((2, 4, 4), dtype=bool)
    >>> masks[1, 0, 0] = masks[1, 2:4, 2:4] = True  # two regions
    >>> maps = np.zeros((2, 4, 4))
    >>> maps[1, 2:4, 2:4] = 0.9   # finds the large region
    >>> maps[0, 0, 0] = 0.5       # one false positive
    >>> fpr, pro = pro_curve(masks, maps)
    >>> print(np.round(fpr, 3), pro)
    [0.    0.    0.037 1.   ] [0.  0.5 0.5 1. ]
    """
    curve = _ProCurve(masks, maps)
    points = list(curve.iter_points(curve.thresholds()))
    fpr = np.concatenate([[0.0]] + [f for f, _ in points])
    pro = np.concatenate([[0.0]] + [p for _, p in points])
    return fpr, pro


def aupro(masks, maps, max_fpr=0.3, num_thresholds=None):
    """Normalised area under the PRO curve up to a false-positive rate.

    The localisation metric of the MVTec AD benchmark (Bergmann et al., IJCV
    2021), reported as "PRO score" in the PaDiM paper: the area under
    :func:`pro_curve` from FPR 0 to ``max_fpr`` (trapezoid rule, the PRO at
    ``max_fpr`` linearly interpolated), divided by ``max_fpr`` so that a
    perfect map scores 1. Regions are 8-connected.

    Tied map values form a single curve point. Constant maps therefore give
    the straight line from (0, 0) to (1, 1), hence ``max_fpr / 2`` (0.15 for
    the default ``max_fpr=0.3``), the same as a random map on average.

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth masks: 0 (or False) = normal pixel, 1 (or True) =
        anomalous pixel. A list may hold images of different sizes.
    maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous, each of the same shape as its
        mask.
    max_fpr : float in (0, 1], default=0.3
        Integration limit on the false-positive rate.
    num_thresholds : int in [2, 2**24], default=None
        None evaluates the curve exactly, at every distinct map value. An
        integer instead uses that many equally spaced thresholds from the
        smallest to the largest map value, as some published implementations
        do; it approximates the exact value and is provided for comparison
        with them.

    Returns
    -------
    aupro : float
        In [0, 1]; 1 for a map that flags all anomalous pixels before any
        normal one.

    See Also
    --------
    pro_curve : The curve being integrated.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import aupro
    >>> masks = np.zeros((2, 4, 4), dtype=bool)
    >>> masks[1, 0, 0] = masks[1, 2:4, 2:4] = True
    >>> aupro(masks, masks.astype(float))
    1.0
    >>> aupro(masks, np.zeros((2, 4, 4)))  # constant maps
    0.15
    >>> maps = np.zeros((2, 4, 4))
    >>> maps[1, 2:4, 2:4] = 0.9  # finds one of the two regions
    >>> round(aupro(masks, maps), 4)  # PRO rises from 0.5 to 0.65 at FPR 0.3
    0.575
    """
    max_fpr = _check_aupro_params(max_fpr, num_thresholds)
    curve = _ProCurve(masks, maps, num_thresholds=num_thresholds)

    # Accumulate the trapezoids chunk by chunk rather than materialising the
    # curve, which has up to one point per pixel.
    area, f_last, p_last = 0.0, 0.0, 0.0
    for fpr, pro in curve.iter_points(curve.thresholds(max_fpr)):
        f = np.concatenate(([f_last], fpr))
        p = np.concatenate(([p_last], pro))
        cut = np.searchsorted(f, max_fpr, side="right")  # f[:cut] <= max_fpr
        area += _trapezoid(f[:cut], p[:cut])
        if cut < len(f):
            # f[cut - 1] <= max_fpr < f[cut]: interpolate the PRO at max_fpr.
            fa, fb, pa, pb = f[cut - 1], f[cut], p[cut - 1], p[cut]
            p_max = pa + (pb - pa) * (max_fpr - fa) / (fb - fa)
            area += 0.5 * (pa + p_max) * (max_fpr - fa)
            break
        f_last, p_last = f[-1], p[-1]
    return float(area / max_fpr)


# Most thresholds aupro's approximate curve takes: 2**24, the integers a float32
# holds exactly, which float32 maps binned on a finer grid would not resolve.
_MAX_THRESHOLDS = 2**24


def _check_aupro_params(max_fpr=0.3, num_thresholds=None):
    """:func:`aupro`'s options, checked; returns ``max_fpr`` as a float."""
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, numbers.Real) or not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be a float in (0, 1]; got {max_fpr!r}.")
    if num_thresholds is not None and (
        not isinstance(num_thresholds, numbers.Integral)
        or isinstance(num_thresholds, bool)
        or num_thresholds < 2
    ):
        raise ValueError(f"num_thresholds must be None or an int >= 2; got {num_thresholds!r}.")
    if num_thresholds is not None and num_thresholds > _MAX_THRESHOLDS:
        # Beyond that the grid costs memory for nothing: the exact curve is cheaper.
        raise ValueError(
            f"num_thresholds={num_thresholds} is more than {_MAX_THRESHOLDS}; pass None "
            "for the exact curve (every distinct map value)."
        )
    return float(max_fpr)


def make_pixel_scorer(metric, **kwargs):
    """Make a scorer for pixel-level metrics, usable as ``scoring=``.

    The scorer is a callable ``scorer(estimator, X, y)`` that computes
    ``metric(y, estimator.anomaly_maps(X), **kwargs)``. Because pixel labels
    are not a per-sample target, **y must be the ground-truth masks** of the
    images in X: an array of shape (n_images, H, W) or a list of 2-D arrays
    at each image's resolution (0 = normal, 1 = anomalous pixel; an image is
    anomalous when its mask has any 1). Pass these masks as ``y`` to
    :func:`~sklearn.model_selection.cross_val_score`,
    :class:`~sklearn.model_selection.GridSearchCV`, etc.; the estimator's
    ``fit`` must accept and ignore them. Higher scores are better.

    Parameters
    ----------
    metric : {"pixel_auroc", "aupro"} or callable
        The metric, or a callable ``metric(masks, maps, **kwargs)`` returning
        a float, higher = better.
    **kwargs : dict
        Passed to the metric, e.g. ``max_fpr=0.05`` for ``"aupro"``.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``, where ``estimator`` has an
        ``anomaly_maps(X)`` method returning maps of the same shapes as the
        masks ``y``, higher = more anomalous.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.base import BaseEstimator
    >>> from skpadim.metrics import make_pixel_scorer
    >>> class Brightness(BaseEstimator):
    ...     def fit(self, X, y=None):
    ...         return self
    ...     def anomaly_maps(self, X):
    ...         return np.asarray(X, dtype=np.float32)
    >>> X = np.zeros((3, 8, 8))
    >>> X[2, 2:5, 2:5] = 1.0  # a bright defect
    >>> masks = X > 0.5
    >>> scorer = make_pixel_scorer("aupro", max_fpr=0.05)
    >>> scorer
    make_pixel_scorer('aupro', max_fpr=0.05)
    >>> scorer(Brightness().fit(X), X, masks)
    1.0
    """
    if isinstance(metric, str):
        if metric not in _PIXEL_METRICS:
            raise ValueError(
                f"metric must be one of {sorted(_PIXEL_METRICS)} or a callable; got {metric!r}."
            )
    elif not callable(metric):
        raise TypeError(f"metric must be a string or a callable; got {type(metric).__name__}.")
    # Checked now: inside a search, an error raised while scoring becomes a NaN
    # score for every candidate (error_score=nan), with only a warning.
    function = _PIXEL_METRICS.get(metric) if isinstance(metric, str) else metric
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some callables do not expose one
        signature = None
    if signature is not None:
        try:
            signature.bind(None, None, **kwargs)
        except TypeError as exc:
            name = metric if isinstance(metric, str) else getattr(metric, "__name__", repr(metric))
            raise TypeError(
                f"make_pixel_scorer({name!r}, ...): the metric cannot take these arguments ({exc})."
            ) from None
    if isinstance(metric, str) and metric == "aupro":
        _check_aupro_params(**kwargs)
    return _PixelScorer(metric, kwargs)


class _PixelScorer:
    """``scorer(estimator, X, y)``: a pixel metric of ``estimator.anomaly_maps(X)``."""

    def __init__(self, metric, kwargs):
        # Keep the name, not the function, for strings: readable and picklable.
        self.metric = metric
        self.kwargs = kwargs

    def __call__(self, estimator, X, y):
        if y is None:
            raise ValueError(
                "Pixel-level scorers need the ground-truth masks of X as y "
                "(an array (n_images, H, W) or a list of 2-D arrays); got y=None."
            )
        if not callable(getattr(_final_step(estimator), "anomaly_maps", None)):
            raise TypeError(
                f"{type(estimator).__name__} has no anomaly_maps method; pixel-level "
                "scorers need an estimator that returns anomaly maps."
            )
        metric = _PIXEL_METRICS[self.metric] if isinstance(self.metric, str) else self.metric
        return float(metric(y, _anomaly_maps(estimator, X), **self.kwargs))

    def __repr__(self):
        if isinstance(self.metric, str):
            name = repr(self.metric)
        else:
            name = getattr(self.metric, "__name__", repr(self.metric))
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"make_pixel_scorer({name}{args})"


_PIXEL_METRICS = {"pixel_auroc": pixel_auroc, "aupro": aupro}


def _final_step(estimator):
    return estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator


def _anomaly_maps(estimator, X):
    """Maps of an estimator, or of the last step of a Pipeline fed by the others."""
    if hasattr(estimator, "steps"):
        return estimator[-1].anomaly_maps(estimator[:-1].transform(X))
    return estimator.anomaly_maps(X)


def _image_labels(y):
    """0/1 image labels from labels, or from masks (an image is anomalous if any pixel is)."""
    if isinstance(y, (list, tuple)) and len(y) and np.ndim(y[0]) == 2:
        return np.array([np.any(m) for m in y], dtype=int)
    y = np.asarray(y)
    if y.ndim == 3:
        return y.reshape(len(y), -1).any(axis=1).astype(int)
    return y


def _normal_flags(y):
    """Boolean "is normal" per image.

    Masks: an empty mask is normal. Booleans: False is normal (True =
    anomalous, as the metrics read them). Other labels: 0 is normal when y
    holds a 0; otherwise y follows scikit-learn's outlier convention, +1 normal
    and -1 anomalous (a training fold of that convention holds only +1).
    """
    is_masks = (isinstance(y, (list, tuple)) and len(y) and np.ndim(y[0]) == 2) or np.ndim(y) == 3
    labels = _image_labels(y)
    if np.ndim(labels) != 1:
        raise ValueError(f"y must be 1-D labels or (n, H, W) masks, got shape {np.shape(labels)}.")
    if labels.dtype == object and all(isinstance(v, (bool, np.bool_)) for v in labels):
        labels = labels.astype(bool)  # a pandas column of booleans that once held None
    if not is_masks and labels.dtype != bool and np.any(labels == 0) and np.any(labels == -1):
        # Under 0 / 1, -1 would be anomalous; under +1 / -1, 1 would be normal:
        # one stray label would flip the meaning of all the others.
        raise ValueError(
            "y mixes the two label conventions: it holds both 0 and -1. Use 0 (normal) / "
            "1 (anomalous), or +1 (normal) / -1 (anomalous)."
        )
    if is_masks or labels.dtype == bool or np.any(labels == 0):
        normal = labels == 0
    else:
        normal = labels == 1
    # Anything but 0 / 1 (or -1 / +1) would count as anomalous without a word:
    # strings ("good"), class indices, probabilities.
    if not is_masks and not np.all(normal | (labels == 1) | (labels == -1)):
        values = np.unique(labels[~(normal | (labels == 1) | (labels == -1))])[:5]
        raise ValueError(
            "y must hold 0 (normal) / 1 (anomalous) or +1 (normal) / -1 (anomalous) labels, "
            f"or masks; got values such as {values.tolist()}."
        )
    return normal


class _ImageScorer:
    """``scorer(estimator, X, y)``: an image metric of the anomaly scores ``-score_samples``."""

    def __init__(self, name, metric):
        self.name, self.metric = name, metric

    def __call__(self, estimator, X, y):
        if y is None:
            raise ValueError(f"{self.name} needs image labels (0 normal, 1 anomalous) or masks as y.")
        scores = _check_finite(np.asarray(estimator.score_samples(X)), "score_samples")
        # In float: negating unsigned or boolean scores would wrap or fail.
        return float(self.metric(_image_labels(y), -scores.astype(np.float64)))

    def __repr__(self):
        return self.name


def _average_precision(y_true, scores):
    from sklearn.metrics import average_precision_score

    image_auroc(y_true, scores)  # the same validation of labels and scores
    return average_precision_score(y_true, scores)


#: Scorer ``scorer(estimator, X, y)``: :func:`image_auroc` of the anomaly scores
#: ``-estimator.score_samples(X)`` with ``y`` = 0 normal / 1 anomalous (or the
#: masks). Unlike scikit-learn's ``"roc_auc"``, which reads ``decision_function``
#: (higher = normal) and so needs the normal class to be the greater label, it
#: takes the usual 1 = defective labels.
image_auroc_scorer = _ImageScorer("image_auroc_scorer", image_auroc)

#: Scorer ``scorer(estimator, X, y)``: average precision of detecting anomalous
#: images (``y`` = 1, or masks) from ``-estimator.score_samples(X)``.
image_average_precision_scorer = _ImageScorer("image_average_precision_scorer", _average_precision)

#: Scorer ``scorer(estimator, X, y)`` returning :func:`pixel_auroc` of
#: ``estimator.anomaly_maps(X)`` against the masks ``y``; see
#: :func:`make_pixel_scorer`.
pixel_auroc_scorer = make_pixel_scorer("pixel_auroc")

#: Scorer ``scorer(estimator, X, y)`` returning :func:`aupro` (``max_fpr=0.3``)
#: of ``estimator.anomaly_maps(X)`` against the masks ``y``; see
#: :func:`make_pixel_scorer`.
aupro_scorer = make_pixel_scorer("aupro")


# -- helpers ----------------------------------------------------------------
class _ProCurve:
    """The sorted pixel values behind a PRO curve, evaluated lazily.

    Keeps the normal pixels' values sorted, the anomalous pixels' values
    sorted with the cumulative PRO weight (``1 / region size``) of the largest
    ones, so that FPR and PRO at any threshold are two binary searches.
    """

    def __init__(self, masks, maps, num_thresholds=None):
        neg, pos, weights, self.n_regions = _split_pixels(masks, maps, regions=True)
        if num_thresholds is not None:
            lo = min(neg.min(), pos.min())
            hi = max(neg.max(), pos.max())
            if hi > lo:
                grid = np.linspace(float(lo), float(hi), num_thresholds)
                _bin_inplace(neg, grid)
                _bin_inplace(pos, grid)
        neg.sort()
        order = np.argsort(pos, kind="stable")
        self.neg, self.pos = neg, pos[order]
        # cum_weight[k]: total PRO weight of the k largest anomalous values.
        self.cum_weight = np.concatenate(([0.0], np.cumsum(weights[order][::-1])))
        # All regions are fully covered at the lowest threshold; make that
        # exact, not a sum of rounded 1 / size terms (a perfect map scores 1).
        self.cum_weight[-1] = self.n_regions

    def thresholds(self, max_fpr=None):
        """Distinct map values in decreasing order, stopping once FPR >= max_fpr."""
        neg, pos = self.neg, self.pos
        if max_fpr is None:
            lowest = -np.inf
        else:
            # The value at which at least ceil(max_fpr * n) + 1 normal pixels
            # are flagged, so FPR > max_fpr there; lower thresholds cannot
            # change the area up to max_fpr. (The +1 absorbs rounding.)
            count = min(len(neg), int(np.ceil(max_fpr * len(neg))) + 1)
            lowest = neg[len(neg) - count]
        values = np.concatenate(
            (neg[np.searchsorted(neg, lowest):], pos[np.searchsorted(pos, lowest):])
        )
        return np.unique(values)[::-1]

    def iter_points(self, thresholds):
        """Yield (fpr, pro) arrays for consecutive chunks of thresholds."""
        n_neg, n_pos = len(self.neg), len(self.pos)
        for start in range(0, len(thresholds), _CHUNK):
            t = thresholds[start : start + _CHUNK]
            fpr = (n_neg - np.searchsorted(self.neg, t, side="left")) / n_neg
            n_above = n_pos - np.searchsorted(self.pos, t, side="left")
            # Summing 1 / size over a region can exceed 1 by a rounding error.
            pro = np.minimum(self.cum_weight[n_above] / self.n_regions, 1.0)
            yield fpr, pro


def _trapezoid(x, y):
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2) if len(x) > 1 else 0.0


def _bin_inplace(values, grid):
    """Replace each value by the index of the largest grid threshold <= it."""
    for start in range(0, len(values), _CHUNK):
        block = values[start : start + _CHUNK]
        block[:] = np.searchsorted(grid, block, side="right") - 1


def _split_pixels(masks, maps, regions):
    """Validate masks and maps; gather normal and anomalous pixel values.

    Returns ``neg`` (values of normal pixels), ``pos`` (values of anomalous
    pixels), both fresh 1-D arrays in the maps' floating precision (at least
    float32) and safe to sort in place, and, if ``regions``, ``weights``
    (float64, ``1 / size`` of each anomalous pixel's 8-connected region,
    aligned with ``pos``) and the total number of regions.
    """
    masks = _as_image_sequence(masks, "masks")
    maps = _as_image_sequence(maps, "maps")
    if len(masks) != len(maps):
        raise ValueError(f"masks has {len(masks)} images but maps has {len(maps)}.")
    if len(masks) == 0:
        raise ValueError("masks and maps contain no image.")

    # First pass: validate and count, so that the outputs are allocated once
    # (concatenating per-image pieces would need twice the memory).
    n_pos = n_total = 0
    dtypes = {np.dtype(np.float32)}
    for i in range(len(masks)):
        mask = _check_mask(masks[i], i)
        amap = np.asarray(maps[i])
        if amap.shape != mask.shape:
            raise ValueError(
                f"masks[{i}] has shape {mask.shape} but maps[{i}] has shape {amap.shape}."
            )
        if amap.dtype.kind not in "biuf":
            raise ValueError(f"maps[{i}] must be real numbers; got dtype {amap.dtype}.")
        _check_finite(amap, f"maps[{i}]")
        dtypes.add(amap.dtype)
        n_pos += int(np.count_nonzero(mask))
        n_total += mask.size
    if n_pos == 0:
        raise ValueError(
            "masks contain no anomalous pixel (value 1); pixel-level metrics "
            "need images with ground-truth defects."
        )
    if n_pos == n_total:
        raise ValueError(
            "masks contain no normal pixel (value 0); pixel-level metrics need both."
        )

    dtype = np.result_type(*dtypes)
    neg = np.empty(n_total - n_pos, dtype=dtype)
    pos = np.empty(n_pos, dtype=dtype)
    weights = np.empty(n_pos) if regions else None
    n_regions = i_pos = i_neg = 0
    for i in range(len(masks)):
        mask = np.asarray(masks[i]) != 0
        amap = np.asarray(maps[i])
        k = int(np.count_nonzero(mask))
        pos[i_pos : i_pos + k] = amap[mask]
        neg[i_neg : i_neg + mask.size - k] = amap[~mask]
        if regions and k:
            labels, n = ndimage.label(mask, structure=_REGION_STRUCTURE)
            sizes = np.bincount(labels.ravel())
            weights[i_pos : i_pos + k] = 1.0 / sizes[labels[mask]]
            n_regions += n
        i_pos += k
        i_neg += mask.size - k
    return neg, pos, weights, n_regions


def _as_image_sequence(images, name):
    """A list of 2-D images, or an array (n_images, H, W), indexable per image."""
    if isinstance(images, (list, tuple)):
        return list(images)
    array = np.asarray(images)
    if array.ndim != 3:
        raise ValueError(
            f"{name} must be an array of shape (n_images, H, W) or a list of 2-D "
            f"arrays; got an array of shape {array.shape}."
        )
    return array


def _some_values(a, k=5):
    """Up to ``k`` distinct values of ``a``, for an error message (``np.unique``
    cannot sort an object array holding None)."""
    if a.dtype.kind == "O":
        return [repr(v) for v in dict.fromkeys(a.ravel().tolist())][:k]
    return np.unique(a)[:k].tolist()


def _check_mask(mask, i):
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"masks[{i}] must be a 2-D array; got shape {mask.shape}.")
    if mask.dtype != bool:
        if mask.dtype.kind not in "biuf" or not np.all((mask == 0) | (mask == 1)):
            raise ValueError(
                f"masks[{i}] must contain only 0 and 1 (or booleans); got values such "
                f"as {_some_values(mask)}. For 0/255 images pass mask > 0."
            )
    return mask


def _check_binary(y, name):
    if y.dtype == bool:
        return y
    if y.dtype.kind not in "biuf" or not np.all((y == 0) | (y == 1)):
        raise ValueError(
            f"{name} must contain only 0 (normal) and 1 (anomalous); got values "
            f"{_some_values(y)}. For the outlier convention (+1 normal, "
            f"-1 anomalous) pass {name} == -1."
        )
    return y.astype(bool)


def _check_finite(values, name):
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers; got dtype {values.dtype}.")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinity.")
    return values

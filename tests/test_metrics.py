"""Metrics against scikit-learn and a plain brute-force PRO reference."""

import doctest
import pickle
import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

import skpadim.metrics
from skpadim.metrics import (
    aupro,
    aupro_scorer,
    image_auroc,
    image_auroc_scorer,
    make_pixel_scorer,
    pixel_auroc,
    pixel_auroc_scorer,
    pro_curve,
)


# -- data and references ----------------------------------------------------
def _blob_masks(n=4, size=16, seed=0):
    """Masks with a few random rectangles and discs; the first image is defect-free."""
    rng = np.random.RandomState(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for mask in masks[1:]:
        for _ in range(rng.randint(1, 4)):
            r, c = rng.randint(0, size, 2)
            if rng.rand() < 0.5:
                mask[r : r + rng.randint(1, 5), c : c + rng.randint(1, 5)] = True
            else:
                mask |= (yy - r) ** 2 + (xx - c) ** 2 <= rng.randint(1, 9)
    return masks


def _noisy_maps(masks, seed=0, levels=None):
    """Maps that partly separate anomalous pixels; quantised (with ties) if levels."""
    rng = np.random.RandomState(seed)
    maps = [m + rng.rand(*np.shape(m)) * 1.5 for m in masks]
    if levels is not None:
        maps = [np.round(a * levels) / levels for a in maps]
    return np.stack(maps) if isinstance(masks, np.ndarray) else maps


def _reference_pro_curve(masks, maps):
    """PRO curve by brute force: one pass over all pixels per distinct threshold."""
    masks = [np.asarray(m, dtype=bool) for m in masks]
    maps = [np.asarray(a, dtype=np.float64) for a in maps]
    regions = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = np.concatenate([a[~m] for a, m in zip(maps, masks)])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(maps[i][region] >= t) for i, region in regions]))
    return np.array(fprs), np.array(pros)


def _reference_aupro(masks, maps, max_fpr):
    fpr, pro = _reference_pro_curve(masks, maps)
    n_keep = np.sum(fpr <= max_fpr)  # fpr is non-decreasing: a prefix
    x, y = list(fpr[:n_keep]), list(pro[:n_keep])
    if x[-1] < max_fpr:
        j = n_keep
        slope = (pro[j] - pro[j - 1]) / (fpr[j] - fpr[j - 1])
        x.append(max_fpr)
        y.append(pro[j - 1] + slope * (max_fpr - fpr[j - 1]))
    area = sum((x[k + 1] - x[k]) * (y[k + 1] + y[k]) / 2 for k in range(len(x) - 1))
    return area / max_fpr


# -- pixel AUROC ------------------------------------------------------------
@pytest.mark.parametrize("levels", [None, 4, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_equals_sklearn(seed, levels):
    masks = _blob_masks(seed=seed)
    maps = _noisy_maps(masks, seed=seed, levels=levels)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-6)
    assert pixel_auroc(masks, maps.astype(np.float32)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("levels", [None, 5])
def test_pixel_auroc_list_of_different_sizes(levels):
    rng = np.random.RandomState(3)
    masks = [rng.rand(h, w) < 0.2 for h, w in [(7, 9), (12, 5), (3, 3), (16, 16)]]
    maps = _noisy_maps(masks, seed=3, levels=levels)
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pixel_auroc_small_integer_maps_property(data):
    n = data.draw(st.integers(2, 40))
    labels = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    values = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    if all(labels) or not any(labels):
        labels[0] = not labels[0]
    masks = np.array(labels).reshape(1, 1, n)
    maps = np.array(values, dtype=np.int64).reshape(1, 1, n)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, values), abs=1e-12)


def test_pixel_auroc_keeps_float64_precision():
    # Distinct in float64 but equal in float32: a float32 downcast would tie them.
    masks = np.array([[[0, 1, 0, 1]]])
    maps = 1.0 + np.array([[[1e-12, 3e-12, 2e-12, 4e-12]]])
    assert pixel_auroc(masks, maps) == roc_auc_score(masks.ravel(), maps.ravel()) == 1.0
    assert pixel_auroc(masks, maps.astype(np.float32)) == 0.5


def test_pixel_auroc_perfect_and_inverted():
    masks = _blob_masks()
    maps = masks.astype(np.float32)
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(masks, -maps) == 0.0
    assert pixel_auroc(masks, np.full(masks.shape, 0.3)) == 0.5


def test_pixel_auroc_many_large_maps_is_exact_and_memory_light():
    rng = np.random.RandomState(0)
    n, size = 300, 224
    masks = np.zeros((n, size, size), dtype=bool)
    masks[::3, 100:140, 60:90] = True
    # 256 levels, slightly higher inside the defects.
    levels = rng.randint(0, 256, size=masks.shape).astype(np.uint8)
    levels[masks] = np.maximum(levels[masks], rng.randint(0, 256, masks.sum()))
    maps = levels.astype(np.float32)

    tracemalloc.start()
    try:
        result = pixel_auroc(masks, maps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Independent exact value from the 256-bin histograms of each class.
    pos_hist = np.bincount(levels[masks], minlength=256).astype(np.float64)
    neg_hist = np.bincount(levels[~masks], minlength=256).astype(np.float64)
    below = np.concatenate(([0.0], np.cumsum(neg_hist)[:-1]))
    expected = np.sum(pos_hist * (below + 0.5 * neg_hist)) / (pos_hist.sum() * neg_hist.sum())
    assert 0.5 < result < 1
    assert result == pytest.approx(expected, abs=1e-9)
    # One copy of the float32 values plus small chunks, no float64 or index copies.
    assert peak < 1.5 * maps.nbytes

    masks, maps = masks[:100], maps[:100] + rng.rand(100, size, size).astype(np.float32)
    tracemalloc.start()
    try:
        result = aupro(masks, maps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.15 < result < 1
    # The official implementation needs about 5 times the float32 maps.
    assert peak < 2.5 * maps.nbytes


# -- PRO curve and AUPRO ------------------------------------------------------
@pytest.mark.parametrize("levels", [None, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pro_curve_equals_brute_force(seed, levels):
    masks = _blob_masks(seed=seed)
    maps = _noisy_maps(masks, seed=seed, levels=levels)
    fpr, pro = pro_curve(masks, maps)
    ref_fpr, ref_pro = _reference_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)


@pytest.mark.parametrize("max_fpr", [0.3, 1.0, 0.05])
@pytest.mark.parametrize("levels", [None, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_equals_brute_force(seed, levels, max_fpr):
    masks = _blob_masks(seed=seed)
    maps = _noisy_maps(masks, seed=seed, levels=levels)
    expected = _reference_aupro(masks, maps, max_fpr)
    assert 0 < expected < 1
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("max_fpr", [0.3, 0.05])
def test_aupro_list_of_different_sizes(max_fpr):
    masks = [m[: 16 - k, k:] for k, m in enumerate(_blob_masks(n=5, seed=4))]
    maps = _noisy_maps(masks, seed=4, levels=6)
    expected = _reference_aupro(masks, maps, max_fpr)
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)
    assert aupro([m.astype(np.uint8) for m in masks], maps, max_fpr) == pytest.approx(expected)


def test_aupro_float32_maps_agree():
    masks = _blob_masks(seed=5)
    maps = _noisy_maps(masks, seed=5).astype(np.float32)
    expected = _reference_aupro(masks, maps, 0.3)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_regions_are_8_connected():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 2, 2] = masks[0, 3, 3] = masks[0, 3, 4] = True  # one diagonal-touching region
    maps = np.zeros((1, 6, 6))
    maps[0, 2, 2] = 1.0
    fpr, pro = pro_curve(masks, maps)
    # 8-connectivity: one region of 3 pixels, 1/3 covered (4-connectivity: 1/2).
    np.testing.assert_allclose(pro, [0, 1 / 3, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1])


def test_aupro_perfect_map():
    masks = _blob_masks(seed=1)
    assert aupro(masks, masks.astype(float)) == 1.0
    assert aupro(masks, masks.astype(float), max_fpr=1.0) == 1.0
    assert aupro(masks, -masks.astype(float)) == 0.0


def test_aupro_single_region():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, 2:4, 2:6] = True  # 8 pixels
    maps = np.zeros((2, 8, 8))
    maps[1, 2, 2:6] = 2.0  # half the region, before any normal pixel
    maps[0, 0, 0] = 1.0  # then one false positive
    # Curve: (0, 0) -> (0, 0.5) -> (1/120, 0.5) -> (1, 1), cut at FPR 0.3.
    p = 0.5 + 0.5 * (0.3 - 1 / 120) / (1 - 1 / 120)
    expected = (0.5 * (1 / 120) + (0.5 + p) / 2 * (0.3 - 1 / 120)) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-12)


@pytest.mark.parametrize("max_fpr, expected", [(0.3, 0.15), (1.0, 0.5), (0.05, 0.025)])
def test_constant_maps(max_fpr, expected):
    masks = _blob_masks(seed=2)
    maps = np.full(masks.shape, 7.0, dtype=np.float32)
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(pro, [0, 1])
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, maps) == 0.5


def test_aupro_num_thresholds():
    masks = _blob_masks(seed=6)
    # Integer maps 0..9 lie exactly on the 10-threshold grid: no approximation.
    maps = np.floor(_noisy_maps(masks, seed=6) * 6).clip(0, 9)
    assert maps.min() == 0 and maps.max() == 9
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=10) == pytest.approx(exact, abs=1e-12)
    assert aupro(masks, maps, num_thresholds=3) != pytest.approx(exact, abs=1e-3)
    # A fine grid approximates a continuous map.
    maps = _noisy_maps(masks, seed=6)
    assert aupro(masks, maps, num_thresholds=5000) == pytest.approx(aupro(masks, maps), abs=5e-3)


# -- input validation ---------------------------------------------------------
@pytest.mark.parametrize("metric", [pixel_auroc, aupro, pro_curve])
def test_no_anomalous_or_no_normal_pixel(metric):
    maps = np.random.RandomState(0).rand(2, 5, 5)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        metric(np.zeros((2, 5, 5), dtype=bool), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        metric(np.ones((2, 5, 5)), maps)


@pytest.mark.parametrize("metric", [pixel_auroc, aupro, pro_curve])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_maps(metric, bad):
    masks = _blob_masks(seed=0)
    maps = _noisy_maps(masks)
    maps[1, 3, 3] = bad
    with pytest.raises(ValueError, match=re.escape("maps[1] contains NaN or infinity")):
        metric(masks, maps)


@pytest.mark.parametrize("metric", [pixel_auroc, aupro, pro_curve])
def test_shape_mismatch_names_the_image(metric):
    masks = [np.eye(10, 12, dtype=bool)] * 4
    maps = [np.zeros((10, 12))] * 3 + [np.zeros((10, 13))]
    msg = "masks[3] has shape (10, 12) but maps[3] has shape (10, 13)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        metric(masks, maps)
    with pytest.raises(ValueError, match="masks has 4 images but maps has 3"):
        metric(masks, maps[:3])
    with pytest.raises(ValueError, match=re.escape("masks must be an array of shape")):
        metric(np.zeros((10, 12)), np.zeros((10, 12)))
    with pytest.raises(ValueError, match=re.escape("masks[0] must be a 2-D array")):
        metric([np.zeros((1, 10, 12))], [np.zeros((1, 10, 12))])
    with pytest.raises(ValueError, match="no image"):
        metric([], [])


def test_non_binary_masks():
    masks = _blob_masks().astype(np.uint8) * 255
    with pytest.raises(ValueError, match=re.escape("masks[1] must contain only 0 and 1")):
        pixel_auroc(masks, _noisy_maps(masks > 0))


@pytest.mark.parametrize("kwargs", [{"max_fpr": 0}, {"max_fpr": 1.5}, {"max_fpr": True},
                                    {"num_thresholds": 1}])
def test_aupro_parameter_validation(kwargs):
    masks = _blob_masks()
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        aupro(masks, _noisy_maps(masks), **kwargs)


# -- image AUROC ------------------------------------------------------------
def test_image_auroc():
    rng = np.random.RandomState(0)
    y = rng.rand(50) < 0.4
    scores = np.round(rng.rand(50) + y, 1)  # ties
    assert image_auroc(y, scores) == roc_auc_score(y, scores)
    assert image_auroc(y.astype(int), scores) == roc_auc_score(y, scores)
    assert isinstance(image_auroc(y, scores), float)


@pytest.mark.parametrize(
    "y, scores, match",
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "only normal"),
        ([], [], "are empty"),
        ([1, 1], [0.1, 0.2], "only anomalous"),
        ([0, 1, 1], [0.1, 0.2], "3 labels but scores has 2"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([1, -1], [0.1, 0.2], "y_true == -1"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_image_auroc_validation(y, scores, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        image_auroc(y, scores)


# -- scorers ----------------------------------------------------------------
class _BrightnessDetector(BaseEstimator):
    """Maps = the images themselves (optionally negated), like a thresholded detector."""

    def __init__(self, sign=1.0):
        self.sign = sign

    def fit(self, X, y=None):
        self.fitted_ = True
        return self

    def anomaly_maps(self, X):
        maps = [self.sign * np.asarray(x, dtype=np.float32) for x in X]
        return np.stack(maps) if len({m.shape for m in maps}) == 1 else maps


def _scorer_data(n=8):
    masks = _blob_masks(n=n, seed=7)
    masks[1:, 0, 0] = True  # every fold has defects
    return _noisy_maps(masks, seed=7), masks


@pytest.mark.parametrize(
    "scorer, metric",
    [(pixel_auroc_scorer, pixel_auroc), (aupro_scorer, aupro)],
)
def test_scorers_in_cross_val_score(scorer, metric):
    X, masks = _scorer_data()
    scores = cross_val_score(
        _BrightnessDetector(), X, masks, scoring=scorer, cv=KFold(2), error_score="raise"
    )
    expected = [metric(masks[:4], X[:4]), metric(masks[4:], X[4:])]
    np.testing.assert_allclose(scores, expected)
    assert 0.5 < scores.min() < 1
    # Masks as a list of 2-D arrays work the same.
    listed = cross_val_score(
        _BrightnessDetector(), X, list(masks), scoring=scorer, cv=KFold(2), error_score="raise"
    )
    np.testing.assert_allclose(listed, expected)


def test_scorer_selects_the_better_model_in_grid_search():
    X, masks = _scorer_data()
    scorers = {
        "pixel_auroc": pixel_auroc_scorer,
        "aupro": make_pixel_scorer("aupro", max_fpr=0.05),
    }
    search = GridSearchCV(
        _BrightnessDetector(),
        {"sign": [-1.0, 1.0]},
        scoring=scorers,
        refit="aupro",
        cv=KFold(2),
        error_score="raise",
    ).fit(X, masks)
    assert search.best_params_ == {"sign": 1.0}
    assert search.cv_results_["mean_test_pixel_auroc"][0] < 0.5


def test_scorer_direct_call_images_of_different_sizes():
    masks = [m[: 16 - k, k:] for k, m in enumerate(_blob_masks(n=5, seed=4))]
    X = _noisy_maps(masks, seed=4)
    est = _BrightnessDetector().fit(X)
    assert pixel_auroc_scorer(est, X, masks) == pytest.approx(pixel_auroc(masks, X))
    scorer = make_pixel_scorer(lambda m, a, k: aupro(m, a, max_fpr=k), k=0.1)
    assert scorer(est, X, masks) == pytest.approx(aupro(masks, X, max_fpr=0.1))


def test_scorer_errors_and_pickling():
    X, masks = _scorer_data()
    with pytest.raises(ValueError, match="ground-truth masks of X as y"):
        aupro_scorer(_BrightnessDetector().fit(X), X, None)
    with pytest.raises(TypeError, match="no anomaly_maps method"):
        aupro_scorer(BaseEstimator(), X, masks)
    with pytest.raises(ValueError, match="metric must be one of"):
        make_pixel_scorer("f1")
    with pytest.raises(TypeError, match="metric must be a string or a callable"):
        make_pixel_scorer(3)
    # Arguments the metric cannot take are refused when the scorer is made:
    # a search would otherwise turn the error into NaN scores for every candidate.
    with pytest.raises(TypeError, match="cannot take these arguments.*max_fpr"):
        make_pixel_scorer("pixel_auroc", max_fpr=0.05)
    with pytest.raises(TypeError, match="cannot take these arguments.*num_threshold"):
        make_pixel_scorer("aupro", num_threshold=10)
    with pytest.raises(TypeError, match="cannot take these arguments.*'k'"):
        make_pixel_scorer(lambda masks, maps: 0.0, k=2)
    for bad in ({"max_fpr": 3}, {"max_fpr": 0}, {"num_thresholds": 1}, {"num_thresholds": 2**24 + 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_pixel_scorer("aupro", **bad)
    scorer = pickle.loads(pickle.dumps(make_pixel_scorer("aupro", max_fpr=0.1)))
    assert repr(scorer) == "make_pixel_scorer('aupro', max_fpr=0.1)"
    assert scorer(_BrightnessDetector(), X, masks) == aupro(masks, X, max_fpr=0.1)


class _ScoresAreX(BaseEstimator):
    """An estimator whose score_samples are its input, as given."""

    def fit(self, X, y=None):
        return self

    def score_samples(self, X):
        return X


def test_image_scorers_negate_unsigned_and_boolean_scores_in_float():
    # -uint8 wrapped around (-1 became 255) and turned a perfect ranking into 0.
    y = np.array([1, 0, 0, 0])
    for scores in (np.array([0, 1, 2, 3], dtype=np.uint8), np.array([0, 1, 1, 1], dtype=bool)):
        expected = roc_auc_score(y, -scores.astype(float))
        assert image_auroc_scorer(_ScoresAreX(), scores, y) == expected == 1.0
    with pytest.raises(ValueError, match="score_samples contains NaN"):
        image_auroc_scorer(_ScoresAreX(), np.array([0.0, np.nan, 1.0, 2.0]), y)


def test_missing_labels_are_named_not_a_numpy_type_error():
    # np.unique of an object array holding None raised TypeError inside the message.
    with pytest.raises(ValueError, match=r"y_true must contain only 0.*None"):
        image_auroc([0, 1, None], [0.1, 0.2, 0.3])
    mask = np.array([[0, None], [1, 0]], dtype=object)
    with pytest.raises(ValueError, match=r"masks\[0\] must contain only 0 and 1.*None"):
        pixel_auroc([mask], [np.zeros((2, 2))])


def test_doctests():
    result = doctest.testmod(skpadim.metrics)
    assert result.attempted > 0
    assert result.failed == 0

"""Hyper-parameter search: both compositions, normal-only training folds, caching."""

import doctest
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV, cross_val_score
from sklearn.pipeline import Pipeline

import skpadim.model_selection
from skpadim import PatchGaussianDetector, TorchvisionExtractor
from skpadim.datasets import make_textures
from skpadim.metrics import aupro_scorer, image_auroc_scorer, pixel_auroc_scorer
from skpadim.model_selection import NormalOnlyKFold

LAYERS = [("_blocks.2", "_blocks.4"), ("_blocks.2", "_blocks.4", "_blocks.10")]


@pytest.fixture(scope="module")
def labelled_textures():
    """Real brick photographs, small: good images and defective ones with masks."""
    train = make_textures("brick", n_train=24, n_test=24, defect_ratio=0.5, image_size=64,
                          random_state=0)
    X = np.concatenate([train.X_train, train.X_test])
    y = np.concatenate([np.zeros(len(train.X_train), int), train.y_test])
    masks = np.concatenate([np.zeros((len(train.X_train), 64, 64), bool), train.masks_test])
    return X, y, masks


def test_normal_only_kfold_keeps_anomalies_out_of_training():
    y = np.array([0] * 10 + [1] * 5)
    cv = NormalOnlyKFold(n_splits=3, shuffle=True, random_state=0)
    seen_test = []
    for train, test in cv.split(np.zeros(15), y):
        assert (y[train] == 0).all()
        assert (y[test] == 1).any() and (y[test] == 0).any()
        assert not set(train) & set(test)
        seen_test.extend(test)
    assert sorted(seen_test) == list(range(15))  # every sample is tested once
    assert cv.get_n_splits() == 3
    masks = np.zeros((15, 4, 4), bool)
    masks[10:, 1, 1] = True
    assert [t.tolist() for t, _ in cv.split(np.zeros(15), masks)] == [
        t.tolist() for t, _ in cv.split(np.zeros(15), y)
    ]
    with pytest.raises(ValueError, match="at least that many normal samples"):
        list(NormalOnlyKFold(5).split(np.zeros(6), [0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="needs y"):
        list(NormalOnlyKFold(2).split(np.zeros(4), None))
    with pytest.raises(ValueError, match="n_splits"):
        NormalOnlyKFold(1)


@pytest.mark.parametrize("composition", ["pipeline", "nested"])
def test_grid_search_over_layers_features_and_shrinkage(labelled_textures, composition, tmp_path):
    X, y, _ = labelled_textures
    if composition == "pipeline":
        estimator = Pipeline([
            ("features", TorchvisionExtractor(image_size=64, memory=str(tmp_path))),
            ("detector", PatchGaussianDetector(random_state=0)),
        ])
        prefix, det_prefix = "features__", "detector__"
    else:
        estimator = PatchGaussianDetector(
            TorchvisionExtractor(image_size=64, memory=str(tmp_path)), random_state=0)
        prefix, det_prefix = "feature_extractor__", ""
    grid = {
        f"{prefix}layers": LAYERS,
        f"{det_prefix}n_features": [8, 32, 64],
        f"{det_prefix}shrinkage": ["ledoit-wolf", 0.01],
    }
    cv = NormalOnlyKFold(n_splits=3, shuffle=True, random_state=0)
    search = GridSearchCV(estimator, grid, scoring=image_auroc_scorer, cv=cv)
    search.fit(X, y)
    for train, _ in cv.split(X, y):
        assert (y[train] == 0).all()
    means = search.cv_results_["mean_test_score"]
    assert len(means) == 12
    assert search.best_score_ == pytest.approx(np.max(means))
    assert search.best_score_ > 0.8  # real defects on real texture are found
    assert np.ptp(means) > 0  # the candidates really differ
    best = pickle.loads(pickle.dumps(search.best_estimator_))
    np.testing.assert_array_equal(
        best.score_samples(X[:6]), search.best_estimator_.score_samples(X[:6])
    )


def test_sklearn_roc_auc_through_decision_function(labelled_textures):
    X, y, _ = labelled_textures
    det = PatchGaussianDetector(TorchvisionExtractor(image_size=64), n_features=32, random_state=0)
    cv = NormalOnlyKFold(n_splits=2)
    # "roc_auc" reads decision_function (higher = normal): normal must be the greater label.
    inlier = np.where(y == 0, 1, -1)
    splits = list(cv.split(X, y))
    ours = cross_val_score(det, X, y, cv=splits, scoring=image_auroc_scorer)
    theirs = cross_val_score(det, X, inlier, cv=splits, scoring="roc_auc")
    np.testing.assert_allclose(ours, theirs)
    ap = cross_val_score(det, X, inlier, cv=splits, scoring="average_precision")
    assert (ap > 0.5).all()


def test_pixel_scorers_in_search_with_masks_as_y(labelled_textures):
    X, _, masks = labelled_textures
    pipe = Pipeline([
        ("features", TorchvisionExtractor(image_size=64)),
        ("detector", PatchGaussianDetector(n_features=32, random_state=0)),
    ])
    search = RandomizedSearchCV(
        pipe, {"detector__shrinkage": ["ledoit-wolf", 0.01], "detector__sigma": [2.0, 4.0]},
        n_iter=2, random_state=0, cv=NormalOnlyKFold(2),
        scoring={"pixel_auroc": pixel_auroc_scorer, "aupro": aupro_scorer}, refit="pixel_auroc",
    )
    search.fit(X, masks)
    assert search.best_score_ > 0.8
    assert np.all(search.cv_results_["mean_test_aupro"] > 0.3)


def test_n_jobs_and_clone(labelled_textures):
    X, y, _ = labelled_textures
    det = PatchGaussianDetector(TorchvisionExtractor(image_size=64), n_features=16, random_state=0)
    cv = NormalOnlyKFold(n_splits=2)
    serial = cross_val_score(det, X, y, cv=cv, scoring=image_auroc_scorer)
    parallel = cross_val_score(clone(det), X, y, cv=cv, scoring=image_auroc_scorer, n_jobs=2)
    np.testing.assert_allclose(serial, parallel, rtol=1e-6)


def test_fit_with_labels_learns_from_normal_images_only(labelled_textures):
    X, y, masks = labelled_textures
    det = PatchGaussianDetector(TorchvisionExtractor(image_size=64), n_features=8, random_state=0)
    normal_only = clone(det).fit(X[y == 0])
    for labels in (y, masks, list(masks)):
        fitted = clone(det).fit(list(X), labels)
        assert fitted.gaussian_.n_samples_seen_ == int((y == 0).sum())
        np.testing.assert_array_equal(fitted.score_samples(X[:5]), normal_only.score_samples(X[:5]))
    with pytest.raises(ValueError, match="labels for"):
        clone(det).fit(X, y[:-1])
    with pytest.raises(ValueError, match="at least 2 training images"):
        clone(det).fit(X[y == 1], masks[y == 1])  # defective images only: nothing to learn
    inlier = np.where(y == 0, 1, -1)  # scikit-learn's outlier convention
    fitted = clone(det).fit(X, inlier)
    assert fitted.gaussian_.n_samples_seen_ == int((y == 0).sum())


def test_cache_reuses_embeddings_and_keys_on_parameters(labelled_textures, tmp_path, monkeypatch):
    X, _, _ = labelled_textures
    import skpadim.feature_extraction as fe

    calls = []
    original = TorchvisionExtractor.embed

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(fe.TorchvisionExtractor, "embed", counting)
    ext = TorchvisionExtractor(image_size=64, memory=str(tmp_path)).fit()
    first = ext.transform(X[:10])
    n_first = sum(calls)
    again = clone(ext).fit().transform(X[:10])
    assert sum(calls) == n_first  # served from the cache
    np.testing.assert_array_equal(first, again)
    ext.set_params(layers=LAYERS[0]).fit().transform(X[:10])
    assert sum(calls) == 2 * n_first  # other layers: computed anew
    TorchvisionExtractor(image_size=64, memory=str(tmp_path)).fit().transform(X[:10] // 2)
    assert sum(calls) == 3 * n_first  # other pixels: computed anew


def test_doctests():
    result = doctest.testmod(skpadim.model_selection)
    assert result.attempted > 0 and result.failed == 0

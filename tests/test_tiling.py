"""TiledDetector: windows at one pixel scale, checked against the plain detector and NumPy."""

import io
import math

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from skpadim import PatchEmbeddings, PatchGaussianDetector, TiledDetector
from skpadim.tiling import _Layout, _symmetric_indices, _window_starts

from conftest import textured_images


def _tiled(extractor, **params):
    inner = PatchGaussianDetector(extractor, n_features=None, random_state=0)
    return TiledDetector(inner, **{"short_side": 32, "window": (32, 32), **params})


def _mixed_sizes(n, seed=0):
    """Textured images 32 px high and 20 to 80 px wide (some narrower, some wider than a window)."""
    widths = [20, 32, 48, 80] * (n // 4)
    return [img[:32, :w] for img, w in zip(textured_images(n, size=80, seed=seed), widths)]


@pytest.mark.parametrize("length, window", [(5, 5), (6, 5), (10, 5), (11, 5), (33, 32), (100, 32)])
def test_windows_cover_the_side_evenly(length, window):
    starts = _window_starts(length, window)
    assert starts[0] == 0 and starts[-1] == length - window
    assert len(starts) == math.ceil(length / window)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()
    if len(starts) > 2:
        assert np.ptp(np.diff(starts)) <= 1


@pytest.mark.parametrize("n, before, after", [(5, 2, 3), (5, 0, 4), (3, 7, 8), (1, 2, 2), (4, 4, 0)])
def test_symmetric_padding_is_numpys(n, before, after):
    ours = _symmetric_indices(n, before, after).numpy()
    np.testing.assert_array_equal(ours, np.pad(np.arange(n), (before, after), mode="symmetric"))


@pytest.mark.parametrize("shape", [(20, 12), (32, 32), (40, 90), (70, 25)])
def test_cut_then_stitch_gives_back_the_image(shape):
    # At scale 1 the windows are crops of the padded image: stitching any one
    # channel of them must give back that channel of the image, pixel for pixel.
    image = torch.rand(3, *shape)
    layout = _Layout(shape, 1.0, (32, 32))
    windows = layout.cut(image)
    assert len(windows) == len(layout.boxes) and all(w.shape == (3, 32, 32) for w in windows)
    stitched = layout.stitch(torch.stack([w[1] for w in windows]))
    torch.testing.assert_close(stitched, image[1], rtol=0, atol=1e-6)


def test_layout_pads_small_images_by_mirroring():
    image = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(1, 2, 15)[:, :, :5].expand(3, 2, 5)
    window = _Layout((2, 5), 1.0, (4, 8)).cut(image)[0]
    expected = np.pad(image[0].numpy(), ((1, 1), (1, 2)), mode="symmetric")
    np.testing.assert_array_equal(window[0].numpy(), expected)


def test_layout_resizes_by_the_one_scale():
    layout = _Layout((100, 250), 0.5, (32, 32))
    assert layout.scaled == (50, 125) and layout.padded == (50, 125)
    assert len(layout.boxes) == 2 * 4


def test_equals_the_plain_detector_on_images_of_the_window_size(tiny_extractor, normal_images, test_images):
    # Images of the window's size at scale 1: one window each, nothing padded,
    # so scores, maps and threshold are those of the detector it wraps.
    tiled = _tiled(tiny_extractor).fit(normal_images)
    plain = PatchGaussianDetector(tiny_extractor, n_features=None, random_state=0).fit(normal_images)
    assert tiled.scale_ == 1.0 and tiled.window_ == (32, 32) and tiled.n_windows_ == len(normal_images)
    np.testing.assert_allclose(tiled.score_samples(test_images), plain.score_samples(test_images), rtol=1e-6)
    np.testing.assert_allclose(tiled.anomaly_maps(test_images), plain.anomaly_maps(test_images),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert tiled.offset_ == pytest.approx(plain.offset_, rel=1e-6)
    assert tiled.detector_.offset_ == pytest.approx(plain.offset_, rel=1e-6)
    np.testing.assert_array_equal(tiled.predict(test_images), plain.predict(test_images))


def test_mixed_sizes_in_one_call(tiny_extractor):
    X = _mixed_sizes(24)
    det = _tiled(tiny_extractor).fit(X)
    # Widths 20 and 32 give one window, 48 and 80 two and three.
    assert det.n_windows_ == 6 * (1 + 1 + 2 + 3)
    maps = det.anomaly_maps(X[:4])
    for ours, streamed in zip(maps, det.iter_anomaly_maps(iter(X[:4]))):
        np.testing.assert_array_equal(ours, streamed)
    assert isinstance(maps, list) and [m.shape for m in maps] == [x.shape[:2] for x in X[:4]]
    scores = det.score_samples(X[:4])
    assert scores.shape == (4,) and np.isfinite(scores).all()
    np.testing.assert_allclose(det.decision_function(X[:4]), scores - det.offset_)
    assert set(det.predict(X[:4]).tolist()) <= {-1, 1}
    # A generator of images is scored like the list.
    np.testing.assert_allclose(det.score_samples(x for x in X[:4]), scores)


def test_a_defect_in_a_wide_image_is_found_where_it_is(tiny_extractor):
    X = _mixed_sizes(24)
    det = _tiled(tiny_extractor).fit(X)
    wide = _mixed_sizes(8, seed=1)[3::4]  # two 80 px wide images
    defective = [w.copy() for w in wide]
    for img in defective:
        img[10:18, 55:63] = 255  # in the third window only
    assert (det.score_samples(defective) < det.score_samples(wide)).all()
    for amap in det.anomaly_maps(defective):
        row, col = np.unravel_index(np.argmax(amap), amap.shape)
        assert 6 <= row < 22 and 51 <= col < 67


def test_scale_is_set_by_the_median_shorter_side(tiny_extractor):
    X = _mixed_sizes(24)  # 32 px high, 20 to 80 wide: shorter sides 20, 32, 32, 32
    det = _tiled(tiny_extractor, short_side=16, window=(16, 16)).fit(X)
    assert det.scale_ == 0.5 and det.window_ == (16, 16)
    # window="auto": short_side rounded to a multiple of 32 sets the scale, so
    # the median image fills the window's shorter side exactly.
    det = _tiled(tiny_extractor, short_side=40, window="auto").fit(X)
    assert min(det.window_) == 32 and det.scale_ == 1.0


def test_two_wide_images_are_enough_windows(tiny_extractor):
    # The detector fits on windows: two wide images give eight of them.
    X = [np.asarray(textured_images(1, size=128, seed=s)[0][:32]) for s in (0, 1)]
    det = _tiled(tiny_extractor, short_side=32, window=(32, 32)).fit(X)
    assert det.n_windows_ == 8 and np.isfinite(det.offset_)


def test_fit_predict_leaves_labelled_defects_out(tiny_extractor, normal_images, test_images):
    X = np.concatenate([normal_images, test_images[4:]])
    y = np.r_[np.zeros(len(normal_images)), np.ones(4)]
    det = _tiled(tiny_extractor)
    labels = det.fit_predict(X, y)
    assert det.n_windows_ == len(normal_images)
    np.testing.assert_array_equal(labels, det.predict(X))


def test_labels_leave_defective_images_out(tiny_extractor, normal_images, test_images):
    X = np.concatenate([normal_images, test_images[4:]])
    y = np.r_[np.zeros(len(normal_images)), np.ones(4)]
    det = _tiled(tiny_extractor).fit(X, y)
    ref = _tiled(tiny_extractor).fit(normal_images)
    assert det.n_windows_ == len(normal_images)
    np.testing.assert_allclose(det.score_samples(test_images), ref.score_samples(test_images))


def test_params_clone_and_pickle(tiny_extractor, normal_images, test_images):
    det = _tiled(tiny_extractor)
    assert det.get_params()["detector__sigma"] == 4.0
    det.set_params(detector__sigma=2.0)
    assert det.detector.sigma == 2.0 and clone(det).get_params()["detector__sigma"] == 2.0
    det.fit(normal_images)
    assert det.detector_.sigma == 2.0
    buf = io.BytesIO()
    joblib.dump(det, buf)
    buf.seek(0)
    loaded = joblib.load(buf)
    np.testing.assert_array_equal(loaded.score_samples(test_images), det.score_samples(test_images))


def test_refit_frees_the_previous_models_copy_on_the_gpu(monkeypatch, tiny_extractor, normal_images):
    # As for the detector: run through the GPU's path on CPU tensors.
    import skpadim.covariance

    monkeypatch.setattr(skpadim.covariance, "_tuned_for_cpu", lambda device: False)
    det = _tiled(tiny_extractor).fit(normal_images)
    old = det.detector_.gaussian_
    assert old.__dict__.get("_resident") is not None
    held_during_fit = []
    fit_gaussians = PatchGaussianDetector._fit_gaussians

    def spy(self, *args, **kwargs):
        held_during_fit.append("_resident" in old.__dict__)
        return fit_gaussians(self, *args, **kwargs)

    monkeypatch.setattr(PatchGaussianDetector, "_fit_gaussians", spy)
    det.fit(normal_images)
    assert held_during_fit == [False]


def test_bad_input_is_refused_clearly(tiny_extractor, normal_images):
    with pytest.raises(InvalidParameterError, match="detector"):
        TiledDetector(detector="padim").fit(normal_images)
    with pytest.raises(InvalidParameterError, match="short_side"):
        TiledDetector(short_side=8).fit(normal_images)
    for window in [(32, 8), (40.5, 40), ("a", 32), (32, 32, 32)]:
        with pytest.raises(ValueError, match="window must be"):
            _tiled(tiny_extractor, window=window).fit(normal_images)
    with pytest.raises(InvalidParameterError, match="feature_extractor"):
        TiledDetector(PatchGaussianDetector("resnet18")).fit(normal_images)
    with pytest.raises(InvalidParameterError, match="trim"):
        _tiled(tiny_extractor).set_params(detector__trim=-0.1).fit(normal_images)
    with pytest.raises(ValueError, match="crop_size"):
        _tiled(clone(tiny_extractor).set_params(crop_size=48)).fit(normal_images)
    with pytest.raises(ValueError, match="trim"):
        _tiled(tiny_extractor).set_params(detector__trim=0.1).fit(normal_images)
    with pytest.raises(ValueError, match="at least 2 training images to estimate a distribution; got 1"):
        _tiled(tiny_extractor).fit(normal_images[:1])
    # Two images of the window's size are two windows: named as windows, not images.
    with pytest.raises(ValueError, match="at least 3 training windows.*the 2 training images give 2"):
        _tiled(tiny_extractor).fit(normal_images[:2])
    with pytest.raises(ValueError, match="the 2 training images give 2"):
        _tiled(tiny_extractor).fit(normal_images[:3], y=[0, 0, 1])
    with pytest.raises(TypeError, match="one-shot iterator"):
        _tiled(tiny_extractor).fit(iter(normal_images))
    with pytest.raises(TypeError, match="expected images .*, got NoneType"):
        _tiled(tiny_extractor).fit(None)
    embeddings = PatchEmbeddings(np.random.RandomState(0).rand(6, 4, 3, 3))
    with pytest.raises(TypeError, match="takes images, not PatchEmbeddings"):
        _tiled(tiny_extractor).fit(embeddings)
    with pytest.raises(NotFittedError):
        _tiled(tiny_extractor).score_samples(normal_images)
    with pytest.raises(NotFittedError):
        _tiled(tiny_extractor).iter_anomaly_maps(normal_images)  # before any next()
    det = _tiled(tiny_extractor).fit(normal_images)
    with pytest.raises(ValueError, match="got 0 images"):
        det.score_samples([])
    for method in (det.score_samples, det.iter_anomaly_maps, det.predict):
        with pytest.raises(TypeError, match="takes images, not PatchEmbeddings"):
            method(embeddings)
    with pytest.raises(ValueError, match=r"X\[1\]"):
        det.score_samples([normal_images[0], np.full((32, 32, 3), np.nan)])


def test_errors_name_the_image_not_the_window(tiny_extractor):
    X = _mixed_sizes(8)
    X[3] = np.full(X[3].shape, np.nan)  # after 4 windows of the first three images
    with pytest.raises(ValueError, match=r"X\[3\]"):
        _tiled(tiny_extractor).fit(X)
    det = _tiled(tiny_extractor).fit(_mixed_sizes(8, seed=2))
    with pytest.raises(ValueError, match=r"X\[3\]"):
        det.score_samples(X)


def test_many_windows_of_one_image_are_scored_in_batches(tiny_extractor):
    X = _mixed_sizes(8)
    det = _tiled(tiny_extractor).fit(X)
    big = textured_images(1, size=200, seed=3)[0]  # 7 x 7 windows
    det.detector_.batch_size = 100  # both images' windows in one batch
    reference = det.anomaly_maps([big, X[0]])
    det.detector_.batch_size = 4  # the big image's windows split over 13 batches
    for ours, ref in zip(det.anomaly_maps([big, X[0]]), reference):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


class _FailsOnRead(list):
    """A list of images whose ``n``-th full read raises, as a file gone missing would."""

    def __init__(self, images, n):
        super().__init__(images)
        self.reads, self.n = 0, n

    def __iter__(self):
        self.reads += 1
        if self.reads == self.n:
            raise OSError("image folder unmounted")
        return super().__iter__()


def test_a_failing_fit_keeps_the_previous_one(tiny_extractor, normal_images, test_images):
    det = _tiled(tiny_extractor).fit(normal_images)
    before = det.score_samples(test_images), det.offset_, det.detector_
    # Reads: the shapes, the statistics, then the thresholds, which fail here,
    # after the new Gaussians were fitted.
    failing = _FailsOnRead(textured_images(12, seed=5), n=3)
    with pytest.raises(OSError, match="unmounted"):
        det.fit(failing)
    assert failing.reads == 3
    np.testing.assert_array_equal(det.score_samples(test_images), before[0])
    assert det.offset_ == before[1] and det.detector_ is before[2]


def test_searched_over_scale_and_detector_params_with_masks(tiny_extractor):
    from sklearn.model_selection import GridSearchCV

    from skpadim.metrics import make_pixel_scorer
    from skpadim.model_selection import NormalOnlyKFold

    good = _mixed_sizes(16)
    bad = [img.copy() for img in _mixed_sizes(8, seed=3)]
    masks = [np.zeros(img.shape[:2], np.uint8) for img in good]
    for img in bad:
        img[12:20, 6:14] = 255
        mask = np.zeros(img.shape[:2], np.uint8)
        mask[12:20, 6:14] = 1
        masks.append(mask)
    X = good + bad
    grid = {"short_side": [24, 32], "detector__sigma": [1.0, 4.0]}
    search = GridSearchCV(_tiled(tiny_extractor, window="auto"), grid, cv=NormalOnlyKFold(n_splits=2),
                          scoring=make_pixel_scorer("pixel_auroc"))  # fmt: skip
    search.fit(X, masks)
    means = search.cv_results_["mean_test_score"]
    assert len(means) == 4 and np.ptp(means) > 0
    assert search.best_score_ > 0.9  # the bright squares stand out at every setting tried
    # The refit leaves the defective images out, as a fit on the good ones alone.
    ref = clone(search.best_estimator_).fit(good)
    assert search.best_estimator_.n_windows_ == ref.n_windows_
    np.testing.assert_allclose(search.best_estimator_.score_samples(bad), ref.score_samples(bad))

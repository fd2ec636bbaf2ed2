"""PatchGaussianDetector: against a plain reference of the paper, and scikit-learn's API."""

import doctest

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, textured_images
from scipy.ndimage import gaussian_filter
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError

import skpadim._images
import skpadim.detector
from skpadim import (PatchCovariance, PatchEmbeddings, PatchGaussianDetector, TiledDetector,
                     TorchvisionExtractor)
from skpadim.detector import _gaussian_blur, _upsample_and_blur


def _pool_plainly(emb, size):
    """Mean of each patch's size x size neighbours that lie inside the grid."""
    if size == 1:
        return emb
    r = size // 2
    out = np.empty_like(emb)
    h, w = emb.shape[2:]
    for i in range(h):
        for j in range(w):
            block = emb[:, :, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            out[:, :, i, j] = block.mean(axis=(2, 3))
    return out


def padim_reference(train, test, backbone, layers, n_features, seed, eps=0.01, sigma=4,
                    pooling=1, image_score="max"):
    """PaDiM written plainly: loops over positions, an explicit inverse, scipy's blur.

    ``pooling`` averages each embedding over its neighbourhood first; a float
    ``image_score`` takes the mean of that fraction of the highest map values.
    """
    mean = np.array([0.485, 0.456, 0.406])[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225])[None, :, None, None]

    def embed(images):
        x = torch.tensor((images.transpose(0, 3, 1, 2) / 255.0 - mean) / std, dtype=torch.float32)
        feats = {}
        hooks = [
            getattr(backbone, name).register_forward_hook(
                lambda m, i, o, name=name: feats.__setitem__(name, o)
            )
            for name in layers
        ]
        with torch.no_grad():
            backbone.eval()(x)
        for h in hooks:
            h.remove()
        first = feats[layers[0]]
        parts = [F.interpolate(feats[n], size=first.shape[2:], mode="nearest") for n in layers]
        return torch.cat(parts, 1).numpy().astype(np.float64)

    e_train, e_test = embed(train), embed(test)
    c = e_train.shape[1]
    idx = np.sort(np.random.RandomState(seed).choice(c, n_features, replace=False))
    e_train, e_test = _pool_plainly(e_train[:, idx], pooling), _pool_plainly(e_test[:, idx], pooling)
    n, _, h, w = e_train.shape
    dist = np.zeros((len(test), h, w))
    for i in range(h):
        for j in range(w):
            samples = e_train[:, :, i, j]
            cov = np.cov(samples, rowvar=False) + eps * np.eye(n_features)
            inv = np.linalg.inv(cov)
            for k in range(len(test)):
                d = e_test[k, :, i, j] - samples.mean(0)
                dist[k, i, j] = np.sqrt(d @ inv @ d)
    up = F.interpolate(
        torch.tensor(dist)[:, None], size=test.shape[1:3], mode="bilinear", align_corners=False
    )[:, 0].numpy()
    maps = np.stack([gaussian_filter(m, sigma=sigma) for m in up])
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)[:, ::-1]
    if image_score == "max":
        return maps, flat[:, 0]
    k = max(1, int(round(image_score * flat.shape[1])))
    return maps, flat[:, :k].mean(1)


@pytest.mark.parametrize(
    "pooling, image_score", [(1, "max"), (3, 0.05), (5, 1.0)], ids=["paper", "pool3-top5%", "pool5-mean"]
)
def test_scores_and_maps_equal_plain_padim_reference(normal_images, test_images, pooling, image_score):
    backbone = TinyNet(seed=3)
    det = PatchGaussianDetector(
        TorchvisionExtractor(backbone, layers=("block1", "block2"), weights=None, image_size=32),
        n_features=10, shrinkage=0.01, pooling=pooling, image_score=image_score,
        random_state=7, device="cpu",
    ).fit(normal_images)
    ref_maps, ref_scores = padim_reference(
        normal_images, test_images, backbone, ("block1", "block2"), 10, seed=7,
        pooling=pooling, image_score=image_score,
    )
    np.testing.assert_allclose(det.anomaly_maps(test_images), ref_maps, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(-det.score_samples(test_images), ref_scores, rtol=2e-4)
    # The reference is not degenerate: defective images score higher.
    assert ref_scores[4:].min() > ref_scores[:4].max()


def test_gaussian_blur_equals_scipy():
    maps = np.random.RandomState(0).rand(3, 37, 50).astype(np.float32)
    for sigma in (0.7, 4.0, 20.0):  # 20: kernel wider than the map, mirrored again
        ours = _gaussian_blur(torch.from_numpy(maps), sigma).numpy()
        ref = np.stack([gaussian_filter(m.astype(np.float64), sigma) for m in maps])
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_gaussian_blur(torch.from_numpy(maps), 0).numpy(), maps)


def _upsample_plainly(m, size):
    """Bilinear resize with half-pixel centres (align_corners=False), by np.interp."""
    def along(a, n_out, axis):
        n_in = a.shape[axis]
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5  # clamped at the ends by np.interp
        return np.apply_along_axis(lambda v: np.interp(x, np.arange(n_in), v), axis, a)
    return along(along(m, size[0], 0), size[1], 1)


@pytest.mark.parametrize("size, sigma", [((224, 224), 4.0), ((61, 90), 2.5), ((20, 27), 0)])
def test_upsample_and_blur_equals_interpolation_then_scipy(size, sigma):
    dist = np.random.RandomState(1).rand(3, 14, 9)
    ours = _upsample_and_blur(torch.from_numpy(dist.astype(np.float32)), size, sigma).numpy()
    ref = [_upsample_plainly(d, size) for d in dist]
    if sigma:
        ref = [gaussian_filter(r, sigma) for r in ref]
    np.testing.assert_allclose(ours, np.stack(ref), rtol=1e-5, atol=1e-6)


def test_sklearn_conventions(tiny_extractor, normal_images, test_images):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0)
    with pytest.raises(NotFittedError):
        det.score_samples(test_images)
    with pytest.raises(NotFittedError):
        det.anomaly_maps(test_images)

    params = det.get_params()
    assert params["feature_extractor__layers"] == ("block1", "block2")
    assert params["feature_extractor__image_size"] == 32
    det.set_params(feature_extractor__image_size=48, n_features=6)
    assert det.feature_extractor.image_size == 48 and det.n_features == 6
    det.set_params(feature_extractor__image_size=32, n_features=8)

    twin = clone(det)
    assert twin.get_params()["n_features"] == 8
    assert twin.feature_extractor is not det.feature_extractor

    det.fit(normal_images)
    assert det.feature_extractor_ is not det.feature_extractor  # the parameter is untouched
    assert not hasattr(det.feature_extractor, "model_")
    assert det.channel_indices_.shape == (8,)
    assert det.n_features_in_ == 20

    scores = det.score_samples(test_images)
    decision = det.decision_function(test_images)
    np.testing.assert_allclose(decision, scores - det.offset_)
    labels = det.predict(test_images)
    assert set(labels.tolist()) <= {-1, 1}
    np.testing.assert_array_equal(labels, np.where(decision >= 0, 1, -1))
    # The bright defect is anomalous: lower score, negative decision.
    assert scores[4:].max() < scores[:4].min()
    assert (labels[4:] == -1).all()

    # offset_ is the contamination quantile of the training scores.
    train_scores = det.score_samples(normal_images)
    assert np.mean(train_scores < det.offset_) <= det.contamination + 1 / len(normal_images)
    np.testing.assert_array_equal(det.fit_predict(normal_images), det.predict(normal_images))


def test_channel_subset_is_reproducible(tiny_extractor, normal_images):
    a = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=1).fit(normal_images)
    b = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=1).fit(normal_images)
    c = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=2).fit(normal_images)
    np.testing.assert_array_equal(a.channel_indices_, b.channel_indices_)
    assert not np.array_equal(a.channel_indices_, c.channel_indices_)
    np.testing.assert_array_equal(a.score_samples(normal_images), b.score_samples(normal_images))
    full = PatchGaussianDetector(tiny_extractor, n_features=None).fit(normal_images)
    np.testing.assert_array_equal(full.channel_indices_, np.arange(20))


def test_batch_size_does_not_change_results(tiny_extractor, normal_images, test_images):
    a = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, batch_size=5)
    b = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, batch_size=64)
    np.testing.assert_allclose(
        a.fit(normal_images).score_samples(test_images),
        b.fit(normal_images).score_samples(test_images),
        rtol=1e-5,
    )


def test_input_formats_give_the_same_scores(tiny_extractor, normal_images, test_images, tmp_path):
    from PIL import Image

    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    expected = det.score_samples(test_images)
    as_float = test_images.astype(np.float32) / 255
    as_tensor = torch.from_numpy(test_images).permute(0, 3, 1, 2).contiguous()
    paths = []
    for i, img in enumerate(test_images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    grey = test_images[..., 0]
    # np.array(paths) (string dtype) was refused as a malformed batch of pixels.
    for X in (as_float, as_tensor, paths, [str(p) for p in paths], list(test_images), grey,
              np.array([str(p) for p in paths]), np.array(paths, dtype=object)):  # fmt: skip
        np.testing.assert_allclose(det.score_samples(X), expected, rtol=1e-5)
    refit = clone(det).fit(np.array([str(p) for p in paths]))
    np.testing.assert_array_equal(refit.score_samples(paths), clone(det).fit(paths).score_samples(paths))
    # Generators stream at scoring time.
    np.testing.assert_allclose(det.score_samples(iter(paths)), expected, rtol=1e-5)


def test_maps_come_back_at_each_input_resolution(tiny_extractor, normal_images):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    big = textured_images(3, size=64, seed=4)
    maps = det.anomaly_maps(big)
    assert maps.shape == (3, 64, 64)
    mixed = [big[0], textured_images(1, size=48, seed=5)[0]]
    maps = det.anomaly_maps(mixed)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(64, 64), (48, 48)]
    # The score does not depend on the input resolution of the same content.
    np.testing.assert_allclose(det.score_samples(big[:1]), det.score_samples(mixed[:1]))


def test_crop_maps_cover_the_whole_image(normal_images):
    ext = TorchvisionExtractor(TinyNet(), layers=("block1", "block2"), weights=None,
                               image_size=40, crop_size=32)
    det = PatchGaussianDetector(ext, n_features=8, random_state=0).fit(normal_images)
    maps = det.anomaly_maps(normal_images[:2])
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()


def test_pipeline_composition_on_embeddings(tiny_extractor, normal_images, test_images):
    from sklearn.pipeline import make_pipeline

    nested = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    pipe = make_pipeline(clone(tiny_extractor), PatchGaussianDetector(n_features=8, random_state=0))
    pipe.fit(normal_images)
    np.testing.assert_allclose(pipe.score_samples(test_images), nested.score_samples(test_images), rtol=1e-5)
    np.testing.assert_array_equal(pipe.predict(test_images), nested.predict(test_images))
    emb = pipe[:-1].transform(test_images)
    assert isinstance(emb, PatchEmbeddings)
    np.testing.assert_allclose(pipe[-1].anomaly_maps(emb), nested.anomaly_maps(test_images), rtol=1e-5)
    with pytest.raises(ValueError, match="fitted on patch embeddings"):
        pipe[-1].score_samples(test_images[..., 0].astype(np.float32) / 255)


def test_joblib_round_trip_is_bit_identical(tiny_extractor, normal_images, test_images, tmp_path):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    joblib.dump(det, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    np.testing.assert_array_equal(loaded.score_samples(test_images), det.score_samples(test_images))
    np.testing.assert_array_equal(loaded.anomaly_maps(test_images), det.anomaly_maps(test_images))
    assert loaded.offset_ == det.offset_


def test_shape_and_input_errors(tiny_extractor, normal_images):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0)
    for n in (1, 2):  # two cannot give a leave-one-out threshold
        with pytest.raises(ValueError, match=f"at least 3 training images: .*; got {n}"):
            det.fit(normal_images[:n])
    with pytest.raises(TypeError, match="one-shot iterator"):
        det.fit(iter(list(normal_images)))
    for not_images in (None, 5):  # were blamed as one-shot iterators
        with pytest.raises(TypeError, match=f"expected images .*, got {type(not_images).__name__}"):
            det.fit(not_images)
    with pytest.raises(ValueError, match="n_features=30 is larger than the 20 channels"):
        PatchGaussianDetector(tiny_extractor, n_features=30).fit(normal_images)
    with pytest.raises(ValueError, match="n_features"):
        PatchGaussianDetector(tiny_extractor, n_features=0).fit(normal_images)
    det.fit(normal_images)
    with pytest.raises(ValueError, match=r"X\[1\] has shape \(32, 96\)"):
        det.score_samples([normal_images[0], textured_images(1, size=96, seed=0)[0][:32]])
    with pytest.raises(ValueError, match="NaN"):
        bad = normal_images[:2].astype(np.float32) / 255
        bad[1, 0, 0, 0] = np.nan
        det.score_samples(bad)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        det.score_samples(normal_images[:2].astype(np.float32))
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        det.score_samples(np.zeros((2, 32, 32, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="0 images"):
        det.score_samples(np.zeros((0, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        det.score_samples(["/nonexistent/image.png"])
    with pytest.raises(ValueError, match="embeddings have 5 channels"):
        det.score_samples(PatchEmbeddings(np.zeros((2, 5, 16, 16), dtype=np.float32)))


@pytest.mark.parametrize("form", ["list", "array", "tensor"])
def test_fit_on_some_images_names_a_bad_one_by_its_index_in_X(tiny_extractor, normal_images, form):
    # Labels and trimming fit on subsets of X: errors counted positions in the
    # subset (X[2] or X[4] for X[5]).
    X = normal_images[:8].astype(np.float32) / 255
    X[5, 0, 0, 0] = np.nan
    X = {"list": list(X), "array": X, "tensor": torch.from_numpy(X).permute(0, 3, 1, 2)}[form]
    y = [0, 1, 0, 0, 0, 0, 0, 0]
    for params, labels in ((dict(), y), (dict(trim=0.25), None), (dict(trim=0.25), y)):
        det = PatchGaussianDetector(tiny_extractor, n_features=4, batch_size=2, **params)
        with pytest.raises(ValueError, match=r"^X\[5\]: image contains NaN"):
            det.fit(X, labels)
    tiled = TiledDetector(PatchGaussianDetector(tiny_extractor, n_features=4), short_side=32, window=(32, 32))
    with pytest.raises(ValueError, match=r"^X\[5\]: image contains NaN"):
        tiled.fit(X, y)


def test_failed_refit_keeps_the_fitted_state(tiny_extractor, normal_images, test_images, tmp_path):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    before = det.score_samples(test_images)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = []
    from PIL import Image

    for i, img in enumerate(normal_images[:5]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    with pytest.raises(ValueError, match="broken.png"):
        det.fit(paths[:3] + [tmp_path / "broken.png"] + paths[3:])
    np.testing.assert_array_equal(det.score_samples(test_images), before)


def test_doctests():
    result = doctest.testmod(skpadim.detector)
    assert result.attempted > 0 and result.failed == 0


def test_compact_models_are_smaller_and_round_trip_exactly(tiny_extractor, normal_images, test_images):
    import pickle

    full = PatchGaussianDetector(tiny_extractor, n_features=16, random_state=0).fit(normal_images)
    compact = clone(full).set_params(compact=True).fit(normal_images)
    size_full = len(pickle.dumps(full.gaussian_))
    size_compact = len(pickle.dumps(compact.gaussian_))
    assert size_compact < 0.35 * size_full  # float16 lower triangle: ~(C+1)/(4C) of float32
    loaded = pickle.loads(pickle.dumps(compact))
    np.testing.assert_array_equal(loaded.score_samples(test_images), compact.score_samples(test_images))
    np.testing.assert_allclose(compact.score_samples(test_images), full.score_samples(test_images), rtol=2e-3)


def test_auto_image_size_keeps_the_training_proportions(normal_images):
    from skpadim.feature_extraction import auto_image_size

    wide = textured_images(6, size=96, seed=2)[:, :32]  # 32 x 96 images, height/width 1/3
    assert auto_image_size(wide) == (224, 672)  # 224 across, the proportions kept
    assert auto_image_size(np.swapaxes(wide, 1, 2)) == (672, 224)
    assert auto_image_size(wide[:, :, :80]) == (224, 576)  # 32 x 80: 224 x 560 -> multiple of 32
    assert auto_image_size(wide[:, :4]) == (224, 896)  # 1:24, capped at 896
    ext = TorchvisionExtractor(TinyNet(), layers=("block1", "block2"), weights=None,
                               image_size="auto").fit(wide)
    assert ext.resize_shape_ == (224, 672)
    emb = ext.transform(wide)
    assert emb.shape[2:] == (112, 336) and emb.input_shape == (224, 672)  # stride 2
    det = PatchGaussianDetector(ext, n_features=8, random_state=0).fit(wide)
    assert det.input_shape_ == (224, 672)
    assert det.anomaly_maps(wide[:2]).shape == (2, 32, 96)  # back at the input resolution
    assert TorchvisionExtractor(TinyNet(), layers=("block1",), weights=None).fit().resize_shape_ == (224, 224)


def test_large_frames_go_in_fewer_images_per_batch(monkeypatch, tiny_extractor, normal_images,
                                                   test_images):
    sizes = []
    batches = PatchGaussianDetector._embedding_batches

    def recording(self, X, extractor, channels=None):
        for emb in batches(self, X, extractor, channels):
            sizes.append(len(emb))
            yield emb

    monkeypatch.setattr(PatchGaussianDetector, "_embedding_batches", recording)
    # The figure the docs quote: an elongated part's 224 x 576 frame, 12 images a batch.
    assert skpadim._images.images_per_batch(32, (224, 576)) == 12
    assert skpadim._images.images_per_batch(32, None) == 32
    params = dict(n_features=4, batch_size=8, random_state=0)
    reference = PatchGaussianDetector(tiny_extractor, **params).fit(normal_images)
    assert set(sizes) == {8}  # 32 x 32 frames: within the 224 x 224 budget
    # A budget of 16 x 16 pixels: the 32 x 32 frames count four times, 2 per batch.
    monkeypatch.setattr(skpadim._images, "_BATCH_FRAME_PIXELS", 16 * 16)
    sizes.clear()
    det = PatchGaussianDetector(tiny_extractor, **params).fit(normal_images)
    assert set(sizes) == {2} and sum(sizes) == 2 * len(normal_images)  # statistics, threshold
    np.testing.assert_allclose(det.score_samples(test_images), reference.score_samples(test_images),
                               rtol=1e-4)
    assert det.offset_ == pytest.approx(reference.offset_, rel=1e-4)
    # Embeddings are batched by the frame they record, as the images were.
    sizes.clear()
    PatchGaussianDetector(**params).fit(clone(tiny_extractor).fit_transform(normal_images))
    assert set(sizes) == {2}
    # At least one image per batch, however large the frame.
    monkeypatch.setattr(skpadim._images, "_BATCH_FRAME_PIXELS", 1)
    sizes.clear()
    det.score_samples(test_images)
    assert set(sizes) == {1}


def test_extractor_alone_sends_large_frames_in_fewer_images(monkeypatch, tiny_extractor,
                                                            normal_images):
    ext = clone(tiny_extractor).set_params(batch_size=8).fit()
    sizes = []
    embed = type(ext)._embed

    def recording(self, images, channels=None):
        sizes.append(len(images))
        return embed(self, images, channels)

    monkeypatch.setattr(type(ext), "_embed", recording)
    reference = ext.transform(normal_images)
    assert set(sizes) == {8}
    # A budget of 16 x 16 pixels: the 32 x 32 frames count four times, 2 per pass.
    monkeypatch.setattr(skpadim._images, "_BATCH_FRAME_PIXELS", 16 * 16)
    sizes.clear()
    np.testing.assert_allclose(ext.transform(normal_images), reference, rtol=1e-5, atol=1e-6)
    assert set(sizes) == {2} and sum(sizes) == len(normal_images)


def test_very_elongated_images_of_mixed_sizes(tmp_path):
    from PIL import Image

    from skpadim.datasets import make_textures

    rng = np.random.RandomState(0)
    base = make_textures("gravel", n_train=1, n_test=1, image_size=512, random_state=0).X_train[0]
    paths = []
    for i in range(10):  # about 1:2.5, in three sizes, as on an inspection line
        h = [100, 125, 150][i % 3]
        y = rng.randint(0, 512 - h)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(base[y : y + h, : int(h * 2.52)]).save(paths[-1])
    det = PatchGaussianDetector(
        TorchvisionExtractor(TinyNet(), layers=("block1", "block2"), weights=None),
        n_features=8, random_state=0).fit(paths)
    h, w = det.input_shape_
    assert 2.2 < w / h < 3.0
    maps = det.anomaly_maps(paths[:3])
    assert [m.shape for m in maps] == [(100, 252), (125, 315), (150, 378)]
    with pytest.raises(ValueError, match="outside the range"):
        det.score_samples([np.zeros((100, 100, 3), np.uint8)])
    # The same guard when the detector is a Pipeline's last step, on embeddings.
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(clone(det.feature_extractor), PatchGaussianDetector(n_features=8, random_state=0))
    pipe.fit(paths)
    assert [m.shape for m in pipe[-1].anomaly_maps(pipe[0].transform(paths[:3]))] == [m.shape for m in maps]
    with pytest.raises(ValueError, match="outside the range"):
        pipe.score_samples([np.zeros((100, 100, 3), np.uint8)])


def test_feature_extraction_doctests():
    import skpadim.feature_extraction

    result = doctest.testmod(skpadim.feature_extraction)
    assert result.attempted > 0 and result.failed == 0


def _tiny_detector(**params):
    return PatchGaussianDetector(
        TorchvisionExtractor(TinyNet(seed=3), layers=("block1", "block2"), weights=None, image_size=32),
        n_features=10, shrinkage=0.01, random_state=7, device="cpu", **params,
    )


def test_trim_leaves_out_defective_training_images_and_equals_a_fit_without_them(
    normal_images, test_images
):
    # Two defective images hidden in the training set (indices 3 and 17).
    train = normal_images.copy()
    train[[3, 17]] = test_images[[4, 5]]
    trimmed = _tiny_detector(trim=0.1, trim_by="image").fit(train)  # floor(0.1 * 24) = 2 left out
    np.testing.assert_array_equal(trimmed.trimmed_indices_, [3, 17])
    # The refit is exactly a fit on the kept images, with the same channels.
    clean = _tiny_detector().fit(np.delete(train, [3, 17], axis=0))
    np.testing.assert_array_equal(trimmed.channel_indices_, clean.channel_indices_)
    np.testing.assert_allclose(
        trimmed.score_samples(test_images), clean.score_samples(test_images), rtol=1e-5
    )
    # ... and it separates the defects better than the contaminated fit.
    naive = _tiny_detector().fit(train)
    gap = lambda s: s[:4].min() - s[4:].max()  # noqa: E731 (normal minus defective scores)
    assert gap(trimmed.score_samples(test_images)) > gap(naive.score_samples(test_images))
    assert naive.trimmed_indices_.size == 0


def test_trim_ranks_images_by_out_of_fold_scores(normal_images, test_images):
    train = normal_images.copy()
    train[[2, 9, 15]] = test_images[[4, 5, 6]]
    trimmed = _tiny_detector(trim=0.05, trim_by="image").fit(train)  # floor(0.05 * 24) = 1 left out
    # Reference: each half scored by a detector fitted on the other half.
    even, odd = np.arange(0, 24, 2), np.arange(1, 24, 2)
    scores = np.empty(24)
    scores[even] = _tiny_detector().fit(train[odd]).score_samples(train[even])
    scores[odd] = _tiny_detector().fit(train[even]).score_samples(train[odd])
    np.testing.assert_array_equal(trimmed.trimmed_indices_, [np.argmin(scores)])
    assert np.argmin(scores) in (2, 9, 15)


def test_patch_trim_leaves_out_the_farthest_patches_per_position(normal_images, test_images):
    # Reference built from the public pieces: out-of-fold patch distances from
    # detectors fitted on each half, the worst patch per position dropped, and a
    # PatchCovariance fitted with that mask on the same pooled channels.
    from skpadim.detector import _pool_embeddings

    train = normal_images.copy()
    train[[3, 17]] = test_images[[4, 5]]
    trimmed = _tiny_detector(trim=0.05, trim_by="patch").fit(train)  # 1 patch per position
    assert trimmed.trimmed_indices_.size == 0
    extractor = trimmed.feature_extractor_
    channels = trimmed.channel_indices_

    def pooled(images):
        emb = extractor.transform(images)[:, channels]
        return _pool_embeddings(torch.from_numpy(np.ascontiguousarray(emb)), 3)

    even, odd = np.arange(0, 24, 2), np.arange(1, 24, 2)
    distances = np.empty((24, *trimmed.gaussian_.grid_shape_))
    for half, other in ((even, odd), (odd, even)):
        gaussian = _tiny_detector().fit(train[other]).gaussian_
        distances[half] = gaussian.mahalanobis(pooled(train[half]))
    keep = distances < distances.max(axis=0, keepdims=True)
    reference = PatchCovariance(shrinkage=0.01, store_covariance=False).fit(
        pooled(train), patch_mask=keep)
    np.testing.assert_allclose(trimmed.gaussian_.cholesky_, reference.cholesky_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(trimmed.gaussian_.location_, reference.location_, rtol=1e-5, atol=1e-6)
    # Most positions drop a patch of one of the two defective images ...
    assert np.isin(np.argmax(distances, axis=0), [3, 17]).mean() > 0.5
    # ... and the trimmed fit separates the defects better than the contaminated one.
    naive = _tiny_detector().fit(train)
    gap = lambda s: s[:4].min() - s[4:].max()  # noqa: E731 (normal minus defective scores)
    assert gap(trimmed.score_samples(test_images)) > gap(naive.score_samples(test_images))


@pytest.mark.parametrize("pooling", [1, 3])
@pytest.mark.parametrize("trim, trim_by", [(0.0, "image"), (0.25, "image"), (0.25, "patch")])
def test_embeddings_whose_channels_are_all_kept_are_read_in_place_and_left_alone(
        tiny_extractor, normal_images, test_images, pooling, trim, trim_by):
    # n_features=None keeps every channel in order: the embeddings are no longer
    # copied batch by batch, so nothing downstream may write to them.
    ext = clone(tiny_extractor).fit(normal_images)
    train, test = ext.transform(normal_images), ext.transform(test_images)
    before = train.copy(), test.copy()
    assert np.shares_memory(skpadim.detector._ChannelTaker(np.arange(train.shape[1]))(train), train)
    params = dict(n_features=None, pooling=pooling, trim=trim, trim_by=trim_by, batch_size=3)
    det = PatchGaussianDetector(**params).fit(train)
    got = det.score_samples(test), det.anomaly_maps(test), det.score_samples(train)
    np.testing.assert_array_equal(train, before[0])
    np.testing.assert_array_equal(test, before[1])
    # The same as through the copying path.
    plain_init = skpadim.detector._ChannelTaker.__init__

    def copying(self, channels):
        plain_init(self, channels)
        self._all = False

    with pytest.MonkeyPatch.context() as m:
        m.setattr(skpadim.detector._ChannelTaker, "__init__", copying)
        ref = PatchGaussianDetector(**params).fit(train)
        expected = ref.score_samples(test), ref.anomaly_maps(test), ref.score_samples(train)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert det.offset_ == ref.offset_


@pytest.mark.parametrize("size", [3, 5, 7])
@pytest.mark.parametrize("grid", [(6, 9), (2, 7), (1, 1), (4, 3)], ids=str)
def test_pooling_averages_the_neighbours_that_exist(size, grid):
    from skpadim.detector import _pool_embeddings

    emb = np.random.RandomState(size).randn(3, 4, *grid)
    before = emb.copy()
    pooled = _pool_embeddings(torch.from_numpy(emb), size)
    np.testing.assert_allclose(pooled.numpy(), _pool_plainly(emb, size), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(emb, before)  # the input is left alone
    # float32, and a strided view (a channel subset) as input.
    view = torch.from_numpy(emb.astype(np.float32))[:, ::2]
    np.testing.assert_allclose(_pool_embeddings(view, size).numpy(),
                               _pool_plainly(emb[:, ::2], size), rtol=1e-5, atol=1e-6)
    # Integers are averaged as real numbers, not truncated.
    ints = np.random.RandomState(0).randint(0, 9, size=(2, 3, *grid))
    np.testing.assert_allclose(_pool_embeddings(torch.from_numpy(ints), size).numpy(),
                               _pool_plainly(ints.astype(float), size), rtol=1e-6)
    # Channels in several blocks (the last one ragged), with the row sums reused.
    with pytest.MonkeyPatch.context() as m:
        m.setattr(skpadim.detector, "_POOL_BLOCK_BYTES", 9 * 8 * grid[0] * grid[1])  # 3 channels
        np.testing.assert_allclose(_pool_embeddings(torch.from_numpy(emb), size).numpy(),
                                   _pool_plainly(emb, size), rtol=1e-12, atol=1e-12)
    # float16 values whose sum exceeds float16's range (65504) are averaged whole.
    large = np.full((1, 2, *grid), 30000.0)
    np.testing.assert_allclose(_pool_embeddings(torch.from_numpy(large.astype(np.float16)), size),
                               large, rtol=1e-6)


def test_even_pooling_is_refused(normal_images):
    with pytest.raises(ValueError, match="pooling must be odd"):
        _tiny_detector(pooling=2).fit(normal_images)


@pytest.mark.parametrize("image_score", [0.0, 1.5, "mean"])
def test_bad_image_score_is_refused(normal_images, image_score):
    with pytest.raises(ValueError, match="image_score"):
        _tiny_detector(image_score=image_score).fit(normal_images)


def test_auto_n_features_keeps_all_channels_up_to_200():
    rng = np.random.RandomState(0)
    narrow = PatchEmbeddings(rng.rand(8, 12, 2, 2).astype(np.float32))
    det = PatchGaussianDetector(pooling=1).fit(narrow)
    np.testing.assert_array_equal(det.channel_indices_, np.arange(12))
    wide = PatchEmbeddings(rng.rand(8, 230, 2, 2).astype(np.float32))
    det = PatchGaussianDetector(pooling=1, random_state=0).fit(wide)
    assert len(det.channel_indices_) == 200 and len(set(det.channel_indices_)) == 200
    np.testing.assert_array_equal(
        det.channel_indices_, PatchGaussianDetector(n_features=200, random_state=0).fit(wide).channel_indices_
    )


@pytest.mark.parametrize("shapes", [[(8, 8), (4, 4), (2, 2)], [(8, 6), (4, 3), (3, 2)]])
def test_feature_maps_concatenate_like_interpolate_and_cat(shapes):
    from skpadim.feature_extraction import _concat_on_first_grid

    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, h, w, generator=gen) for c, (h, w) in zip((3, 5, 7), shapes)]
    grid = shapes[0]
    ref = torch.cat([F.interpolate(f, size=grid, mode="nearest") for f in feats], dim=1)
    np.testing.assert_array_equal(_concat_on_first_grid(feats).numpy(), ref.numpy())


def test_plain_embedding_arrays_are_scored_on_the_training_frame(tiny_extractor, normal_images, test_images):
    # np.concatenate of PatchEmbeddings gives a plain array: its maps and scores
    # must be those of the same embeddings with their geometry.
    ext = clone(tiny_extractor).fit(normal_images)
    det = PatchGaussianDetector(n_features=8, random_state=0).fit(ext.transform(normal_images))
    emb = ext.transform(test_images)
    plain = np.concatenate([emb[:4], emb[4:]])
    assert type(plain) is np.ndarray
    np.testing.assert_array_equal(det.score_samples(plain), det.score_samples(emb))
    np.testing.assert_array_equal(det.anomaly_maps(plain), det.anomaly_maps(emb))
    assert det.anomaly_maps(plain).shape[1:] == det.input_shape_


class _NativeGrid(TorchvisionExtractor):
    """An extractor that does not resize: its grid follows each image's size."""

    def transform(self, X):
        return np.stack([F.avg_pool2d(img[None], 4)[0].numpy() for img in X])


@pytest.mark.parametrize("order", [1, -1])
def test_an_extractor_whose_grid_changes_between_batches_is_named(order):
    # The first batch's positions took the other grid's patches (or a raw torch
    # error): the fit now names the extractor's two grids.
    rng = np.random.RandomState(0)
    X = ([rng.rand(32, 32, 3) for _ in range(4)] + [rng.rand(40, 40, 3) for _ in range(2)])[::order]
    det = PatchGaussianDetector(_NativeGrid(TinyNet(), layers=("block1",), weights=None),
                                n_features=None, batch_size=2)
    with pytest.raises(ValueError, match=r"returned a grid of \((10, 10|8, 8)\) positions for one batch"):
        det.fit(X)
    assert not hasattr(det, "gaussian_")


class _ExtraChannelForBright(TorchvisionExtractor):
    """An extractor that adds a channel for bright images (mean above 0.5)."""

    def transform(self, X):
        emb = super().transform(X)
        bright = np.array([float(img.mean()) > 0.5 for img in X])
        if bright.all():
            return np.concatenate([emb, emb[:, :1]], axis=1)
        assert not bright.any(), "this test's batches are all bright or all dark"
        return np.asarray(emb)


def test_an_extractor_whose_grid_differs_between_the_trimming_halves_is_named(monkeypatch):
    # With trim, each half of the images (every other one) is fitted apart: an
    # extractor giving the two halves different grids passed the batch check
    # and failed later with a shape error of PatchCovariance; then only once the
    # second half was fitted. It is named at the second half's first batch.
    rng = np.random.RandomState(0)
    X = [rng.rand(32 + 8 * (i % 2), 32 + 8 * (i % 2), 3) for i in range(8)]
    calls, transform = [], _NativeGrid.transform
    monkeypatch.setattr(_NativeGrid, "transform", lambda self, X: calls.append(len(X)) or transform(self, X))
    det = PatchGaussianDetector(_NativeGrid(TinyNet(), layers=("block1",), weights=None),
                                n_features=None, batch_size=2, trim=0.25)
    message = r"grid of \(10, 10\) positions for one part of the images and \(8, 8\)"
    with pytest.raises(ValueError, match=message):
        det.fit(X)
    assert not hasattr(det, "gaussian_")
    # Two batches of the first half (4 images), then the second half's first.
    assert calls == [2, 2, 2]


def test_an_extractor_whose_channels_differ_between_the_trimming_halves_is_named():
    # The second half took the first half's channel indices from embeddings of
    # another width without a word: now named at its first batch.
    rng = np.random.RandomState(0)
    X = [0.4 * rng.rand(32, 32, 3) + 0.6 * (i % 2) for i in range(8)]
    det = PatchGaussianDetector(_ExtraChannelForBright(TinyNet(), layers=("block1",), weights=None),
                                n_features=None, batch_size=2, trim=0.25)
    with pytest.raises(ValueError, match=r"returned \d+ channels for one part of the images"):
        det.fit(X)
    assert not hasattr(det, "gaussian_")
    # Without trim (dark images first), at the first bright batch, as before.
    with pytest.raises(ValueError, match=r"returned \d+ channels for one batch"):
        det.set_params(trim=0.0).fit(X[::2] + X[1::2])


class _PlainOutput(TorchvisionExtractor):
    """The extractor interface allows transform to return a plain array."""

    def transform(self, X):
        return np.asarray(super().transform(X))


def test_extractor_returning_plain_arrays(normal_images, test_images):
    kwargs = dict(layers=("block1", "block2"), weights=None, image_size=32, device="cpu")
    plain = PatchGaussianDetector(_PlainOutput(TinyNet(), **kwargs), n_features=8,
                                  random_state=0).fit(normal_images)  # fmt: skip
    maps = plain.anomaly_maps(test_images)
    assert maps.shape == test_images.shape[:3]
    # The same Gaussians as with PatchEmbeddings (the frame differs: the grid).
    rich = PatchGaussianDetector(TorchvisionExtractor(TinyNet(), **kwargs), n_features=8,
                                 random_state=0).fit(normal_images)  # fmt: skip
    np.testing.assert_array_equal(plain.gaussian_.location_, rich.gaussian_.location_)
    assert plain.input_shape_ == plain.gaussian_.grid_shape_


def test_take_compress_and_repeat_keep_each_images_shape():
    emb = PatchEmbeddings(np.arange(24.0).reshape(3, 2, 2, 2), image_shapes=[(10, 20), (30, 40), (50, 60)],
                          resize_shape=(8, 8))  # fmt: skip
    cases = [(emb.take([2, 0], axis=0), [2, 0]), (np.take(emb, [2, 0], axis=0), [2, 0]),
             (np.compress([False, True, True], emb, axis=0), [1, 2]),
             (np.repeat(emb, [1, 0, 2], axis=0), [0, 2, 2])]  # fmt: skip
    for out, rows in cases:
        assert isinstance(out, PatchEmbeddings) and out.resize_shape == (8, 8)
        np.testing.assert_array_equal(out, np.asarray(emb)[rows])
        np.testing.assert_array_equal(out.image_shapes, emb.image_shapes[rows])
    assert type(emb.take([1], axis=1)) is np.ndarray  # not one grid per image any more


def test_results_with_other_images_than_their_shapes_are_plain_arrays():
    # A reduction over the images kept the input's image shapes: one embedding
    # named two images, and maps would have been drawn at the wrong sizes.
    emb = PatchEmbeddings(np.arange(24.0).reshape(3, 2, 2, 2), image_shapes=[(10, 20), (30, 40), (50, 60)],
                          resize_shape=(8, 8))  # fmt: skip
    for out in (emb.sum(axis=0, keepdims=True), np.mean(emb, axis=0, keepdims=True),
                emb + np.zeros((2, 3, 2, 2, 2)), emb.max(axis=(2, 3))):
        assert type(out) is np.ndarray, out.shape
    for out in (emb * 2, np.sqrt(emb), emb.mean(axis=1, keepdims=True), emb - emb[:1]):
        assert isinstance(out, PatchEmbeddings)
        np.testing.assert_array_equal(out.image_shapes, emb.image_shapes)
    assert type(emb.sum()) is np.float64 and type(np.max(emb)) is np.float64  # as for ndarray


def test_reordered_axes_and_new_axes_give_plain_arrays():
    # A transpose kept the image shapes on an array whose first axis is the
    # channels (3 rows, 2 shapes); emb[None, 0] gave shapes of shape (1, 2, 2).
    emb = PatchEmbeddings(np.arange(96.0).reshape(2, 3, 4, 4), image_shapes=[(10, 20), (30, 40)],
                          resize_shape=(16, 16))  # fmt: skip
    square = PatchEmbeddings(np.zeros((3, 3, 2, 2)), image_shapes=[(1, 2), (3, 4), (5, 6)])
    for out in (emb.transpose(1, 0, 2, 3), emb.T, np.transpose(emb), emb.swapaxes(0, 1),
                np.moveaxis(emb, 1, 0), emb.mT, square.transpose(1, 0, 2, 3),
                emb.reshape(2, 3, 16, 1), emb.ravel(), emb[:1].squeeze(), emb[None, 0],
                emb[np.array([[0], [1]]), [0, 1, 2]]):  # fmt: skip
        assert type(out) is np.ndarray, out.shape
    # Operations that leave the images on the first axis keep their shapes.
    cases = [(emb.transpose(0, 1, 2, 3), [0, 1]), (emb.reshape(2, 3, 4, 4), [0, 1]),
             (emb[..., :2], [0, 1]), (emb[..., 1:, :, :, :], [1]), (emb[1:, [0, 2]], [1]),
             (emb[::-1, :, 1:], [1, 0])]  # fmt: skip
    for out, rows in cases:
        assert isinstance(out, PatchEmbeddings) and out.resize_shape == (16, 16)
        np.testing.assert_array_equal(out.image_shapes, emb.image_shapes[rows])
    np.testing.assert_array_equal(emb[1:, [0, 2]], np.asarray(emb)[1:, [0, 2]])


def test_rolling_or_sorting_along_the_images_gives_plain_arrays():
    # np.roll and np.sort along axis 0 reorder the rows without indexing them:
    # the result kept the image shapes in their old order.
    emb = PatchEmbeddings(np.arange(24.0)[::-1].reshape(3, 2, 2, 2),
                          image_shapes=[(10, 20), (30, 40), (50, 60)])
    for out in (np.roll(emb, 1, axis=0), np.roll(emb, 1), np.roll(emb, (1, 1), axis=(3, -4)),
                np.sort(emb, axis=0), np.sort(emb, axis=-4), np.partition(emb, 1, axis=0),
                np.argsort(emb, axis=0), np.argpartition(emb, 1, axis=0)):  # fmt: skip
        assert type(out) is np.ndarray, out.shape
    np.testing.assert_array_equal(np.roll(emb, 1, axis=0), np.roll(np.asarray(emb), 1, axis=0))
    # Along another axis each row stays its image's.
    for out in (np.roll(emb, 1, axis=3), np.sort(emb), np.sort(emb, axis=1), np.partition(emb, 0, axis=2),
                np.argsort(emb, axis=-1)):  # fmt: skip
        assert isinstance(out, PatchEmbeddings)
        np.testing.assert_array_equal(out.image_shapes, emb.image_shapes)


@pytest.mark.parametrize("grids", [((8, 8), (4, 4), (2, 2)), ((8, 8), (8, 8)), ((9, 9), (4, 4))])
def test_channels_picked_before_upsampling_are_those_of_the_concatenation(grids):
    from skpadim.feature_extraction import _concat_on_first_grid

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(3, 4 + 2 * i, h, w, generator=g) for i, (h, w) in enumerate(grids)]
    full = _concat_on_first_grid(feats)
    n = full.shape[1]
    for channels in (np.arange(n), np.array([0, 2, n - 1]), np.array([n - 2, n - 1]), np.array([1]),
                     np.array([n - 1, 0, 3])):
        torch.testing.assert_close(_concat_on_first_grid(feats, channels), full[:, channels],
                                   rtol=0, atol=0)  # fmt: skip
    with pytest.raises(IndexError, match="out of range"):
        _concat_on_first_grid(feats, np.array([0, n]))


def test_the_default_extractor_computes_only_the_kept_channels(monkeypatch, tiny_extractor,
                                                               normal_images, test_images, tmp_path):
    # From images, the detector asks the extractor for its channels alone (for
    # wide backbones the concatenation of all channels is most of a batch's
    # memory); the Gaussians, threshold and scores are those of all channels.
    asked = []
    transform = TorchvisionExtractor._transform

    def recording(self, X, channels=None):
        asked.append(None if channels is None else list(channels))
        return transform(self, X, channels)

    monkeypatch.setattr(TorchvisionExtractor, "_transform", recording)
    det = PatchGaussianDetector(tiny_extractor, n_features=6, random_state=0).fit(normal_images)
    scores = det.score_samples(test_images)
    kept = det.channel_indices_.tolist()
    assert asked and all(a == kept for a in asked) and len(kept) < det.n_features_in_
    asked.clear()
    emb = det.feature_extractor_.transform(normal_images)
    assert asked == [None] and emb.shape[1] == det.n_features_in_
    on_all = PatchGaussianDetector(n_features=6, random_state=0).fit(emb)
    np.testing.assert_array_equal(on_all.channel_indices_, det.channel_indices_)
    np.testing.assert_array_equal(on_all.gaussian_.cholesky_, det.gaussian_.cholesky_)
    assert on_all.offset_ == det.offset_
    np.testing.assert_array_equal(on_all.score_samples(det.feature_extractor_.transform(test_images)),
                                  scores)  # fmt: skip
    # Through an embedding cache, which keeps all channels: asked for all.
    asked.clear()
    cached = PatchGaussianDetector(clone(tiny_extractor).set_params(memory=str(tmp_path)),
                                   n_features=6, random_state=0).fit(normal_images)  # fmt: skip
    assert asked and all(a is None for a in asked)
    np.testing.assert_array_equal(cached.score_samples(test_images), scores)
    # An extractor swapped after fit for one of more channels is refused, not
    # silently read at the old indices.
    det.feature_extractor_ = clone(tiny_extractor).set_params(layers=("stem", "block1", "block2")).fit()
    with pytest.raises(ValueError, match="embeddings have 28 channels but the detector was fitted on 20"):
        det.score_samples(test_images)


def test_fit_predict_uses_the_labels_as_fit_does(tiny_extractor, normal_images, test_images):
    X = np.concatenate([normal_images, test_images[4:]])
    y = np.r_[np.zeros(len(normal_images)), np.ones(4)]
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0)
    np.testing.assert_array_equal(clone(det).fit_predict(X, y), clone(det).fit(X, y).predict(X))
    assert not np.array_equal(clone(det).fit_predict(X, y), clone(det).fit_predict(X))


@pytest.mark.parametrize("trim", [0.0, 0.25])
def test_a_pandas_series_is_taken_by_position_whatever_its_index(tiny_extractor, normal_images,
                                                                 test_images, trim):
    # As a shuffled frame's column (df.sample) or a GridSearchCV fold (.iloc)
    # comes: the index's labels are not positions.
    import pandas as pd
    X = np.concatenate([normal_images[:8], test_images[4:]])
    y = np.r_[np.zeros(8), np.ones(4)]
    order = np.random.RandomState(3).permutation(len(X))
    det = PatchGaussianDetector(tiny_extractor, n_features=8, trim=trim, random_state=0)
    reference = clone(det).fit(list(X[order]), y[order])
    for index in (order, order + 100):
        fitted = clone(det).fit(pd.Series(list(X[order]), index=index), pd.Series(y[order], index=index))
        np.testing.assert_array_equal(fitted.gaussian_.location_, reference.gaussian_.location_)
        np.testing.assert_array_equal(fitted.trimmed_indices_, reference.trimmed_indices_)
    # The fit left the four defective images out.
    assert reference.gaussian_.n_samples_seen_ == 8 - int(np.floor(trim * 8))


def test_nested_parameters_of_the_default_extractor_are_refused_clearly(tiny_extractor):
    with pytest.raises(ValueError, match=r"feature_extractor__image_size.*TorchvisionExtractor\(\.\.\.\)"):
        PatchGaussianDetector().set_params(feature_extractor__image_size=64)
    with pytest.raises(ValueError, match=r"detector__n_features.*PatchGaussianDetector\(\.\.\.\)"):
        TiledDetector().set_params(detector__n_features=5)
    tiled = TiledDetector().set_params(detector=PatchGaussianDetector(), detector__n_features=5)
    assert tiled.detector.n_features == 5
    det = PatchGaussianDetector().set_params(feature_extractor=tiny_extractor,
                                             feature_extractor__image_size=48)
    assert det.feature_extractor.image_size == 48


def test_outlier_contamination_constraint_is_sklearns():
    from sklearn.utils.estimator_checks import check_outlier_contamination

    check_outlier_contamination("PatchGaussianDetector", PatchGaussianDetector())


def test_iter_anomaly_maps_checks_fitted_when_called():
    with pytest.raises(NotFittedError):
        PatchGaussianDetector().iter_anomaly_maps(np.zeros((1, 8, 8), np.uint8))


@pytest.mark.parametrize("y", [["good"] * 20 + ["bad"] * 4, [0] * 20 + [2] * 4, [0.0] * 20 + [0.5] * 4])
def test_labels_other_than_0_1_or_plus_minus_1_are_refused(tiny_extractor, normal_images, y):
    with pytest.raises(ValueError, match="y must hold 0 .* or masks; got values such as"):
        PatchGaussianDetector(tiny_extractor, n_features=8).fit(normal_images, y)


def test_boolean_labels_read_true_as_anomalous(tiny_extractor, normal_images, test_images):
    # As the metrics read them, even when every image is True (where integer
    # labels without a 0 are scikit-learn's +1 = normal).
    X = np.concatenate([normal_images[:8], test_images[4:]])
    flags = np.r_[np.zeros(8, bool), np.ones(4, bool)]
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0)
    np.testing.assert_array_equal(clone(det).fit(X, flags).gaussian_.location_,
                                  clone(det).fit(X, flags.astype(int)).gaussian_.location_)
    for all_true in (np.ones(4, bool), np.ones(4, bool).astype(object)):
        with pytest.raises(ValueError, match="at least 3 training images.*got 0"):
            clone(det).fit(X[8:], all_true)
    assert clone(det).fit(X[8:], np.ones(4, int)).gaussian_.n_samples_seen_ == 4


@pytest.mark.parametrize("n, c", [(40, 6), (30, 12)])
@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.05])
def test_leave_one_out_distances_match_refits_without_the_sample(n, c, shrinkage):
    from skpadim.detector import _leave_one_out_distances

    rng = np.random.RandomState(0)
    mixing = rng.randn(c, c) * rng.rand(c)
    X = (rng.randn(n, 2, c) @ mixing).transpose(0, 2, 1).reshape(n, c, 1, 2)
    g = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X)
    d = g.mahalanobis(X)
    in_fit = torch.ones(n, 1, dtype=torch.bool)
    in_fit[0] = False  # as if trimmed: kept as it is
    loo = _leave_one_out_distances(torch.from_numpy(d), in_fit, [n],
                                  g.shrinkage_ if shrinkage == "ledoit-wolf" else None).numpy()  # fmt: skip
    np.testing.assert_array_equal(loo[0], d[0])
    exact = np.stack([PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(np.delete(X, i, 0))
                      .mahalanobis(X[i : i + 1])[0] for i in range(1, n)])  # fmt: skip
    # Up to the neglected change of the ridge (and, for Ledoit-Wolf, of its
    # coefficient), of relative size 1/n; the in-sample distances are far off.
    np.testing.assert_allclose(loo[1:], exact, rtol=0.03)
    assert np.max(np.abs(d[1:] - exact) / exact) > 0.15


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.05])
def test_positions_of_two_patches_keep_their_in_sample_distances(shrinkage):
    # Left out, a patch would leave a one-sample Gaussian without a covariance:
    # Ledoit-Wolf's formula gave distances of a million there.
    from skpadim.detector import _leave_one_out_distances

    X = np.random.RandomState(1).randn(2, 5, 1, 2)
    g = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X)
    d = torch.from_numpy(g.mahalanobis(X))
    loo = _leave_one_out_distances(d, torch.ones(2, 1, dtype=torch.bool), [2],
                                   g.shrinkage_ if shrinkage == "ledoit-wolf" else None)
    np.testing.assert_array_equal(loo.numpy(), d.numpy())


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.05])
def test_threshold_flags_about_contamination_of_new_normal_images(shrinkage):
    # 60 training images of 16 channels: in-sample distances are so optimistic
    # that a threshold on them flags 35-70% of new normal images, not 10%.
    rates, in_sample_rates = [], []
    for seed in range(5):
        rng = np.random.RandomState(seed)
        mixing = rng.randn(16, 16) * rng.rand(16)

        def draw(n):
            z = rng.randn(n, 4, 16) @ mixing
            return PatchEmbeddings(z.transpose(0, 2, 1).reshape(n, 16, 2, 2).astype(np.float32))

        train, new = draw(60), draw(4000)
        det = PatchGaussianDetector(n_features=None, shrinkage=shrinkage, pooling=1, sigma=0,
                                    image_score="max", contamination=0.1).fit(train)  # fmt: skip
        rates.append(np.mean(det.predict(new) == -1))
        in_sample = np.percentile(det.score_samples(train), 10)
        in_sample_rates.append(np.mean(det.score_samples(new) < in_sample))
    assert 0.07 < np.mean(rates) < 0.13, rates
    assert min(in_sample_rates) > 0.3, in_sample_rates


def test_leave_one_out_distances_with_a_patch_mask():
    # trim_by="patch": positions hold different numbers of patches, and the
    # left-out patches keep their distance.
    from skpadim.detector import _leave_one_out_distances

    rng = np.random.RandomState(1)
    n, c = 40, 5
    X = rng.randn(n, c, 1, 2)
    mask = np.ones((n, 1, 2), bool)
    mask[:7, 0, 1] = False
    g = PatchCovariance(shrinkage=0.05, dtype="float64").fit(X, patch_mask=mask)
    d = g.mahalanobis(X)
    in_fit = mask.reshape(n, 2)
    loo = _leave_one_out_distances(torch.from_numpy(d), torch.from_numpy(in_fit), in_fit.sum(axis=0)).numpy()
    np.testing.assert_array_equal(loo[:7, 0, 1], d[:7, 0, 1])
    for i in (0, 10, 25):
        without = mask.copy()
        without[i] = False
        exact = PatchCovariance(shrinkage=0.05, dtype="float64").fit(X, patch_mask=without)
        expected = exact.mahalanobis(X[i : i + 1])[0]
        for j in np.flatnonzero(in_fit[i]):
            np.testing.assert_allclose(loo[i, 0, j], expected[0, j], rtol=0.01)


def test_leave_one_out_distances_with_fewer_images_than_channels():
    # A tiny eps and n < C: denominators near 2e-7, which a coarse floor would cap.
    from skpadim.detector import _leave_one_out_distances

    n = 20
    X = np.random.RandomState(0).randn(n, 100, 1, 1)
    with pytest.warns(UserWarning, match="barely regularises"):
        g = PatchCovariance(shrinkage=1e-6, dtype="float64").fit(X)
    d = g.mahalanobis(X)
    loo = _leave_one_out_distances(torch.from_numpy(d), torch.ones(n, 1, dtype=torch.bool), [n]).numpy()
    with pytest.warns(UserWarning, match="barely regularises"):
        exact = np.stack([PatchCovariance(shrinkage=1e-6, dtype="float64").fit(np.delete(X, i, 0))
                          .mahalanobis(X[i : i + 1])[0] for i in range(n)])  # fmt: skip
    np.testing.assert_allclose(loo, exact, rtol=0.03)


def test_refit_frees_the_previous_models_copy_on_the_gpu(monkeypatch, tiny_extractor, normal_images):
    # Scoring on a GPU keeps the model there (run here through the GPU's path on
    # CPU tensors); a refit must not hold that copy through its own peak memory.
    import skpadim.covariance

    monkeypatch.setattr(skpadim.covariance, "_tuned_for_cpu", lambda device: False)
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    old = det.gaussian_
    assert old.__dict__.get("_resident") is not None  # left by fit's threshold pass
    held_during_fit = []
    fit_gaussian = PatchGaussianDetector._fit_gaussian

    def spy(self, *args, **kwargs):
        held_during_fit.append("_resident" in old.__dict__)
        return fit_gaussian(self, *args, **kwargs)

    monkeypatch.setattr(PatchGaussianDetector, "_fit_gaussian", spy)
    det.fit(normal_images)
    assert held_during_fit == [False]


def test_leave_one_out_distances_stay_on_the_distances_device():
    # The "meta" device stands in for a GPU: no tensor may be left on the CPU.
    from skpadim.detector import _leave_one_out_distances

    dist = torch.empty((3, 2, 2), device="meta")
    in_fit = torch.ones((3, 1), dtype=torch.bool)
    for shrinkage in (None, np.full(4, 0.3)):
        out = _leave_one_out_distances(dist, in_fit, np.full(4, 3.0), shrinkage)
        assert out.device.type == "meta" and out.shape == dist.shape


def test_embeddings_of_another_frame_are_refused(tiny_extractor, normal_images):
    # Same grid and channels, another preprocessed frame: the maps would be
    # blurred and scored on a scale the threshold was not set on.
    ext = clone(tiny_extractor).fit(normal_images)
    emb = ext.transform(normal_images)
    det = PatchGaussianDetector(n_features=8, random_state=0).fit(emb)
    assert det.score_samples(emb[:2]).shape == (2,)
    other = PatchEmbeddings(np.asarray(emb[:2]), image_shapes=emb.image_shapes[:2],
                            resize_shape=(4 * emb.resize_shape[0], 4 * emb.resize_shape[1]))
    with pytest.raises(ValueError, match=r"preprocessed to \(128, 128\), but the detector was fitted on "
                                         r"\(32, 32\)"):
        det.score_samples(other)
    # Images as one numpy array were read as embeddings, their rows as channels.
    with pytest.raises(ValueError, match=r"fitted on patch embeddings \(20 channels\), so it can only "
                                         r"score embeddings, not images"):
        det.score_samples(normal_images[:2])
    # Embeddings of a grid 3 wide with the wrong channel count are named as such.
    on_bare = PatchGaussianDetector(n_features=None).fit(PatchEmbeddings(np.random.rand(6, 4, 3, 3)))
    with pytest.raises(ValueError, match="embeddings have 5 channels but the detector was fitted on 4"):
        on_bare.score_samples(np.random.rand(2, 5, 3, 3))


def test_embeddings_without_image_shapes_are_not_held_to_proportions(tiny_extractor, normal_images):
    # Fitted on bare embeddings (their frame is their grid), the detector has no
    # proportions to hold real images' embeddings to, and scores them.
    ext = clone(tiny_extractor).fit(normal_images)
    emb = ext.transform(normal_images)
    det = PatchGaussianDetector(n_features=8, random_state=0).fit(PatchEmbeddings(np.asarray(emb)))
    wide = PatchEmbeddings(np.asarray(emb[:2]), image_shapes=[(600, 800)] * 2, resize_shape=(32, 32))
    assert det.score_samples(wide).shape == (2,)


# -- size_calibration ----------------------------------------------------------
def _varied_widths(n, seed):
    """Images 32 px high and 24 to 62 px wide: magnified differently onto a 32 x 32 frame."""
    return [np.ascontiguousarray(img[:, : 24 + (2 * i) % 40]) for i, img in
            enumerate(textured_images(n, size=64, seed=seed)[:, :32])]


def test_level_slopes_recover_a_power_law():
    from skpadim.detector import _fit_level_slopes

    rng = np.random.RandomState(0)
    m = rng.uniform(-0.5, 0.5, size=(30, 2))
    levels = 3.0 * np.exp(m @ np.array([0.4, -0.2]))
    np.testing.assert_allclose(_fit_level_slopes(m, levels), [0.4, -0.2], atol=1e-10)
    # One aspect ratio at several sizes: both axes move together (up to the
    # rounding of the sides), so only the scale is learnt, one slope for both
    # axes, and the noise of the levels cannot tilt it into large slopes of
    # opposite signs along the stretch that nothing spans.
    scale = rng.uniform(-0.5, 0.5, size=30)
    one_aspect = np.column_stack([scale, scale]) + rng.uniform(-0.005, 0.005, size=(30, 2))
    levels = 3.0 * np.exp(0.3 * one_aspect.mean(axis=1) + rng.normal(0, 0.02, size=30))
    slopes = _fit_level_slopes(one_aspect, levels)
    np.testing.assert_allclose(slopes[0], slopes[1], rtol=0.05)
    assert abs(slopes.sum() - 0.3) < 0.05
    # One height, several widths: nothing is learnt along the height.
    one_height = np.column_stack([rng.uniform(-0.005, 0.005, size=30), m[:, 1]])
    levels = 3.0 * np.exp(-0.2 * m[:, 1] + rng.normal(0, 0.02, size=30))
    slopes = _fit_level_slopes(one_height, levels)
    assert abs(slopes[0]) < 0.01 and abs(slopes[1] + 0.2) < 0.05
    # Too few images, or a level without a logarithm: no calibration.
    assert not _fit_level_slopes(m[:9], levels[:9]).any()
    assert not _fit_level_slopes(m, np.where(np.arange(30) == 3, 0.0, levels)).any()
    assert not _fit_level_slopes(m, np.where(np.arange(30) == 3, np.nan, levels)).any()


def test_size_calibration_divides_each_map_by_its_expected_level(tiny_extractor):
    X, Xt = _varied_widths(24, seed=0), _varied_widths(6, seed=1)
    # A test image wider than any training image (66 px against 62, within the
    # proportions allowed): its level is that of the range's edge.
    Xt.append(np.ascontiguousarray(np.concatenate([Xt[0]] * 3, axis=1)[:, :66]))
    # (The frame's maps: with images of several sizes the defaults take their maps
    # from windows at one scale, which need no calibration.)
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, localization="frame").fit(X)
    plain = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0,
                                  size_calibration=False, localization="frame").fit(X)
    assert not plain.level_slopes_.any()
    assert abs(det.level_slopes_[0]) < 1e-12 and det.level_slopes_[1] != 0  # only the widths vary
    heights, widths = np.array([x.shape[0] for x in X]), np.array([x.shape[1] for x in X])
    np.testing.assert_allclose(det.log_magnification_range_,
                               [[0, np.log(32 / widths.max())], [0, np.log(32 / widths.min())]])
    low, high = det.log_magnification_range_[:, 1]
    m = np.log(32 / np.array([x.shape[1] for x in Xt]))
    assert m[-1] < low  # (so the clipping below is exercised)
    m = np.clip(m, low, high)
    levels = np.exp((m - (low + high) / 2) * det.level_slopes_[1])
    for ours, raw, level in zip(det.anomaly_maps(Xt), plain.anomaly_maps(Xt), levels):
        np.testing.assert_allclose(ours, raw / level, rtol=1e-5)
    np.testing.assert_allclose(det.score_samples(Xt), plain.score_samples(Xt) / levels, rtol=1e-5)
    assert det.offset_ != plain.offset_


def test_size_calibration_changes_nothing_for_images_of_one_size(tiny_extractor, normal_images,
                                                                 test_images):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    plain = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0,
                                  size_calibration=False).fit(normal_images)
    assert not det.level_slopes_.any() and not det.log_magnification_range_.any()
    np.testing.assert_array_equal(det.score_samples(test_images), plain.score_samples(test_images))
    assert det.offset_ == plain.offset_


def test_size_calibration_learns_from_normal_images_only(tiny_extractor):
    # Images that trim leaves out are suspects: their levels are not learnt from.
    import copy

    X = _varied_widths(24, seed=0)
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, trim=0.1).fit(X)
    assert len(det.trimmed_indices_) == 2
    kept = np.setdiff1d(np.arange(24), det.trimmed_indices_)
    # The normal images' leave-one-out map medians, from the same Gaussians uncalibrated.
    from skpadim.detector import _fit_level_slopes, _log_magnifications

    plain = copy.deepcopy(det)
    plain.level_slopes_ = np.zeros(2)
    in_fit = np.ones((24, 1), dtype=bool)
    in_fit[det.trimmed_indices_] = False
    medians, magnifications = [], []
    for maps, emb in plain._iter_maps(X, in_fit):
        # (The lower of the two middle values, as torch.median takes it.)
        medians += [float(np.sort(m.numpy().ravel())[(m.numel() - 1) // 2]) for m in maps]
        magnifications.append(_log_magnifications(emb))
    magnifications = np.concatenate(magnifications)
    expected = _fit_level_slopes(magnifications[kept], np.array(medians)[kept])
    np.testing.assert_allclose(det.level_slopes_, expected, rtol=1e-6)
    assert abs(_fit_level_slopes(magnifications, np.array(medians))[1] - expected[1]) > 1e-4
    np.testing.assert_array_equal(det.log_magnification_range_,
                                  [magnifications[kept].min(axis=0), magnifications[kept].max(axis=0)])
    with pytest.raises(ValueError, match="size_calibration"):
        PatchGaussianDetector(size_calibration="yes").fit(X)


def test_size_calibration_of_one_aspect_ratio_at_several_sizes(tiny_extractor):
    # Both axes' magnifications move together: one slope for both, so an image
    # a little off the training proportions (allowed up to 10%) is not rescaled
    # by slopes fitted to rounding noise (it was, by 0.69, and flagged).
    base = textured_images(30, size=64, seed=0)
    heights = np.linspace(30, 48, 30).round().astype(int)
    X = [np.ascontiguousarray(base[i, :h, : int(round(h * 4 / 3))]) for i, h in enumerate(heights)]
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(X)
    assert det.level_slopes_.any()
    np.testing.assert_allclose(det.level_slopes_[0], det.level_slopes_[1], rtol=0.05)
    levels = det._normal_levels(np.log(32 / np.array([[39.0, 52.0], [39.0, 48.0], [39.0, 57.0]])))
    assert np.all(np.abs(np.log(levels / levels[0])) < 0.05)


def test_trimming_by_image_is_not_decided_by_image_size(tiny_extractor):
    # All normal, of varied widths: uncalibrated out-of-fold scores rise with the
    # magnification, so trim would leave out the narrowest images; calibrated,
    # the sizes do not decide.
    X = _varied_widths(40, seed=0)
    widths = np.array([x.shape[1] for x in X])  # 24 to 62, ten of them 32 or less
    kwargs = dict(n_features=8, random_state=0, trim=0.1)
    plain = PatchGaussianDetector(tiny_extractor, size_calibration=False, **kwargs).fit(X)
    det = PatchGaussianDetector(tiny_extractor, **kwargs).fit(X)
    assert len(plain.trimmed_indices_) == len(det.trimmed_indices_) == 4
    assert np.all(widths[plain.trimmed_indices_] <= 32)
    assert np.sum(widths[det.trimmed_indices_] <= 32) <= 1


def test_calibrated_detector_refuses_embeddings_without_image_sizes(tiny_extractor):
    X = _varied_widths(12, seed=0)
    emb = clone(tiny_extractor).fit(X).transform(X)
    det = PatchGaussianDetector(n_features=8, random_state=0).fit(emb)
    assert det.level_slopes_.any()
    assert det.score_samples(emb[:2]).shape == (2,)
    with pytest.raises(ValueError, match="a plain array of embeddings carries no image sizes"):
        det.score_samples(np.asarray(emb[:2]))


def test_detector_pickled_before_size_calibration_still_works(normal_images, tiny_extractor):
    # Its state lacks the parameter (and the fitted slopes): it was fitted without.
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    state = det.__getstate__()
    for key in ("size_calibration", "level_slopes_", "log_magnification_range_"):
        del state[key]
    old = PatchGaussianDetector.__new__(PatchGaussianDetector)
    old.__setstate__(state)
    assert old.get_params()["size_calibration"] is False
    np.testing.assert_array_equal(old.score_samples(normal_images[:3]), det.score_samples(normal_images[:3]))
    assert clone(old).fit(normal_images).size_calibration is False


# -- localization -------------------------------------------------------------
def test_maps_of_mixed_sizes_come_from_windows_at_one_scale(tiny_extractor):
    # Images of varied widths: the scores (and threshold) are the frame's, the
    # maps those of a TiledDetector of the same settings fitted on the same images.
    X, Xt = _varied_widths(16, seed=0), _varied_widths(4, seed=1)
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(X)
    frame = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, localization="frame").fit(X)
    assert isinstance(det.localizer_, TiledDetector) and frame.localizer_ is None
    np.testing.assert_array_equal(det.score_samples(Xt), frame.score_samples(Xt))
    assert det.offset_ == frame.offset_
    np.testing.assert_array_equal(det.predict(Xt), frame.predict(Xt))
    tiled = TiledDetector(PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0,
                                                size_calibration=False),
                          short_side=min(det.input_shape_)).fit(X)
    assert det.localizer_.window_ == tiled.window_ and det.localizer_.scale_ == tiled.scale_
    maps = zip(det.anomaly_maps(Xt), tiled.anomaly_maps(Xt), frame.anomaly_maps(Xt), Xt)
    for ours, theirs, framed, x in maps:
        assert ours.shape == x.shape[:2]
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        assert not np.allclose(ours, framed)
    assert np.isnan(det.localizer_.offset_)  # it serves maps only
    # Proportions far outside the training images': no score, but a map (windows do not distort).
    odd = np.ascontiguousarray(np.tile(Xt[0], (3, 1, 1)))
    with pytest.raises(ValueError, match="outside the range"):
        det.score_samples([odd])
    assert det.anomaly_maps([odd])[0].shape == odd.shape[:2]
    # A refit on images of one size drops it.
    assert clone(det).fit(textured_images(12, seed=2)).localizer_ is None


def test_maps_of_one_size_stay_the_frames(tiny_extractor, normal_images, test_images):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(normal_images)
    frame = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0,
                                  localization="frame").fit(normal_images)
    assert det.localizer_ is None
    np.testing.assert_array_equal(det.anomaly_maps(test_images), frame.anomaly_maps(test_images))
    # Asked for, the windows serve the maps of images of one size too.
    tiled = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0,
                                  localization="tiled").fit(normal_images)
    assert tiled.localizer_.window_ == (32, 32)
    np.testing.assert_array_equal(tiled.score_samples(test_images), frame.score_samples(test_images))
    assert tiled.anomaly_maps(test_images).shape == test_images.shape[:3]
    with pytest.raises(ValueError, match="localization"):
        PatchGaussianDetector(localization="windows").fit(normal_images)


def test_localizer_learns_from_the_images_trim_keeps(tiny_extractor):
    X, Xt = _varied_widths(20, seed=0), _varied_widths(3, seed=1)
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, trim=0.1).fit(X)
    kept = np.setdiff1d(np.arange(20), det.trimmed_indices_)
    assert len(kept) == 18
    tiled = TiledDetector(PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0,
                                                size_calibration=False),
                          short_side=min(det.input_shape_)).fit([X[i] for i in kept])
    assert det.localizer_.n_windows_ == tiled.n_windows_
    for ours, theirs in zip(det.anomaly_maps(Xt), tiled.anomaly_maps(Xt)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # Trimming patches acts on the frame's patches: maps then stay the frame's.
    by_patch = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, trim=0.1,
                                     trim_by="patch").fit(X)
    assert by_patch.localizer_ is None
    with pytest.raises(ValueError, match="trim_by='patch'"):
        clone(by_patch).set_params(localization="tiled").fit(X)


def test_localized_maps_need_images(tiny_extractor):
    X = _varied_widths(12, seed=0)
    emb = clone(tiny_extractor).fit(X).transform(X)
    on_embeddings = PatchGaussianDetector(n_features=8, random_state=0).fit(emb)
    assert on_embeddings.localizer_ is None
    with pytest.raises(ValueError, match="needs the images, not their embeddings"):
        PatchGaussianDetector(n_features=8, localization="tiled").fit(emb)
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(X)
    assert det.score_samples(emb[:2]).shape == (2,)  # scores come from the frame
    with pytest.raises(ValueError, match="embeddings cannot be cut into"):
        det.anomaly_maps(emb[:2])


def test_localizer_moves_with_the_device_and_survives_pickling(tiny_extractor):
    X = _varied_widths(12, seed=0)
    det = PatchGaussianDetector(clone(tiny_extractor).set_params(device="auto"), n_features=8,
                                random_state=0).fit(X)
    assert det.localizer_.detector_.feature_extractor_.device == "auto"
    det.set_params(device="cpu", feature_extractor__device="cpu")
    assert det.localizer_.detector_.device == "cpu"
    assert det.localizer_.detector_.gaussian_.device == "cpu"
    assert det.localizer_.detector_.feature_extractor_.device == "cpu"
    import pickle

    again = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(again.anomaly_maps(X[:2])[0], det.anomaly_maps(X[:2])[0])
    # A detector pickled before localization existed kept its maps on the frame.
    state = det.__getstate__()
    del state["localization"], state["localizer_"]
    old = PatchGaussianDetector.__new__(PatchGaussianDetector)
    old.__setstate__(state)
    assert old.get_params()["localization"] == "frame" and old.localizer_ is None


def test_localizer_embeds_whole_windows_without_the_centre_crop(tiny_extractor):
    # A centre crop of every window would leave the windows' borders out of the maps.
    X = _varied_widths(12, seed=0)
    cropping = clone(tiny_extractor).set_params(image_size=64, crop_size=32)
    det = PatchGaussianDetector(cropping, n_features=8, random_state=0).fit(X)
    assert det.localizer_.detector_.feature_extractor_.crop_size is None
    assert det.feature_extractor_.crop_size == 32  # (the frame's own extractor keeps it)
    image = np.ascontiguousarray(X[5])
    marked = image.copy()
    marked[12:20, :4] = 255  # at the left border, outside any centre crop
    plain_map, marked_map = det.anomaly_maps([image, marked])
    assert np.abs(marked_map - plain_map)[12:20, :4].max() > 0.1 * plain_map.max()


class _WithoutImageSize(BaseEstimator):
    """A custom extractor that cannot be told the size to embed images at."""

    def __init__(self, extractor=None):
        self.extractor = extractor

    def fit(self, X, y=None):
        self.extractor_ = clone(self.extractor).fit(X)
        return self

    def transform(self, X):
        return self.extractor_.transform(X)


def test_localizer_needs_an_extractor_that_takes_an_image_size(tiny_extractor):
    X = _varied_widths(12, seed=0)
    det = PatchGaussianDetector(_WithoutImageSize(tiny_extractor), n_features=8, random_state=0).fit(X)
    assert det.localizer_ is None and det.level_slopes_.any()
    # A plain-array extractor's frame is its grid: the windows take the extractor's size.
    plain = PatchGaussianDetector(_PlainOutput(TinyNet(), layers=("block1", "block2"), weights=None,
                                               image_size=64), n_features=8, random_state=0).fit(X)
    assert plain.input_shape_ == plain.gaussian_.grid_shape_ and plain.localizer_.window_[0] == 64


def test_a_failing_localizer_leaves_the_previous_model(tiny_extractor, monkeypatch):
    X = _varied_widths(12, seed=0)
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0).fit(X)
    before = dict(det.__dict__)

    def fail(self, X):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(TiledDetector, "_fit_windows", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        det.fit(_varied_widths(14, seed=1))
    assert all(det.__dict__[k] is v for k, v in before.items())
    # The localizer has no threshold of its own: it says so rather than give NaNs.
    with pytest.raises(ValueError, match="no threshold: it is a localizer"):
        det.localizer_.predict(X[:2])

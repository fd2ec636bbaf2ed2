"""Pickle-free save/load: round trip, version and integrity checks, atomic writes."""

import doctest
import json
import os
import stat
import sys
import zipfile

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone

import skpadim.persistence
from skpadim import (PatchEmbeddings, PatchGaussianDetector, TiledDetector, TorchvisionExtractor, load,
                     save)
from skpadim.persistence import _FITTED_KEYS, FORMAT_VERSION, ModelFileError


@pytest.fixture(scope="module")
def fitted_lite():
    """A detector around the real EfficientNet-Lite0 (rebuildable from its name)."""
    from conftest import textured_images

    X = textured_images(6, size=64, seed=0)
    det = PatchGaussianDetector(TorchvisionExtractor(image_size=64), n_features=16, random_state=0)
    return det.fit(X), textured_images(3, size=64, seed=1)


@pytest.fixture(scope="module")
def fitted_emb():
    """A small detector fitted on embeddings (no backbone), and its embeddings."""
    emb = PatchEmbeddings(np.random.RandomState(0).rand(12, 6, 3, 3).astype(np.float32))
    return PatchGaussianDetector(n_features=4, random_state=0).fit(emb), emb


def test_round_trip_scores_identically(fitted_lite, tmp_path):
    det, X = fitted_lite
    path = save(det, tmp_path / "model.npz")
    loaded = load(path)
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    np.testing.assert_array_equal(loaded.anomaly_maps(X), det.anomaly_maps(X))
    assert loaded.offset_ == det.offset_
    assert loaded.get_params()["n_features"] == 16
    assert loaded.feature_extractor.weights == "DEFAULT"  # a refit loads real weights again
    # The file holds no pickled object at all.
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[k].dtype != object for k in archive.files)


def test_default_extractor_comes_back_as_none(tmp_path):
    from conftest import textured_images

    X = textured_images(4, size=48, seed=0)
    det = PatchGaussianDetector(n_features=8, random_state=0).fit(X)
    loaded = load(save(det, tmp_path / "m.npz"))
    assert loaded.get_params()["feature_extractor"] is None
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    refit = clone(loaded).fit(X)  # builds the default extractor again, as the original did
    np.testing.assert_array_equal(refit.score_samples(X), det.score_samples(X))


def test_round_trip_on_embeddings(tmp_path):
    emb = PatchEmbeddings(np.random.RandomState(0).rand(12, 6, 3, 3).astype(np.float32))
    det = PatchGaussianDetector(n_features=4, shrinkage=0.01, random_state=0).fit(emb)
    loaded = load(save(det, tmp_path / "e.npz"))
    np.testing.assert_array_equal(loaded.score_samples(emb), det.score_samples(emb))
    assert clone(loaded).get_params()["shrinkage"] == 0.01


def test_compact_model_is_saved_compactly_and_scores_identically(tmp_path):
    emb = PatchEmbeddings(np.random.RandomState(0).rand(30, 24, 4, 4).astype(np.float32))
    full = PatchGaussianDetector(n_features=None, random_state=0).fit(emb)
    det = PatchGaussianDetector(n_features=None, compact=True, random_state=0).fit(emb)
    path_full, path = save(full, tmp_path / "f.npz"), save(det, tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as archive:
        assert "cholesky" not in archive.files
        assert archive["cholesky_lower"].dtype == np.float16
        assert archive["cholesky_lower"].shape == (16, 24 * 25 // 2)
    # Factors of 24 x 24 dominate: a quarter of the float32 matrices, plus the rest.
    assert path.stat().st_size < 0.5 * path_full.stat().st_size
    loaded = load(path)
    np.testing.assert_array_equal(loaded.gaussian_.cholesky_, det.gaussian_.cholesky_)
    np.testing.assert_array_equal(loaded.score_samples(emb), det.score_samples(emb))
    assert loaded.compact is True


def test_compact_file_with_a_wrong_factor_shape_is_refused(tmp_path):
    emb = PatchEmbeddings(np.random.RandomState(0).rand(10, 5, 2, 2).astype(np.float32))
    path = save(PatchGaussianDetector(n_features=None, compact=True).fit(emb), tmp_path / "c.npz")

    def cut(arrays, config):
        arrays["cholesky_lower"] = arrays["cholesky_lower"][:, :-1]

    _rewrite(path, cut, redigest=True)
    with pytest.raises(ModelFileError, match="cholesky_lower has shape"):
        load(path)


def _rewrite(path, mutate, redigest=False):
    """Edit a saved file in place; ``redigest`` records digests matching the edit."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    config = json.loads(arrays["config"].tobytes())
    mutate(arrays, config)
    if redigest:
        digest = skpadim.persistence._digest({k: v for k, v in arrays.items() if k != "config"})
        config["sha256"] = digest
        if "sha256_config" in config:
            config["sha256_config"] = skpadim.persistence._config_digest(config, digest)
    arrays["config"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_newer_format_version_is_refused(fitted_lite, tmp_path):
    path = save(fitted_lite[0], tmp_path / "m.npz")
    _rewrite(path, lambda a, c: c.__setitem__("format_version", FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match=f"newer than the {FORMAT_VERSION} this skpadim reads"):
        load(path)


@pytest.mark.parametrize("version", [True, 0, -1, 1.0, "1", None])
def test_invalid_format_version_is_refused(fitted_emb, tmp_path, version):
    path = save(fitted_emb[0], tmp_path / "m.npz")
    _rewrite(path, lambda a, c: c.__setitem__("format_version", version), redigest=True)
    with pytest.raises(ModelFileError, match="no valid format version"):
        load(path)


@pytest.mark.parametrize("section, key, value", [
    ("fitted", "offset", 123.0),
    ("detector", "image_score", "mean"),
    ("detector", "sigma", 0.0),
])
def test_tampered_description_is_detected(fitted_emb, tmp_path, section, key, value):
    # The arrays are untouched, so only a digest over the description catches this.
    path = save(fitted_emb[0], tmp_path / "m.npz")
    _rewrite(path, lambda a, c: c[section].__setitem__(key, value))
    with pytest.raises(ModelFileError, match="description does not match .* altered or damaged"):
        load(path)


def test_file_without_description_digest_still_loads(fitted_emb, tmp_path):
    # Files written before the description digest existed carry the arrays digest only.
    det, emb = fitted_emb
    path = save(det, tmp_path / "m.npz")
    _rewrite(path, lambda a, c: c.pop("sha256_config"))
    with np.load(path, allow_pickle=False) as archive:
        assert "sha256_config" not in json.loads(archive["config"].tobytes())
    np.testing.assert_array_equal(load(path).score_samples(emb), det.score_samples(emb))


def _drop(section, key):
    def mutate(arrays, config):
        del (config if section is None else config[section])[key]
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_drop(None, "fitted"), "no 'fitted' section"),
    (_drop(None, "detector"), "no 'detector' section"),
    (_drop(None, "extractor"), "no 'extractor' section"),
    (_drop("detector", "n_features"), "'detector' section .* lacks n_features"),
    (lambda a, c: c.__setitem__("fitted", []), "'fitted' section .* is invalid"),
    (lambda a, c: a.pop("channel_indices"), "array 'channel_indices' is missing"),
] + [(_drop("fitted", key), f"'fitted' section .* lacks {key}") for key in _FITTED_KEYS])
def test_missing_entries_are_named(fitted_emb, tmp_path, mutate, message):
    path = save(fitted_emb[0], tmp_path / "m.npz")
    _rewrite(path, mutate, redigest=True)
    with pytest.raises(ModelFileError, match=message):
        load(path)


def _set(section, key, value):
    def mutate(arrays, config):
        config[section][key] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("fitted", "grid_shape", [3]), "invalid grid_shape: \\[3\\]"),
    (_set("fitted", "grid_shape", ["3", 3]), "invalid grid_shape"),
    (_set("fitted", "offset", "0.5"), "invalid offset"),
    (_set("fitted", "n_samples_seen", 0), "invalid n_samples_seen"),
    (_set("fitted", "input_shape", [3.5, 3]), "invalid input_shape"),
    (_set("fitted", "aspect_range", [0, 1]), "invalid aspect_range"),
    (_set("fitted", "fitted_on_embeddings", 1), "invalid fitted_on_embeddings"),
    (_set("fitted", "gaussian_dtype", "float16"), "invalid gaussian_dtype"),
    (_set("fitted", "level_slopes", [0.1]), "invalid level_slopes"),
    (_set("fitted", "level_slopes", [0.1, None]), "invalid level_slopes"),
    (_set("fitted", "log_magnification_range", [[0, 0], [0, "1"]]), "invalid log_magnification_range"),
    (_set("fitted", "log_magnification_range", [[0, 0]]), "invalid log_magnification_range"),
    (_set("detector", "sigma", -1.0), "invalid detector parameter: .*sigma"),
    (_set("detector", "image_score", "median"), "invalid detector parameter: .*image_score"),
    (_set("detector", "bogus", 1), "unknown entries bogus"),
])
def test_invalid_fitted_and_detector_values_are_refused(fitted_emb, tmp_path, mutate, message):
    # Files that match their digests but were written by hand or by another tool.
    path = save(fitted_emb[0], tmp_path / "m.npz")
    _rewrite(path, mutate, redigest=True)
    with pytest.raises(ModelFileError, match=message):
        load(path)


@pytest.mark.parametrize("model, mutate, message", [
    ("fitted_lite", _drop("extractor", "resize_shape"), "'extractor' section .* lacks resize_shape"),
    ("fitted_lite", lambda a, c: c["extractor"]["params"].pop("mean"),
     "'extractor params' section .* lacks mean"),
    ("fitted_tiled", _drop("tiled", "fitted"), "'tiled' section .* lacks fitted"),
    ("fitted_tiled", lambda a, c: c["tiled"]["fitted"].pop("scale"), "'tiled fitted' section .* lacks scale"),
    ("fitted_tiled", lambda a, c: c["tiled"]["params"].pop("window"),
     "'tiled params' section .* lacks window"),
    ("fitted_tiled", lambda a, c: c["tiled"]["params"]["detector"]["detector"].pop("sigma"),
     "'tiled detector' section .* lacks sigma"),
])
def test_missing_extractor_and_tiled_entries_are_named(request, tmp_path, model, mutate, message):
    path = save(request.getfixturevalue(model)[0], tmp_path / "m.npz")
    _rewrite(path, mutate, redigest=True)
    with pytest.raises(ModelFileError, match=message):
        load(path)


def _set(key, value):
    def mutate(arrays, config):
        arrays[key] = value(arrays[key])
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (lambda a, c: c["extractor"]["params"].update(bogus=1),
     "'extractor params' section holds unknown entries bogus"),
    (_set("channel_indices", lambda v: v.astype(np.float64)),
     "channel_indices has dtype float64, not integers"),
    (_set("location", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 3, np.nan, v)),
     "location holds NaN or infinite values"),
    (_set("cholesky", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 0, np.inf, v)),
     "cholesky holds NaN or infinite values"),
    (_set("shrinkage", lambda v: v.astype(np.int64)), "shrinkage has dtype int64"),
    (_set("shrinkage", lambda v: v * np.nan), "Ledoit-Wolf coefficients outside"),
    (_set("shrinkage", lambda v: v + 1), "Ledoit-Wolf coefficients outside"),
])
def test_consistent_files_with_impossible_contents_are_refused(fitted_lite, tmp_path, mutate, message):
    # These matched their recomputed digests and loaded: a TypeError from the
    # extractor, an index_select error at scoring, or NaN scores.
    path = save(fitted_lite[0], tmp_path / "m.npz")
    _rewrite(path, mutate, redigest=True)
    with pytest.raises(ModelFileError, match=message):
        load(path)


def test_tampered_arrays_are_detected(fitted_lite, tmp_path):
    path = save(fitted_lite[0], tmp_path / "m.npz")

    def tamper(arrays, config):
        arrays["location"] = arrays["location"] + 1

    _rewrite(path, tamper)
    with pytest.raises(ModelFileError, match="altered or damaged"):
        load(path)


def test_truncated_and_foreign_files_fail_clearly(fitted_lite, tmp_path):
    path = save(fitted_lite[0], tmp_path / "m.npz")
    data = path.read_bytes()
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable skpadim model"):
        load(truncated)
    other = tmp_path / "o.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ModelFileError, match="not a skpadim model file"):
        load(other)
    single = tmp_path / "s.npy"  # np.load gives a bare array for a .npy file
    np.save(single, np.zeros(3))
    with pytest.raises(ModelFileError, match="not a skpadim model file"):
        load(single)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.npz")


def test_save_is_atomic_and_keeps_the_old_file_on_failure(fitted_lite, tmp_path, monkeypatch):
    det, X = fitted_lite
    path = save(det, tmp_path / "m.npz")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save(det, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]  # no temporary file left behind
    assert zipfile.is_zipfile(path)


def test_save_names_a_missing_folder_or_a_folder_given_as_file(fitted_emb, tmp_path):
    det = fitted_emb[0]
    with pytest.raises(FileNotFoundError, match=r"the folder .*nowhere does not exist"):
        save(det, tmp_path / "nowhere" / "m.npz")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        save(det, tmp_path / "dir.npz")
    assert sorted(os.listdir(tmp_path)) == ["dir.npz"]  # nothing written


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no POSIX permission bits")
def test_save_gives_default_permissions_and_keeps_replaced_ones(fitted_emb, tmp_path):
    det = fitted_emb[0]
    previous = os.umask(0o027)
    try:
        path = save(det, tmp_path / "m.npz")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # as open() would create it
        assert os.umask(0o027) == 0o027  # save left the umask as it was
        path.chmod(0o604)
        save(det, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o604
    finally:
        os.umask(previous)


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    from conftest import TinyNet, textured_images

    ext = TorchvisionExtractor(TinyNet(), layers=("block1", "block2"), weights=None, image_size=32)
    det = PatchGaussianDetector(ext, n_features=4).fit(textured_images(5))
    with pytest.raises(TypeError, match="joblib"):
        save(det, tmp_path / "x.npz")
    with pytest.raises(ValueError, match="fitted"):
        save(PatchGaussianDetector(), tmp_path / "x.npz")
    with pytest.raises(TypeError, match="PatchGaussianDetector or a TiledDetector"):
        save(object(), tmp_path / "x.npz")
    # Around a TiledDetector, the fitted detector and the unfitted template alike.
    tiled = TiledDetector(PatchGaussianDetector(ext, n_features=4), short_side=32, window=(32, 32))
    tiled.fit(textured_images(5))
    with pytest.raises(TypeError, match="joblib"):
        save(tiled, tmp_path / "x.npz")
    with pytest.raises(ValueError, match="fitted"):
        save(TiledDetector(), tmp_path / "x.npz")
    # A rebuildable fitted detector, but a template that is not.
    tiled = TiledDetector(PatchGaussianDetector(TorchvisionExtractor("resnet18", weights=None, image_size=32),
                                                n_features=4), short_side=32, window=(32, 32))
    tiled.fit(textured_images(5))
    tiled.set_params(detector=PatchGaussianDetector(ext))
    with pytest.raises(TypeError, match="joblib"):
        save(tiled, tmp_path / "x.npz")


class _FlippedExtractor(TorchvisionExtractor):
    """A subclass whose transform differs: a file could not hold that code."""

    def transform(self, X):
        emb = super().transform(X)
        return PatchEmbeddings(-np.asarray(emb), image_shapes=emb.image_shapes,
                               resize_shape=emb.resize_shape, crop_box=emb.crop_box)


class _HalvedDetector(PatchGaussianDetector):
    def score_samples(self, X):
        return super().score_samples(X) / 2


def test_save_refuses_subclasses_it_would_rebuild_as_their_base(tmp_path):
    # They came back as the base class and scored otherwise, without a word.
    from conftest import textured_images

    X = textured_images(5, size=32)
    ext = dict(backbone="resnet18", weights=None, image_size=32)
    for det in (PatchGaussianDetector(_FlippedExtractor(**ext), n_features=4).fit(X),
                _HalvedDetector(TorchvisionExtractor(**ext), n_features=4).fit(X),
                TiledDetector(_HalvedDetector(TorchvisionExtractor(**ext), n_features=4),
                              short_side=32, window=(32, 32)).fit(X)):
        with pytest.raises(TypeError, match="is a subclass.*joblib"):
            save(det, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_parameters_set_after_fit_neither_change_nor_break_the_file(tmp_path):
    from conftest import textured_images

    X = textured_images(5, size=32)
    det = PatchGaussianDetector(TorchvisionExtractor("resnet18", weights=None, image_size=32),
                                n_features=6, shrinkage=0.01, random_state=0).fit(X)
    expected = det.score_samples(X)
    # Set after fit: they change neither the fitted model nor its scores in memory.
    det.set_params(compact=True, shrinkage="ledoit-wolf", feature_extractor__batch_size=4)
    np.testing.assert_array_equal(det.score_samples(X), expected)
    loaded = load(save(det, tmp_path / "m.npz"))  # was unloadable (shrinkage), or rounded (compact)
    np.testing.assert_array_equal(loaded.score_samples(X), expected)
    assert loaded.gaussian_.shrinkage == 0.01 and loaded.gaussian_.compact is False
    assert repr(loaded.get_params()) == repr(det.get_params())  # (extractors compare by identity)
    assert loaded.get_params()["feature_extractor__batch_size"] == 4


def test_fixed_shrinkage_above_one_round_trips(fitted_emb, tmp_path):
    # Any fixed shrinkage >= 0 is a valid parameter; the file's check took only [0, 1].
    _, emb = fitted_emb
    det = PatchGaussianDetector(n_features=None, shrinkage=2.0).fit(emb)
    loaded = load(save(det, tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.score_samples(emb), det.score_samples(emb))


def test_extractor_parameter_of_a_detector_fitted_on_embeddings_is_kept(tmp_path):
    ext = TorchvisionExtractor("resnet18", weights=None, image_size=32)
    emb = PatchEmbeddings(np.random.RandomState(0).rand(12, 6, 3, 3).astype(np.float32))
    det = PatchGaussianDetector(ext, n_features=4, random_state=0).fit(emb)
    loaded = load(save(det, tmp_path / "e.npz"))
    assert repr(loaded.get_params()["feature_extractor"]) == repr(ext)  # was None
    np.testing.assert_array_equal(loaded.score_samples(emb), det.score_samples(emb))


def test_files_without_the_fitted_settings_load_as_before(fitted_emb, tmp_path):
    # Files of earlier releases lack these entries: the parameters stand in for them.
    det, emb = fitted_emb
    path = save(det, tmp_path / "old.npz")

    def strip(arrays, config):
        del config["fitted"]["gaussian_shrinkage"], config["fitted"]["gaussian_compact"]
        del config["fitted"]["level_slopes"], config["fitted"]["log_magnification_range"]
        del config["extractor_param"], config["detector"]["size_calibration"]

    _rewrite(path, strip, redigest=True)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.score_samples(emb), det.score_samples(emb))
    assert loaded.gaussian_.shrinkage == det.shrinkage and loaded.feature_extractor is None
    # Fitted before the calibration existed: none.
    assert loaded.size_calibration is False and not loaded.level_slopes_.any()


def test_numpy_bools_are_saved_as_bools(tmp_path):
    emb = PatchEmbeddings(np.random.RandomState(0).rand(12, 6, 3, 3).astype(np.float32))
    det = PatchGaussianDetector(n_features=4, random_state=0, size_calibration=np.True_,
                                compact=np.False_).fit(emb)
    loaded = load(save(det, tmp_path / "m.npz"))
    assert loaded.size_calibration is True and loaded.compact is False
    np.testing.assert_array_equal(loaded.score_samples(emb), det.score_samples(emb))


def test_size_calibration_round_trips(tmp_path):
    from conftest import TinyNet, textured_images

    # Embeddings of images of varied widths carry their sizes: the detector
    # fitted on them learns a calibration, which must come back exactly.
    X = [np.ascontiguousarray(img[:, : 24 + 2 * i]) for i, img in
         enumerate(textured_images(12, size=64, seed=0)[:, :32])]
    ext = TorchvisionExtractor(TinyNet(), layers=("block1", "block2"), weights=None, image_size=32)
    emb = ext.fit(X).transform(X)
    det = PatchGaussianDetector(n_features=8, random_state=0).fit(emb)
    assert det.level_slopes_.any()
    loaded = load(save(det, tmp_path / "m.npz"))
    assert loaded.size_calibration is True
    np.testing.assert_array_equal(loaded.level_slopes_, det.level_slopes_)
    np.testing.assert_array_equal(loaded.log_magnification_range_, det.log_magnification_range_)
    np.testing.assert_array_equal(loaded.score_samples(emb), det.score_samples(emb))


def test_load_leaves_torch_random_state_alone(fitted_lite, tmp_path):
    import torch

    path = save(fitted_lite[0], tmp_path / "m.npz")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load(path)
    assert torch.equal(torch.rand(3), expected)


def test_torchvision_weights_enum_is_saved_by_its_name(monkeypatch, tmp_path):
    # save refused weights=ResNet18_Weights.IMAGENET1K_V1 and sent the user to pickle.
    import torch
    import torchvision
    from torchvision.models import ResNet18_Weights

    from conftest import textured_images

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # offline: a cached file
    (tmp_path / "checkpoints").mkdir()
    weights_file = tmp_path / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights_file)
    ext = TorchvisionExtractor("resnet18", weights=ResNet18_Weights.IMAGENET1K_V1, image_size=32)
    det = PatchGaussianDetector(ext, n_features=4, random_state=0).fit(textured_images(6))
    weights_file.unlink()  # the model file holds the weights: none looked for at load
    loaded = load(save(det, tmp_path / "m.npz"))
    assert loaded.feature_extractor.weights == "IMAGENET1K_V1"
    X = textured_images(3, seed=1)
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))


def _mixed_sizes(seed):
    """Textured images 48 px high and 32 to 96 px wide."""
    from conftest import textured_images

    images = textured_images(6, size=96, seed=seed)
    return [img[:48, :w] for img, w in zip(images, (32, 96, 48, 80, 40, 64))]


@pytest.fixture(scope="module")
def fitted_tiled():
    """A TiledDetector around the real EfficientNet-Lite0, on images of mixed sizes."""
    inner = PatchGaussianDetector(TorchvisionExtractor(), n_features=16, random_state=0)
    det = TiledDetector(inner, short_side=48, window=(64, 64)).fit(_mixed_sizes(0))
    return det, _mixed_sizes(1)


def test_tiled_detector_round_trip_scores_identically(fitted_tiled, tmp_path):
    det, X = fitted_tiled
    path = save(det, tmp_path / "tiled.npz")
    loaded = load(path)
    assert isinstance(loaded, TiledDetector)
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    for ours, theirs in zip(loaded.anomaly_maps(X), det.anomaly_maps(X)):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(loaded.predict(X), det.predict(X))
    assert (loaded.offset_, loaded.scale_, loaded.window_, loaded.n_windows_) == (
        det.offset_, det.scale_, det.window_, det.n_windows_)
    assert loaded.detector_.offset_ == det.detector_.offset_
    # The parameters as the user set them, so that a clone refits alike.
    expected = {k: v for k, v in det.get_params().items() if not isinstance(v, BaseEstimator)}
    got = {k: v for k, v in clone(loaded).get_params().items() if not isinstance(v, BaseEstimator)}
    assert got == expected and got["window"] == (64, 64)
    with np.load(path, allow_pickle=False) as archive:
        assert json.loads(archive["config"].tobytes())["format_version"] == 3


def test_tiled_detector_with_default_detector_round_trip(tmp_path):
    from conftest import textured_images

    X = [img[:32, :w] for img, w in zip(textured_images(5, size=64, seed=0), (32, 64, 40, 48, 56))]
    det = TiledDetector(short_side=32, window="auto").fit(X)
    loaded = load(save(det, tmp_path / "t.npz"))
    assert loaded.detector is None and loaded.window == "auto"
    np.testing.assert_array_equal(loaded.score_samples(X[:2]), det.score_samples(X[:2]))


def _set_tiled(key, value):
    def mutate(arrays, config):
        config["tiled"]["fitted"][key] = value
    return mutate


@pytest.mark.parametrize("model, mutate, message", [
    ("fitted_tiled", _set_tiled("window", 5), "tiled window 5 is not two sides"),
    ("fitted_tiled", _set_tiled("window", [32]), "tiled window .32. is not two sides"),
    ("fitted_tiled", _set_tiled("window", [32, 8]), "tiled window .* is not two sides"),
    ("fitted_tiled", _set_tiled("scale", "x"), "tiled scale 'x' is not a positive number"),
    ("fitted_tiled", _set_tiled("scale", -1.0), "tiled scale -1.0 is not a positive number"),
    ("fitted_tiled", _set_tiled("n_windows", True), "tiled n_windows True is not a count"),
    ("fitted_tiled", _set_tiled("offset", None), "tiled offset None is not a number"),
    ("fitted_tiled", lambda a, c: c["tiled"]["params"]["detector"]["detector"].__setitem__("bogus", 1),
     "'tiled detector' section holds unknown entries bogus"),
    ("fitted_tiled", lambda a, c: c["tiled"]["params"]["detector"]["extractor"].__setitem__("x", 1),
     "'tiled detector extractor' section holds unknown entries x"),
    ("fitted_tiled", lambda a, c: c.__setitem__("format_version", 2), "version 2 cannot hold a 'tiled'"),
    ("fitted_emb", lambda a, c: c.__setitem__("format_version", 3), "version 3 needs a 'tiled' section"),
    ("fitted_tiled", lambda a, c: c["extractor"].__setitem__("resize_shape", [32, 48]),
     r"embeds images of \[32, 48\], not the tiled window \[64, 64\]"),
])
def test_invalid_tiled_entries_are_refused(request, tmp_path, model, mutate, message):
    path = save(request.getfixturevalue(model)[0], tmp_path / "m.npz")
    _rewrite(path, mutate, redigest=True)
    with pytest.raises(ModelFileError, match=message):
        load(path)


def test_tiled_window_of_numpy_ints_is_saved(tmp_path):
    from conftest import textured_images

    inner = PatchGaussianDetector(TorchvisionExtractor("resnet18", weights=None), n_features=4)
    det = TiledDetector(inner, short_side=32, window=[np.int64(32), np.int64(32)]).fit(textured_images(4))
    loaded = load(save(det, tmp_path / "t.npz"))
    assert loaded.window == (32, 32)
    np.testing.assert_array_equal(loaded.score_samples(textured_images(2, seed=1)),
                                  det.score_samples(textured_images(2, seed=1)))


def test_tampered_tiled_description_is_detected(fitted_tiled, tmp_path):
    path = save(fitted_tiled[0], tmp_path / "t.npz")
    _rewrite(path, lambda a, c: c["tiled"]["fitted"].__setitem__("scale", 2.0))
    with pytest.raises(ModelFileError, match="description does not match"):
        load(path)


@pytest.fixture(scope="module")
def fitted_localized():
    """A default-style detector on images of mixed sizes: its maps come from a localizer."""
    det = PatchGaussianDetector(TorchvisionExtractor(image_size=(48, 64)), n_features=16, random_state=0)
    return det.fit(_mixed_sizes(0)), _mixed_sizes(1)


def test_detector_with_a_localizer_round_trips(fitted_localized, tmp_path):
    det, X = fitted_localized
    assert det.localizer_ is not None
    path = save(det, tmp_path / "localized.npz")
    loaded = load(path)
    assert isinstance(loaded.localizer_, TiledDetector) and loaded.localization == "auto"
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    for ours, theirs in zip(loaded.anomaly_maps(X), det.anomaly_maps(X)):
        np.testing.assert_array_equal(ours, theirs)
    assert (loaded.localizer_.scale_, loaded.localizer_.window_, loaded.localizer_.n_windows_) == (
        det.localizer_.scale_, det.localizer_.window_, det.localizer_.n_windows_)
    assert np.isnan(loaded.localizer_.offset_) and np.isnan(loaded.localizer_.detector_.offset_)
    assert clone(loaded).get_params()["localization"] == "auto"
    with np.load(path, allow_pickle=False) as archive:
        # Strict JSON: the localizer's thresholds are null, not NaN.
        config = json.loads(archive["config"].tobytes(), parse_constant=lambda c: pytest.fail(c))
        assert config["format_version"] == 4 and config["localizer"]["format_version"] == 3
        assert config["localizer"]["tiled"]["fitted"]["offset"] is None
        assert any(key.startswith("localizer/backbone/") for key in archive.files)


def _set_localizer(*keys, value):
    def mutate(arrays, config):
        section = config["localizer"]
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (lambda a, c: c.__setitem__("format_version", 1), "version 1 cannot hold a 'localizer'"),
    (lambda a, c: c.__setitem__("format_version", 3), "version 3 needs a 'tiled'"),
    (lambda a, c: c.pop("localizer"), "version 4 needs a 'localizer'"),
    (_set_localizer("format_version", value=1), "localizer. section: .*not described as format version 3"),
    (_set_localizer("tiled", "fitted", "offset", value=0.5), "tiled offset 0.5 is not null"),
    (_set_localizer("fitted", "offset", value=1.0), "invalid offset: 1.0"),
    (_set_localizer("tiled", "fitted", "scale", value=-1.0), "tiled scale -1.0 is not a positive"),
    (lambda a, c: a.pop("localizer/location"), "localizer' section: .*the array 'location' is missing"),
    (_set_localizer("extractor", value=None), "a localizer embeds its windows, but has no extractor"),
    (_set_localizer("fitted", "fitted_on_embeddings", value=True), "has no extractor"),
    (_set_localizer("extractor", "resize_shape", value=[32, 32]), "not the tiled window"),
])
def test_invalid_localizer_entries_are_refused(fitted_localized, tmp_path, mutate, message):
    path = save(fitted_localized[0], tmp_path / "m.npz")
    _rewrite(path, mutate, redigest=True)
    with pytest.raises(ModelFileError, match=message):
        load(path)


def test_doctests():
    result = doctest.testmod(skpadim.persistence)
    assert result.attempted > 0 and result.failed == 0


def test_joblib_round_trip_of_the_default_backbone(fitted_lite, tmp_path):
    import joblib

    det, X = fitted_lite
    joblib.dump(det, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    np.testing.assert_array_equal(loaded.anomaly_maps(X), det.anomaly_maps(X))

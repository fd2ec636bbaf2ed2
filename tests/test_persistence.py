"""Pickle-free save/load: round trip, version and integrity checks, atomic writes."""

import doctest
import json
import os
import zipfile

import numpy as np
import pytest
from sklearn.base import clone

import skpadim.persistence
from skpadim import PatchEmbeddings, PatchGaussianDetector, TorchvisionExtractor, load, save
from skpadim.persistence import FORMAT_VERSION, ModelFileError


@pytest.fixture(scope="module")
def fitted_lite():
    """A detector around the real EfficientNet-Lite0 (rebuildable from its name)."""
    from conftest import textured_images

    X = textured_images(6, size=64, seed=0)
    det = PatchGaussianDetector(TorchvisionExtractor(image_size=64), n_features=16, random_state=0)
    return det.fit(X), textured_images(3, size=64, seed=1)


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
        config["sha256"] = skpadim.persistence._digest(
            {k: v for k, v in arrays.items() if k != "config"})

    _rewrite(path, cut)
    with pytest.raises(ModelFileError, match="cholesky_lower has shape"):
        load(path)


def _rewrite(path, mutate):
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    config = json.loads(arrays["config"].tobytes())
    mutate(arrays, config)
    arrays["config"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_newer_format_version_is_refused(fitted_lite, tmp_path):
    path = save(fitted_lite[0], tmp_path / "m.npz")
    _rewrite(path, lambda a, c: c.__setitem__("format_version", FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match=f"newer than the {FORMAT_VERSION} this skpadim reads"):
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


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    from conftest import TinyNet, textured_images

    ext = TorchvisionExtractor(TinyNet(), layers=("block1", "block2"), weights=None, image_size=32)
    det = PatchGaussianDetector(ext, n_features=4).fit(textured_images(5))
    with pytest.raises(TypeError, match="joblib"):
        save(det, tmp_path / "x.npz")
    with pytest.raises(ValueError, match="fitted"):
        save(PatchGaussianDetector(), tmp_path / "x.npz")
    with pytest.raises(TypeError, match="PatchGaussianDetector"):
        save(object(), tmp_path / "x.npz")


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

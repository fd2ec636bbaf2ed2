"""PatchCovariance against scikit-learn's covariance estimators and plain NumPy."""

import doctest
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.covariance import EmpiricalCovariance, LedoitWolf, ledoit_wolf_shrinkage
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

import skpadim.covariance
from skpadim import PatchCovariance
from skpadim.covariance import ledoit_wolf_shrinkage_from_moments


def _embeddings(n=40, c=6, h=2, w=3, mean=0.0, seed=0, dtype=np.float64):
    rng = np.random.RandomState(seed)
    # Correlated channels with unequal scales, so that shrinkage is far from 0 and 1.
    mixing = rng.randn(c, c) * rng.rand(c)
    z = rng.randn(n, h * w, c) @ mixing
    X = z.transpose(0, 2, 1).reshape(n, c, h, w) + mean
    return X.astype(dtype)


def _reference(samples, shrinkage):
    """(location, covariance, Ledoit-Wolf coefficient or None) of (n, C) samples, by
    scikit-learn's LedoitWolf or NumPy's sample covariance plus the fixed ridge."""
    if shrinkage == "ledoit-wolf":
        ref = LedoitWolf().fit(samples)
        return ref.location_, ref.covariance_, ref.shrinkage_
    return samples.mean(0), np.cov(samples, rowvar=False) + shrinkage * np.eye(samples.shape[1]), None


def _per_position(X):
    """(n, C, h, w) -> list over positions of (n, C) float64 samples."""
    n, c, h, w = X.shape
    return list(X.reshape(n, c, h * w).transpose(2, 0, 1).astype(np.float64))


@pytest.mark.parametrize("mean", [0.0, 1e3])
@pytest.mark.parametrize("input_dtype", [np.float64, np.float32])
def test_ledoit_wolf_equals_sklearn_per_position(mean, input_dtype):
    X = _embeddings(mean=mean, dtype=input_dtype)
    est = PatchCovariance(shrinkage="ledoit-wolf", dtype="float64").fit(X)
    for p, samples in enumerate(_per_position(X)):
        ref = LedoitWolf().fit(samples)
        np.testing.assert_allclose(est.location_[p], ref.location_, rtol=1e-5)
        np.testing.assert_allclose(est.covariance_[p], ref.covariance_, rtol=1e-5)
        np.testing.assert_allclose(est.shrinkage_[p], ref.shrinkage_, rtol=1e-5)
        assert 0.01 < ref.shrinkage_ < 0.99  # the comparison is not trivial


@pytest.mark.parametrize("batch", [1, 3, 7, 40])
def test_partial_fit_in_small_batches_equals_one_fit(batch):
    # float32 values around 1e3: a naive sum-of-squares accumulation would lose
    # most digits of the variance here.
    X = _embeddings(n=41, mean=1e3, dtype=np.float32, seed=1)
    streamed = PatchCovariance(dtype="float64")
    for start in range(0, len(X), batch):
        streamed.partial_fit(X[start : start + batch])
    assert streamed.n_samples_seen_ == len(X)
    for p, samples in enumerate(_per_position(X)):
        ref = LedoitWolf().fit(samples)
        np.testing.assert_allclose(streamed.location_[p], ref.location_, rtol=1e-6)
        np.testing.assert_allclose(streamed.covariance_[p], ref.covariance_, rtol=1e-5)
        np.testing.assert_allclose(streamed.shrinkage_[p], ref.shrinkage_, rtol=1e-5)


def test_fixed_shrinkage_is_sample_covariance_plus_ridge():
    X = _embeddings(n=25, mean=5.0)
    eps = 0.01
    est = PatchCovariance(shrinkage=eps, dtype="float64").fit(X)
    for p, samples in enumerate(_per_position(X)):
        expected = np.cov(samples, rowvar=False) + eps * np.eye(samples.shape[1])
        np.testing.assert_allclose(est.covariance_[p], expected, rtol=1e-10)
        np.testing.assert_allclose(est.cholesky_[p] @ est.cholesky_[p].T, expected, rtol=1e-10)
    assert np.isnan(est.shrinkage_).all()


def test_zero_shrinkage_matches_empirical_covariance_up_to_bessel():
    X = _embeddings(n=30)
    est = PatchCovariance(shrinkage=0.0, dtype="float64").fit(X)
    for p, samples in enumerate(_per_position(X)):
        emp = EmpiricalCovariance().fit(samples).covariance_
        np.testing.assert_allclose(est.covariance_[p], emp * 30 / 29, rtol=1e-10)


def test_shrinkage_from_moments_matches_sklearn_function():
    rng = np.random.RandomState(3)
    for n, c in [(5, 10), (50, 4), (2, 3)]:
        x = rng.randn(n, c) * rng.rand(c)
        y = torch.from_numpy(x - x.mean(0))
        m2 = (y.T @ y)[None]
        q = ((y**2).sum(1) ** 2).sum()[None]
        ours = float(ledoit_wolf_shrinkage_from_moments(n, m2, q)[0])
        assert ours == pytest.approx(ledoit_wolf_shrinkage(x), rel=1e-9)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e16), (torch.float16, 25.0)])
def test_shrinkage_from_moments_is_computed_in_float64(dtype, scale):
    # Finite m2 whose squares overflow in its own precision gave 0.
    x = np.random.RandomState(10).randn(10, 12) * scale
    y = x - x.mean(axis=0)
    m2 = torch.tensor((y.T @ y)[None], dtype=dtype)
    assert torch.isfinite(m2).all()
    s = ledoit_wolf_shrinkage_from_moments(10, m2, torch.tensor([((y**2).sum(1) ** 2).sum()]))
    np.testing.assert_allclose(float(s[0]), ledoit_wolf_shrinkage(x), rtol=1e-3)
    with pytest.raises(ValueError, match="q must be non-negative"):
        ledoit_wolf_shrinkage_from_moments(10, m2, torch.tensor([-1.0]))


def test_shrinkage_from_moments_takes_arrays_and_names_bad_input():
    rng = np.random.RandomState(4)
    x = rng.randn(12, 3) * rng.rand(3)  # unequal scales: a shrinkage strictly inside (0, 1)
    y = x - x.mean(0)
    m2, q = (y.T @ y)[None], ((y**2).sum(1) ** 2).sum()[None]
    assert 0 < ledoit_wolf_shrinkage(x) < 1
    read_only = np.broadcast_to(m2, m2.shape)  # read-only views are accepted too
    from_arrays = float(ledoit_wolf_shrinkage_from_moments(12, read_only, q)[0])
    assert from_arrays == pytest.approx(ledoit_wolf_shrinkage(x), rel=1e-9)
    bad = [
        ((0, m2, q), "n must be a positive integer"),
        ((12.0, m2, q), "n must be a positive integer"),
        ((True, m2, q), "n must be a positive integer"),
        ((12, m2[0], q), r"m2 must have shape \(P, C, C\)"),
        ((12, m2[:, :2], q), r"m2 must have shape \(P, C, C\)"),
        ((12, m2, np.r_[q, q]), r"q must have shape \(P,\) = \(1,\)"),
        ((12, np.where(np.eye(3) > 0, np.nan, m2), q), "must be finite"),
        ((12, m2.astype(complex), q), "real numbers"),
        ((12, m2, np.array(["a"])), "real numbers"),
        ((12, m2, np.array([np.nan])), "must be finite"),
        ((12, torch.from_numpy(m2).bool(), q), "real numbers"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            ledoit_wolf_shrinkage_from_moments(*args)


def test_mahalanobis_equals_numpy_reference():
    X = _embeddings(n=30, seed=4)
    X_new = _embeddings(n=5, seed=5) * 1.5
    est = PatchCovariance(shrinkage=0.05, dtype="float64").fit(X)
    dist = est.mahalanobis(X_new)
    assert dist.shape == (5, 2, 3)
    for p, samples in enumerate(_per_position(X)):
        cov = np.cov(samples, rowvar=False) + 0.05 * np.eye(samples.shape[1])
        inv = np.linalg.inv(cov)
        diff = _per_position(X_new)[p] - samples.mean(0)
        expected = np.sqrt(np.einsum("ni,ij,nj->n", diff, inv, diff))
        np.testing.assert_allclose(dist.reshape(5, -1)[:, p], expected, rtol=1e-8)
    np.testing.assert_allclose(est.score_samples(X_new), -(dist**2))


def test_float32_storage_is_close_to_float64():
    X = _embeddings(n=30, mean=100.0, dtype=np.float32)
    e32 = PatchCovariance().fit(X)
    e64 = PatchCovariance(dtype="float64").fit(X)
    assert e32.cholesky_.dtype == np.float32
    np.testing.assert_allclose(e32.covariance_, e64.covariance_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e32.mahalanobis(X[:4]), e64.mahalanobis(X[:4]), rtol=1e-4)


def test_constant_channels_do_not_break_the_fit():
    # Flat image regions give zero-variance channels; the factorisation must cope.
    X = _embeddings(n=20)
    X[:, 2] = 7.0
    for shrinkage in ("ledoit-wolf", 0.0):
        est = PatchCovariance(shrinkage=shrinkage).fit(X)
        assert np.isfinite(est.cholesky_).all()
        assert np.isfinite(est.mahalanobis(X[:3])).all()


def test_all_constant_position_with_ledoit_wolf():
    X = np.zeros((10, 3, 1, 2))
    X[:, :, 0, 1] = np.random.RandomState(0).randn(10, 3)
    est = PatchCovariance().fit(X)
    assert np.isfinite(est.mahalanobis(X + 0.1)).all()


def test_validation_errors():
    est = PatchCovariance()
    with pytest.raises(ValueError, match="shape \\(n_images, n_channels, height, width\\)"):
        est.fit(np.zeros((10, 3, 4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        X = _embeddings()
        X[3, 1, 0, 0] = np.nan
        est.fit(X)
    with pytest.raises(ValueError, match="0 images"):
        est.fit(np.zeros((0, 3, 2, 2)))
    with pytest.raises(ValueError, match="shrinkage"):
        PatchCovariance(shrinkage=-1.0).fit(_embeddings())
    with pytest.raises(ValueError, match="shrinkage"):
        PatchCovariance(shrinkage="oas").fit(_embeddings())
    with pytest.raises(ValueError, match="at least 2 training images"):
        PatchCovariance(shrinkage=0.01).fit(_embeddings(n=1))
    with pytest.warns(UserWarning, match="singular"):
        PatchCovariance(shrinkage=1e-6).fit(_embeddings(n=4))
    with pytest.raises(NotFittedError):
        PatchCovariance().mahalanobis(_embeddings())
    fitted = PatchCovariance().fit(_embeddings())
    with pytest.raises(ValueError, match="fitted on \\(n, 6, 2, 3\\)"):
        fitted.mahalanobis(_embeddings(c=5))
    with pytest.raises(ValueError, match="fitted with fit\\(\\)"):
        fitted.partial_fit(_embeddings())
    streamed = PatchCovariance().partial_fit(_embeddings())
    with pytest.raises(ValueError, match="fitted on \\(n, 6, 2, 3\\)"):
        streamed.partial_fit(_embeddings(h=3))


def test_single_image_with_ledoit_wolf_is_defined():
    est = PatchCovariance().fit(_embeddings(n=1))
    assert np.isfinite(est.mahalanobis(_embeddings(n=2, seed=9))).all()


def test_clone_pickle_and_store_covariance():
    X = _embeddings()
    est = PatchCovariance(shrinkage=0.01, store_covariance=False).fit(X)
    assert not hasattr(est, "covariance_")
    assert clone(est).get_params() == est.get_params()
    loaded = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(loaded.mahalanobis(X), est.mahalanobis(X))
    streamed = PatchCovariance().partial_fit(X[:10])
    resumed = pickle.loads(pickle.dumps(streamed)).partial_fit(X[10:])
    np.testing.assert_allclose(resumed.covariance_, PatchCovariance().fit(X).covariance_, rtol=1e-5)


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so asking for one is not an error")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        PatchCovariance(device="cuda").fit(_embeddings())


def test_doctests():
    result = doctest.testmod(skpadim.covariance)
    assert result.attempted > 0 and result.failed == 0


def test_float32_accumulation_with_large_mean_stays_accurate():
    # The default stores the running scatter matrices in float32; sums about the
    # first batch's mean keep them accurate even for values around 1e3.
    X = _embeddings(n=64, mean=1e3, dtype=np.float32, seed=6)
    streamed = PatchCovariance()
    for start in range(0, 64, 5):
        streamed.partial_fit(X[start : start + 5])
    assert streamed._moments.s2.dtype == torch.float32
    for p, samples in enumerate(_per_position(X)):
        ref = LedoitWolf().fit(samples)
        scale = np.abs(ref.covariance_).max()
        np.testing.assert_allclose(streamed.covariance_[p], ref.covariance_, rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(streamed.shrinkage_[p], ref.shrinkage_, rtol=1e-4)


# 64: one diagonal block; 4: several and a ragged one; 32: twice the Cholesky's
# block for these 10 channels, so the fit assembles the block inverses itself.
@pytest.mark.parametrize("block", [64, 4, 32])
def test_large_models_score_by_triangular_solves(monkeypatch, block):
    X = _embeddings(n=30, c=10, seed=8)
    est = PatchCovariance(shrinkage=0.05, dtype="float64").fit(X)
    fast = est.mahalanobis(X[:4])
    monkeypatch.setattr(skpadim.covariance, "_WHITENING_BYTES", 0)
    monkeypatch.setattr(skpadim.covariance, "_SOLVE_BLOCK", block)
    # Diagonal blocks inverted by halves (as 32-wide ones are), in the fit and after loading.
    monkeypatch.setattr(skpadim.covariance, "_TRSM_LEAF", 3)
    monkeypatch.setattr(skpadim.covariance, "_SOLVE_CHUNK_BYTES", 2000)  # several chunks
    est_big = PatchCovariance(shrinkage=0.05, dtype="float64").fit(X)
    assert ("_block_inverses" in est_big.__dict__) == (block == 32)
    np.testing.assert_allclose(est_big.mahalanobis(X[:4]), fast, rtol=1e-10)
    assert "_whitening" not in est_big.__dict__
    # Against numpy: |L^-1 (x - mean)| per patch.
    x = X[:4].reshape(4, 10, -1)
    for p in range(x.shape[-1]):
        z = np.linalg.solve(est_big.cholesky_[p], (x[:, :, p] - est_big.location_[p]).T)
        np.testing.assert_allclose(
            est_big.mahalanobis(X[:4]).reshape(4, -1)[:, p], np.linalg.norm(z, axis=0), rtol=1e-10)
    # The block inverses are derived: not pickled, rebuilt identically (those the
    # fit assembled from its Cholesky's too).
    inverses = est_big._diagonal_inverses().numpy()
    loaded = pickle.loads(pickle.dumps(est_big))
    assert "_block_inverses" not in loaded.__dict__
    np.testing.assert_array_equal(loaded.mahalanobis(X[:4]), est_big.mahalanobis(X[:4]))
    np.testing.assert_array_equal(loaded._diagonal_inverses().numpy(), inverses)
    for k in range(0, 10, block):
        e = min(k + block, 10)
        expected = np.linalg.inv(est_big.cholesky_[:, k:e, k:e])
        np.testing.assert_allclose(inverses[:, k // block, : e - k, : e - k], expected, rtol=1e-10,
                                   atol=1e-12 * np.abs(expected).max())


# Own buffer: 6 images of this grid (1000 bytes); spare storage: room for 2 of
# them after the block triangles, taken when a buffer of its own would hold no more.
@pytest.mark.parametrize("where, pending_bytes, waits", [
    ("own", 1000, [4, 2, 6, 4, 2, 5]),
    ("spare", 300, [2, 2, 2, 2, 2, 1]),
])
@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.01])
@pytest.mark.parametrize("input_dtype", [np.float64, np.float32])
def test_deferred_products_wait_across_batches_and_equal_sklearn(
    small_blocks, monkeypatch, input_dtype, shrinkage, where, pending_bytes, waits
):
    # The detector's batches leave their shifted samples in a buffer, whose
    # products wait for the next batches (flushed when a sample finds it full);
    # whatever reads the statistics flushes it first. float64 input is shifted
    # in float64 and rounded into the float32 buffer, a block at a time. In the
    # spare storage, the factors are later written over the waiting samples.
    monkeypatch.setattr(skpadim.covariance, "_PENDING_BYTES", pending_bytes)
    X = _embeddings(n=23, c=6, mean=50.0, seed=12, dtype=input_dtype)
    est = PatchCovariance(shrinkage=shrinkage)
    moments, waiting = None, []
    for start in range(0, len(X), 4):
        moments = est._accumulate(moments, torch.from_numpy(X[start : start + 4]), defer=True)
        waiting.append(moments._pending)
    assert waiting == waits
    spare = moments.s2.spare()
    assert (moments._buffer.data_ptr() == spare.data_ptr()) == (where == "spare")
    copy = moments.copy()  # reads the statistics: flushed first
    assert moments._pending == 0 and copy._pending == 0
    est._finalize(moments, X.shape, consume=True)
    assert est.n_samples_seen_ == 23
    for p, samples in enumerate(_per_position(X)):
        location, expected, coefficient = _reference(samples, shrinkage)
        if coefficient is not None:
            np.testing.assert_allclose(est.shrinkage_[p], coefficient, rtol=1e-4)
        np.testing.assert_allclose(est.location_[p], location, rtol=1e-6)
        L = est.cholesky_[p].astype(np.float64)
        np.testing.assert_allclose(L @ L.T, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # Not deferred (fit, partial_fit): nothing waits after a call.
    assert PatchCovariance(shrinkage=shrinkage)._accumulate(None, torch.from_numpy(X[:4]))._pending == 0


def test_positions_are_gathered_exactly_chunk_after_chunk():
    from skpadim.covariance import _positions_gatherer

    rng = np.random.RandomState(3)
    X = torch.from_numpy(rng.randn(5, 4, 3, 7))
    expected = X.reshape(5, 4, 21).permute(2, 1, 0)  # (P, C, n)
    strided = X.transpose(2, 3).contiguous().transpose(2, 3)
    for source, dtype in ((X, torch.float64), (strided, torch.float64), (X, torch.float32)):
        gather = _positions_gatherer(source, dtype)
        # A large chunk, then smaller ones in the same buffer, and a ragged last one.
        for start, stop in ((0, 13), (13, 16), (16, 21), (5, 9), (18, 40)):
            rows = gather(start, stop)
            assert rows.dtype == dtype
            np.testing.assert_array_equal(rows, expected[start:stop].to(dtype))


def test_whitened_scoring_chunk_by_chunk_matches_numpy(monkeypatch):
    X = _embeddings(n=30, c=6, h=3, w=4, seed=9)
    est = PatchCovariance(shrinkage=0.05, dtype="float64").fit(X)
    whole = est.mahalanobis(X[:7])
    monkeypatch.setattr(skpadim.covariance, "_CHUNK_BYTES", 5600)  # chunks of 5, 5 and 2 positions
    assert skpadim.covariance._chunk_size(7, 6, 4) == 5
    chunked = est.mahalanobis(X[:7])
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    x = X[:7].reshape(7, 6, -1)
    for p in range(x.shape[-1]):
        z = np.linalg.solve(est.cholesky_[p], (x[:, :, p] - est.location_[p]).T)
        np.testing.assert_allclose(chunked.reshape(7, -1)[:, p], np.linalg.norm(z, axis=0),
                                   rtol=1e-10)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny working-set budgets and row blocks, so that every chunk loop of the fit
    runs several times and 6 channels are stored as a lower block triangle."""
    monkeypatch.setattr(skpadim.covariance, "_ROW_BLOCK", 2)
    monkeypatch.setattr(skpadim.covariance, "_GATHER_BYTES", 200)
    monkeypatch.setattr(skpadim.covariance, "_SCATTER_CHUNK_BYTES", 500)
    monkeypatch.setattr(skpadim.covariance, "_FINALIZE_BYTES", 300)
    monkeypatch.setattr(skpadim.covariance, "_TRANSPOSE_BYTES", 1000)
    monkeypatch.setattr(skpadim.covariance, "_PENDING_BYTES", 1000)


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.01])
def test_chunked_and_block_triangular_fit_equals_sklearn(small_blocks, shrinkage):
    X = _embeddings(n=33, mean=50.0, seed=11)
    est = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X)
    streamed = PatchCovariance(shrinkage=shrinkage, dtype="float64")
    for start in range(0, len(X), 10):
        streamed = pickle.loads(pickle.dumps(streamed.partial_fit(X[start : start + 10])))
    assert streamed._moments.rows == 2
    for p, samples in enumerate(_per_position(X)):
        location, expected, coefficient = _reference(samples, shrinkage)
        if coefficient is not None:
            np.testing.assert_allclose(est.shrinkage_[p], coefficient, rtol=1e-8)
        for fitted in (est, streamed):
            np.testing.assert_allclose(fitted.location_[p], location, rtol=1e-10)
            np.testing.assert_allclose(fitted.covariance_[p], expected, rtol=1e-8)
            L = fitted.cholesky_[p]
            np.testing.assert_array_equal(L, np.tril(L))
            np.testing.assert_allclose(L @ L.T, expected, rtol=1e-8, atol=1e-12)


def test_statistics_pickled_as_whole_matrices_load_as_block_triangles(small_blocks):
    # Earlier versions pickled the running scatter matrices of partial_fit as one
    # (P, C, C) tensor; such a model must load and go on streaming.
    X = _embeddings(n=30, seed=14)
    est = PatchCovariance(dtype="float64").partial_fit(X[:12])
    blocks = est._moments.s2
    assert len(blocks.chunks()) > 1 and len(blocks.bounds) > 1
    whole = torch.zeros((blocks.p, blocks.c, blocks.c), dtype=torch.float64)
    for j, (c0, c1) in enumerate(blocks.chunks()):
        for r0, r1, B in blocks.blocks(j):
            whole[c0:c1, r0:r1, :r1] = B
    state = est.__getstate__()
    state["_moments"].s2 = whole
    loaded = PatchCovariance.__new__(PatchCovariance)
    loaded.__setstate__(pickle.loads(pickle.dumps(state)))
    loaded.partial_fit(X[12:])
    ref = PatchCovariance(dtype="float64").fit(X)
    np.testing.assert_allclose(loaded.covariance_, ref.covariance_, rtol=1e-10)
    np.testing.assert_allclose(loaded.location_, ref.location_, rtol=1e-10)


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.01])
def test_float32_fit_with_large_offset_matches_float64_reference(shrinkage):
    # Channels with a large common offset and unequal spreads, streamed in
    # detector-sized batches: float32 sums about the first batch's mean must stay
    # within 1e-4 (relative) of a float64 fit.
    rng = np.random.RandomState(12)
    n, c = 96, 40
    mixing = rng.randn(c, c) * rng.rand(c)
    X = (rng.randn(n, 4, c) @ mixing).transpose(0, 2, 1).reshape(n, c, 2, 2) + 1e3
    X32 = X.astype(np.float32)
    e64 = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X32.astype(np.float64))
    e32 = PatchCovariance(shrinkage=shrinkage)
    moments = None
    for start in range(0, n, 32):
        batch = e32._check_embeddings(torch.from_numpy(X32[start : start + 32]), reset=True)
        moments = e32._accumulate(moments, batch)
    e32._finalize(moments, X32.shape, consume=True)
    assert e32.cholesky_.dtype == np.float32
    for name in ("location_", "covariance_", "cholesky_"):
        got, want = getattr(e32, name), getattr(e64, name)
        scale = np.abs(want).max(axis=tuple(range(1, want.ndim)), keepdims=True)
        assert np.abs(got - want).max() / scale.min() < 1e-4, name
    if shrinkage == "ledoit-wolf":
        np.testing.assert_allclose(e32.shrinkage_, e64.shrinkage_, rtol=1e-4)
    np.testing.assert_allclose(e32.mahalanobis(X32[:4]), e64.mahalanobis(X32[:4]), rtol=1e-4)


def test_fixed_shrinkage_does_not_gather_ledoit_wolf_moments():
    X = _embeddings(n=20)
    est = PatchCovariance(shrinkage=0.01).partial_fit(X[:10]).partial_fit(X[10:])
    assert est._moments.t is None and est._moments.q is None
    assert PatchCovariance().partial_fit(X)._moments.t is not None
    # Switching to Ledoit-Wolf half way is a clear error, not a wrong estimate.
    with pytest.raises(ValueError, match="set shrinkage before the first partial_fit"):
        est.set_params(shrinkage="ledoit-wolf").partial_fit(X)


@pytest.mark.parametrize("layout", ["whole", "block-triangular"])
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_positions_singular_in_float32_are_refactorised_in_float64(method, layout, request):
    # Zero-variance channels and no shrinkage: the float32 factorisation of those
    # positions fails and they are redone in float64 (with a jitter), before their
    # scatter matrices are overwritten by the factors or freed.
    if layout == "block-triangular":
        request.getfixturevalue("small_blocks")
    else:  # whole matrices factorised in place, a few positions at a time
        request.getfixturevalue("monkeypatch").setattr(
            skpadim.covariance, "_FINALIZE_BYTES", 300)
    X = _embeddings(n=20, dtype=np.float32)
    X[:, 2, 0, 1:] = 7.0  # positions 1 and 2: not the first of their chunk
    est = getattr(PatchCovariance(shrinkage=0.0), method)(X)
    ref = PatchCovariance(shrinkage=0.0, dtype="float64").fit(X)
    assert np.isfinite(est.cholesky_).all()
    L = est.cholesky_.astype(np.float64)
    np.testing.assert_allclose(L @ L.transpose(0, 2, 1), ref.covariance_, atol=1e-4)
    np.testing.assert_allclose(est.cholesky_[:, 2, 2][3:], ref.cholesky_[:, 2, 2][3:], rtol=1e-4)
    # In float64 too the singular positions are redone apart (with a jitter),
    # without disturbing the factors of the positions finalised with them.
    R = ref.cholesky_
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), ref.covariance_, atol=1e-6)


@pytest.mark.parametrize("layout", ["whole", "block-triangular"])
@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.0])
def test_gpu_paths_run_on_a_cpu_equal_the_references(monkeypatch, request, layout, shrinkage):
    # CI has no GPU: the paths a GPU takes (chunks bounded by memory only, whole
    # matrices to the batched Cholesky, batched triangular solves when scoring)
    # run here on CPU tensors, against scikit-learn and NumPy. Zero-variance
    # channels and no shrinkage send a few positions to the float64 retry.
    if layout == "block-triangular":
        request.getfixturevalue("small_blocks")
    cpu_paths = {name: getattr(skpadim.covariance, name)
                 for name in ("_tuned_for_cpu", "_cholesky_blocked_", "_solve_lower_blocked")}

    def cpu_only(*args, **kwargs):
        raise AssertionError("a CPU path was taken")

    monkeypatch.setattr(skpadim.covariance, "_tuned_for_cpu", lambda device: False)
    monkeypatch.setattr(skpadim.covariance, "_cholesky_blocked_", cpu_only)
    monkeypatch.setattr(skpadim.covariance, "_solve_lower_blocked", cpu_only)
    monkeypatch.setattr(skpadim.covariance, "_WHITENING_BYTES", 0)  # scoring by solves
    X = _embeddings(n=25, mean=30.0, seed=6, dtype=np.float32)
    if shrinkage == 0.0:
        X[:, 2, 0, 1:] = 7.0
    est = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X)
    X_new = _embeddings(n=4, seed=7) * 1.3 + 30.0
    dist = est.mahalanobis(X_new).reshape(4, -1)
    for p, samples in enumerate(_per_position(X)):
        location, expected, coefficient = _reference(samples, shrinkage)
        if coefficient is not None:
            np.testing.assert_allclose(est.shrinkage_[p], coefficient, rtol=1e-6)
        np.testing.assert_allclose(est.location_[p], location, rtol=1e-10)
        L = est.cholesky_[p]
        np.testing.assert_array_equal(L, np.tril(L))
        np.testing.assert_allclose(L @ L.T, expected, rtol=1e-6, atol=1e-6)
        z = np.linalg.solve(L, (_per_position(X_new)[p] - est.location_[p]).T)
        np.testing.assert_allclose(dist[:, p], np.linalg.norm(z, axis=0), rtol=1e-8)
    # The CPU's own paths give the same model.
    for name, function in cpu_paths.items():
        monkeypatch.setattr(skpadim.covariance, name, function)
    cpu = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X)
    np.testing.assert_allclose(cpu.cholesky_, est.cholesky_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cpu.mahalanobis(X_new).reshape(4, -1), dist, rtol=1e-8)


@pytest.mark.parametrize("whitening_bytes", [2**30, 0])
def test_gpu_scoring_keeps_the_model_on_the_device(monkeypatch, whitening_bytes):
    # On a GPU the model is moved once and reused, not sent again with every
    # batch; run on CPU tensors through the GPU's path, by whitening matrices
    # and by triangular solves.
    X = _embeddings(n=25, seed=6, dtype=np.float32)
    X_new = _embeddings(n=4, seed=7, dtype=np.float32) * 1.3
    monkeypatch.setattr(skpadim.covariance, "_WHITENING_BYTES", whitening_bytes)
    expected = PatchCovariance(shrinkage=0.01).fit(X).mahalanobis(X_new)
    monkeypatch.setattr(skpadim.covariance, "_tuned_for_cpu", lambda device: False)
    moves = []
    monkeypatch.setattr(skpadim.covariance, "_to_device",
                        lambda tensor, device: moves.append(tensor.shape) or tensor.clone())
    est = PatchCovariance(shrinkage=0.01).fit(X)
    first = est.mahalanobis(X_new)
    resident = est._resident[2]
    assert len(moves) == 2  # the locations and the matrices, once
    np.testing.assert_array_equal(est.mahalanobis(X_new), first)
    assert est._resident[2] is resident and len(moves) == 2
    np.testing.assert_allclose(first, expected, rtol=1e-5)
    assert "_resident" not in pickle.loads(pickle.dumps(est)).__dict__
    est.fit(X[:20])  # a refit frees the copy of the previous model
    assert "_resident" not in est.__dict__

    def out_of_memory(tensor, device):
        raise torch.cuda.OutOfMemoryError("no room")

    # Without room on the device, the model is sent chunk by chunk, as before,
    # and the move is not tried again: not when the copy fails, nor when the
    # device's free memory says it would not leave room for the scoring.
    monkeypatch.setattr(skpadim.covariance, "_to_device", out_of_memory)
    est.fit(X)
    np.testing.assert_allclose(est.mahalanobis(X_new), expected, rtol=1e-5)
    assert est._resident[2] is None
    monkeypatch.setattr(skpadim.covariance, "_to_device",
                        lambda tensor, device: moves.append(tensor.shape) or tensor.clone())
    monkeypatch.setattr(skpadim.covariance, "_free_memory", lambda device: 1000)
    est.fit(X)
    for _ in range(2):
        np.testing.assert_allclose(est.mahalanobis(X_new), expected, rtol=1e-5)
    assert est._resident[2] is None and len(moves) == 2


def test_block_inverses_of_refactorised_positions_are_their_own(monkeypatch):
    # Positions singular in float32 are refactorised in float64 after the blocked
    # Cholesky has produced its block inverses: theirs must come from the new factor.
    monkeypatch.setattr(skpadim.covariance, "_WHITENING_BYTES", 0)
    monkeypatch.setattr(skpadim.covariance, "_SOLVE_BLOCK", 32)
    X = _embeddings(n=20, c=10, dtype=np.float32)
    X[:, 2, 0, :] = 7.0
    est = PatchCovariance(shrinkage=0.0).fit(X)
    fitted = est._block_inverses[1].numpy()
    est.__dict__.pop("_block_inverses")
    np.testing.assert_array_equal(fitted, est._diagonal_inverses().numpy())


def test_blocked_cholesky_matches_lapack():
    rng = np.random.RandomState(13)
    A = rng.randn(5, 37, 60)
    cov = torch.from_numpy(A @ A.transpose(0, 2, 1) / 60)
    expected = torch.linalg.cholesky(cov)
    for block in (8, 16, 37, 64):
        work = cov.clone()
        work[:, 0, 5] = float("nan")  # the strict upper triangle is never read
        failed = skpadim.covariance._cholesky_blocked_(work, block)
        assert not failed.any()
        torch.testing.assert_close(work, expected, rtol=1e-10, atol=1e-12)
    cov[3, 20, 20] = -1.0
    assert skpadim.covariance._cholesky_blocked_(cov.clone(), 16).tolist() == [
        False, False, False, True, False
    ]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_rejected(bad):
    X = _embeddings(dtype=np.float32)
    X[5, 3, 1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        PatchCovariance().fit(X)
    with pytest.raises(ValueError, match="NaN or infinite"):
        PatchCovariance().fit(_embeddings()).mahalanobis(X)


def test_blocked_inverse_of_lower_factors_equals_numpy():
    rng = np.random.RandomState(0)
    for c in (5, 16, 37):  # below, at and across the block size
        A = rng.randn(4, c, c + 3)
        L = np.linalg.cholesky(A @ A.transpose(0, 2, 1) / c + np.eye(c))
        out = torch.empty(4, c, c, dtype=torch.float64)
        skpadim.covariance._invert_lower_blocked(torch.from_numpy(L), out=out)
        np.testing.assert_allclose(out.numpy(), np.linalg.inv(L), rtol=1e-10, atol=1e-12)


def test_triangular_inverses_by_halves_equal_numpy(monkeypatch):
    # Blocks wider than 16 are inverted by halves: LAPACK only ever solves
    # blocks of at most 16 rows (threaded solves of wider ones cost far more).
    rng = np.random.RandomState(2)
    widths = []
    solve = torch.linalg.solve_triangular

    def recording_solve(A, B, **kwargs):
        widths.append(A.shape[-1])
        return solve(A, B, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve_triangular", recording_solve)
    eye = torch.eye(64, dtype=torch.float64)
    for c in (5, 16, 32, 37, 64):
        A = rng.randn(3, c, c + 3)
        L = np.linalg.cholesky(A @ A.transpose(0, 2, 1) / c + np.eye(c))
        widths.clear()
        # Column-major input (as cholesky_ex returns its factors): same bits.
        got = skpadim.covariance._triangular_inverse(torch.from_numpy(L), eye)
        fortran = torch.from_numpy(np.asfortranarray(L.transpose(1, 2, 0)).transpose(2, 0, 1))
        np.testing.assert_array_equal(skpadim.covariance._triangular_inverse(fortran, eye).numpy(),
                                      got.numpy())
        np.testing.assert_allclose(got.numpy(), np.linalg.inv(L), rtol=1e-10, atol=1e-12)
        assert max(widths) <= 16 and (widths == [c, c]) == (c <= 16)


def test_diagonal_block_inverses_equal_numpy_and_fill_every_value():
    rng = np.random.RandomState(1)
    block = 8
    # Last block full, ragged within its first half, and ragged within its second.
    for c in (16, 19, 22):
        A = rng.randn(3, c, c + 3)
        L = np.linalg.cholesky(A @ A.transpose(0, 2, 1) / c + np.eye(c))
        expected = np.zeros((3, -(-c // block), block, block))
        for i, k in enumerate(range(0, c, block)):
            e = min(k + block, c)
            expected[:, i, : e - k, : e - k] = np.linalg.inv(L[:, k:e, k:e])
        out = torch.full(expected.shape, float("nan"), dtype=torch.float64)
        got = skpadim.covariance._inverse_diagonal_blocks(torch.from_numpy(L), block, out=out)
        assert got is out
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
        fresh = skpadim.covariance._inverse_diagonal_blocks(torch.from_numpy(L), block)
        np.testing.assert_array_equal(fresh.numpy(), out.numpy())


def _masked_reference(X, mask, shrinkage):
    """Per position: (location, covariance) of the kept samples, by scikit-learn/numpy."""
    out = []
    for p, samples in enumerate(_per_position(X)):
        kept = samples[mask.reshape(len(X), -1)[:, p]]
        if shrinkage == "ledoit-wolf":
            ref = LedoitWolf().fit(kept)
            out.append((ref.location_, ref.covariance_))
        else:
            out.append((kept.mean(0), np.cov(kept, rowvar=False) + shrinkage * np.eye(kept.shape[1])))
    return out


@pytest.mark.parametrize("layout", ["whole", "block-triangular"])
@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.01])
def test_patch_mask_fits_each_position_on_its_kept_patches(shrinkage, layout, request):
    if layout == "block-triangular":
        request.getfixturevalue("small_blocks")
    X = _embeddings(n=40, mean=20.0, seed=15)
    mask = np.random.RandomState(16).rand(40, *X.shape[2:]) > 0.3
    est = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X, patch_mask=mask)
    streamed = PatchCovariance(shrinkage=shrinkage, dtype="float64")
    for start in range(0, 40, 9):
        streamed = pickle.loads(pickle.dumps(
            streamed.partial_fit(X[start : start + 9], patch_mask=mask[start : start + 9])))
    for p, (location, covariance) in enumerate(_masked_reference(X, mask, shrinkage)):
        for fitted in (est, streamed):
            np.testing.assert_allclose(fitted.location_[p], location, rtol=1e-10)
            np.testing.assert_allclose(fitted.covariance_[p], covariance, rtol=1e-8)
            L = fitted.cholesky_[p]
            np.testing.assert_allclose(L @ L.T, covariance, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.01])
def test_partial_fit_keeps_batches_too_small_to_finalise(shrinkage):
    # A fixed shrinkage fed one image at a time, or a first batch whose mask
    # leaves a position empty, raised and threw the batch away: the statistics
    # never built up. They are now kept, with a warning, until they suffice.
    X = _embeddings(n=12, mean=5.0, seed=21)
    mask = np.ones((12, *X.shape[2:]), dtype=bool)
    mask[:4, 1, 2] = False  # position 5 is empty in the first batch
    streamed = PatchCovariance(shrinkage=shrinkage, dtype="float64")
    with pytest.warns(UserWarning, match="cannot score yet: patch_mask leaves a position with 0"):
        streamed.partial_fit(X[:4], patch_mask=mask[:4])
    with pytest.raises(NotFittedError):
        streamed.mahalanobis(X[:1])
    with pytest.raises(NotFittedError):
        check_is_fitted(streamed)
    streamed.partial_fit(X[4:], patch_mask=mask[4:])
    for p, (location, covariance) in enumerate(_masked_reference(X, mask, shrinkage)):
        np.testing.assert_allclose(streamed.location_[p], location, rtol=1e-10)
        np.testing.assert_allclose(streamed.covariance_[p], covariance, rtol=1e-8)
    if shrinkage == "ledoit-wolf":
        return
    one_by_one = PatchCovariance(shrinkage=shrinkage, dtype="float64")
    with pytest.warns(UserWarning, match="at least 2 training images"):
        one_by_one.partial_fit(X[:1])
    for i in range(1, 12):
        one_by_one.partial_fit(X[i : i + 1])
    reference = PatchCovariance(shrinkage=shrinkage, dtype="float64").fit(X)
    np.testing.assert_allclose(one_by_one.covariance_, reference.covariance_, rtol=1e-10)
    np.testing.assert_allclose(one_by_one.mahalanobis(X[:3]), reference.mahalanobis(X[:3]), rtol=1e-8)
    # fit itself still refuses too few images.
    with pytest.raises(ValueError, match="at least 2 training images"):
        PatchCovariance(shrinkage=shrinkage).fit(X[:1])


def test_patch_mask_of_all_true_and_unmasked_batches_match_plain_fit():
    X = _embeddings(n=30, seed=17)
    plain = PatchCovariance().fit(X)
    masked = PatchCovariance().fit(X, patch_mask=np.ones((30, *X.shape[2:]), dtype=bool))
    np.testing.assert_allclose(masked.covariance_, plain.covariance_, rtol=1e-5)
    # A masked batch followed by an unmasked one: the counts carry on.
    mask = np.ones((30, *X.shape[2:]), dtype=bool)
    mask[:5, 0, 0] = False
    mixed = PatchCovariance(dtype="float64").partial_fit(X[:10], patch_mask=mask[:10])
    mixed.partial_fit(X[10:])
    location, covariance = _masked_reference(X, mask, "ledoit-wolf")[0]
    np.testing.assert_allclose(mixed.covariance_[0], covariance, rtol=1e-8)
    np.testing.assert_allclose(mixed.location_[0], location, rtol=1e-10)


def test_patch_mask_validation():
    X = _embeddings(n=6, seed=18)
    h, w = X.shape[2:]
    with pytest.raises(ValueError, match=r"patch_mask: expected shape \(n_images, h, w\)"):
        PatchCovariance().fit(X, patch_mask=np.ones((6, h, w + 1), dtype=bool))
    with pytest.raises(ValueError, match="patch_mask: expected booleans"):
        PatchCovariance().fit(X, patch_mask=np.full((6, h, w), 0.5))
    mask = np.ones((6, h, w), dtype=bool)
    mask[1:, 0, 0] = False  # one patch left at that position
    with pytest.raises(ValueError, match="leaves a position with 1 training patches"):
        PatchCovariance(shrinkage=0.01).fit(X, patch_mask=mask)
    fitted = PatchCovariance(shrinkage=0.01).fit(X)
    before = fitted.cholesky_.copy()
    with pytest.raises(ValueError, match="leaves a position with 1"):
        fitted.fit(X, patch_mask=mask)
    np.testing.assert_array_equal(fitted.cholesky_, before)
    assert PatchCovariance().fit(X, patch_mask=mask.astype(int)).n_samples_seen_ == 6


@pytest.mark.parametrize("offset", [10.0, 1e4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_patch_mask_reference_ignores_left_out_outliers(monkeypatch, blocks, dtype, offset):
    # The patches a robust fit leaves out are outliers: sums taken about a reference
    # that they pulled away from the kept patches (std 0.01) lose every digit.
    if blocks == "several":  # images added one at a time: the first 2 keep nothing
        monkeypatch.setattr(skpadim.covariance, "_TRANSPOSE_BYTES", 1)
        monkeypatch.setattr(skpadim.covariance, "_PENDING_BYTES", 1)
    rng = np.random.RandomState(19)
    mask = rng.rand(40, 2, 3) > 0.3
    mask[:2] = False
    X = 3.0 + 0.01 * _embeddings(n=40, c=5, seed=20) + offset * ~mask[:, None]
    X = X.astype(dtype)
    est = PatchCovariance(dtype=dtype).fit(X, patch_mask=mask)
    tol = 1e-4 if dtype == "float32" else 1e-9
    for p, (location, covariance) in enumerate(_masked_reference(X, mask, "ledoit-wolf")):
        np.testing.assert_allclose(est.location_[p], location, rtol=1e-6)
        scale = np.abs(covariance).max()
        np.testing.assert_allclose(est.covariance_[p], covariance, rtol=0, atol=tol * scale)
        L = est.cholesky_[p].astype(np.float64)
        np.testing.assert_allclose(L @ L.T, covariance, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unmasked_batch_after_a_mask_that_kept_nothing_moves_the_reference(dtype):
    # A first batch whose mask leaves a position without any kept patch, then a
    # batch without a mask: that position's reference stayed at the left-out
    # outliers (float32: not positive definite; float64: shrinkage 0).
    rng = np.random.RandomState(0)
    first = 0.01 * rng.randn(4, 3, 1, 2)
    first[:, :, 0, 0] += 1e4
    mask = np.ones((4, 1, 2), dtype=bool)
    mask[:, 0, 0] = False
    second = 0.01 * _embeddings(n=30, c=3, h=1, w=2, seed=1)
    est = PatchCovariance(dtype=dtype).partial_fit(first.astype(dtype), patch_mask=mask)
    est.partial_fit(second.astype(dtype))
    ref = LedoitWolf().fit(second[:, :, 0, 0])
    np.testing.assert_allclose(est.covariance_[0], ref.covariance_, rtol=1e-4 if dtype == "float32" else 1e-9)
    np.testing.assert_allclose(est.shrinkage_[0], ref.shrinkage_, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e9, 1e-12])
def test_ledoit_wolf_far_from_unit_scale_in_float32(scale):
    # Fourth powers and squared norms overflowed (1e9) or underflowed (1e-12) in
    # float32: shrinkage 0 where scikit-learn gives about 0.9, covariances 38% off.
    X = _embeddings(n=40, c=8, h=1, w=2, seed=3) * scale
    est = PatchCovariance(dtype="float32").fit(X.astype(np.float32))
    for p, samples in enumerate(_per_position(X.astype(np.float32))):
        ref = LedoitWolf().fit(samples)
        np.testing.assert_allclose(est.shrinkage_[p], ref.shrinkage_, rtol=1e-4)
        np.testing.assert_allclose(est.covariance_[p], ref.covariance_, rtol=1e-4,
                                   atol=1e-5 * np.abs(ref.covariance_).max())


def test_one_channel_reports_ledoit_wolf_shrinkage_as_scikit_learn():
    # The target is S itself; rounding in delta gave a coefficient of 1, not 0.
    X = np.random.RandomState(4).randn(50, 1, 2, 2)
    est = PatchCovariance(dtype="float64").fit(X)
    for p, samples in enumerate(_per_position(X)):
        ref = LedoitWolf().fit(samples)
        assert est.shrinkage_[p] == ref.shrinkage_ == 0.0
        np.testing.assert_allclose(est.covariance_[p], ref.covariance_, rtol=1e-12)


def test_integer_embeddings_are_shifted_exactly():
    # Integers past 2**24 were rounded to float32 before the shift (5% off).
    X = 30_000_000 + np.random.RandomState(0).randint(0, 20, size=(50, 3, 1, 1))
    est = PatchCovariance().fit(X.astype(np.int64))
    ref = LedoitWolf().fit(X[:, :, 0, 0].astype(np.float64))
    np.testing.assert_allclose(est.covariance_[0], ref.covariance_, rtol=1e-5)


def test_embeddings_beyond_float32_range_are_named():
    X = _embeddings()
    est = PatchCovariance().fit(X)
    for call in (est.fit, est.mahalanobis):
        with pytest.raises(ValueError, match="beyond the range of float32, the precision of this model"):
            call(X * 1e39)
    # The fitted precision counts, not the parameter set afterwards.
    est.set_params(dtype="float64")
    with pytest.raises(ValueError, match="beyond the range of float32"):
        est.mahalanobis(X * 1e39)
    assert np.isfinite(PatchCovariance(dtype="float64").fit(X * 1e39).mahalanobis(X[:2] * 1e39)).all()
    with pytest.raises(TypeError, match="real numbers, got dtype timedelta64"):
        est.mahalanobis(X.astype(int).astype("timedelta64[s]"))


def test_pickle_keeps_the_fitted_precision_whatever_compact_says_now():
    # compact set after fit rounded float32 factors to float16 in the pickle
    # (inf past float16's range); compact fitted then dtype changed gave float64.
    X = _embeddings() * 1e6
    est = PatchCovariance().fit(X)
    expected = est.mahalanobis(X[:3])
    est.set_params(compact=True)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(est)).mahalanobis(X[:3]), expected)
    compact = PatchCovariance(compact=True).fit(_embeddings())
    compact.set_params(dtype="float64")
    assert pickle.loads(pickle.dumps(compact)).cholesky_.dtype == np.float32


def _variance_floor(X, mask=None):
    """The Ledoit-Wolf ridge floor, by NumPy: 1% of the channels' (biased)
    variance averaged over channels and positions, each on its kept samples."""
    mask = np.ones((len(X), *X.shape[2:]), dtype=bool) if mask is None else mask
    kept = mask.reshape(len(X), -1)
    return 0.01 * np.mean([samples[kept[:, p]].var(axis=0).mean()
                           for p, samples in enumerate(_per_position(X))])


@pytest.mark.filterwarnings("ignore:Only one sample")  # scikit-learn, on that position
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_single_kept_patch_with_ledoit_wolf_gets_the_variance_floor(monkeypatch, dtype):
    # One patch is enough for Ledoit-Wolf: its scatter is exactly zero, whatever
    # came before it in the batch, so its covariance is the floor's ridge alone,
    # centred on that patch; the other positions are scikit-learn's.
    for seed in range(20):
        rng = np.random.RandomState(seed)
        X = (rng.randn(6, 4, 2, 3) * 10.0 ** rng.randint(-3, 4) + rng.choice([0, 5, 1e3]))
        X = X.astype(rng.choice([np.float32, np.float64]))
        k = rng.randint(6)
        mask = np.ones((6, 2, 3), dtype=bool)
        mask[:, 0, 0] = False
        mask[k, 0, 0] = True
        monkeypatch.setattr(skpadim.covariance, "_TRANSPOSE_BYTES", 2**20 if seed % 2 else 1)
        monkeypatch.setattr(skpadim.covariance, "_PENDING_BYTES", 2**20 if seed % 2 else 1)
        est = PatchCovariance(dtype=dtype).fit(X, patch_mask=mask)
        one = PatchCovariance(dtype=dtype).fit(X[k : k + 1])
        np.testing.assert_array_equal(est.location_[0], one.location_[0])
        floor = _variance_floor(X, mask)
        np.testing.assert_allclose(est.covariance_[0], floor * np.eye(4), rtol=1e-5, atol=0)
        np.testing.assert_allclose(est.cholesky_[0], np.sqrt(floor) * np.eye(4), rtol=1e-5, atol=0)
        for p, (location, covariance) in enumerate(_masked_reference(X, mask, "ledoit-wolf")):
            np.testing.assert_allclose(est.location_[p], location, rtol=1e-6, atol=1e-6)
            if p:
                np.testing.assert_allclose(est.covariance_[p], covariance, rtol=1e-4,
                                           atol=1e-6 * np.abs(covariance).max())


@pytest.mark.parametrize("layout", ["whole", "block-triangular"])
def test_constant_positions_get_a_ridge_from_the_grid_s_variance(layout, request):
    # A region that never varies in training (a black background) has a zero
    # covariance, which Ledoit-Wolf cannot lift; its ridge comes from the average
    # variance of the grid instead of a jitter of arbitrary scale, and the other
    # positions stay exactly scikit-learn's.
    if layout == "block-triangular":
        request.getfixturevalue("small_blocks")
    X = _embeddings(n=30, mean=3.0, seed=31)
    X[:, :, 0, :2] = 7.0  # two constant positions
    est = PatchCovariance(dtype="float64").fit(X)
    floor = _variance_floor(X)
    for p, samples in enumerate(_per_position(X)):
        if p < 2:
            np.testing.assert_allclose(est.covariance_[p], floor * np.eye(6), rtol=1e-12, atol=0)
        else:
            np.testing.assert_allclose(est.covariance_[p], LedoitWolf().fit(samples).covariance_,
                                       rtol=1e-10, atol=1e-12)
    # A small change there is a proportionate distance: |delta|^2 / floor.
    Y = _embeddings(n=2, mean=3.0, seed=32)
    Y[:, :, 0, :2] = 7.0 + 1e-3
    d = est.mahalanobis(Y)
    np.testing.assert_allclose(d[:, 0, :2] ** 2, 6 * 1e-6 / floor, rtol=1e-6)


def test_partial_fit_validates_parameters_on_every_call():
    X = _embeddings(n=20, seed=21)
    est = PatchCovariance().partial_fit(X[:10])
    for bad in ("oas", -5.0):
        with pytest.raises(ValueError, match="'shrinkage' parameter"):
            est.set_params(shrinkage=bad).partial_fit(X[10:])
    with pytest.raises(ValueError, match="'dtype' parameter"):
        PatchCovariance(dtype="float16").fit(X)
    # The rejected calls left the statistics as they were.
    est.set_params(shrinkage="ledoit-wolf").partial_fit(X[10:])
    for p, samples in enumerate(_per_position(X)):
        np.testing.assert_allclose(est.covariance_[p], LedoitWolf().fit(samples).covariance_,
                                   rtol=1e-4, atol=1e-6)


def test_compact_rejects_factors_beyond_float16():
    X = _embeddings(n=30, seed=22)
    fitted = PatchCovariance(compact=True).fit(X)
    before = fitted.cholesky_.copy()
    for scale in (1e5, 1e-8):  # factors past float16's largest value, or below its smallest
        with pytest.raises(ValueError, match="compact=True cannot hold"):
            fitted.fit(X * scale)
        np.testing.assert_array_equal(fitted.cholesky_, before)
    # Within range, the rounded factors still give the distances of the full ones.
    for scale in (1e3, 1e-3):
        full = PatchCovariance(dtype="float64").fit(X * scale)
        compact = PatchCovariance(compact=True).fit(X * scale)
        new = X[:3] * scale
        np.testing.assert_allclose(compact.mahalanobis(new), full.mahalanobis(new), rtol=1e-2)
    # The tiny jittered factor of a constant position is held.
    X[:, :, 0, 0] = 1.0
    assert np.isfinite(PatchCovariance(compact=True).fit(X).mahalanobis(X[:3] + 0.1)).all()


def test_empty_embeddings_and_non_real_tensors_are_rejected():
    for shape in [(3, 0, 2, 2), (3, 2, 0, 2), (3, 2, 2, 0)]:
        for X in (np.zeros(shape), torch.zeros(shape)):
            with pytest.raises(ValueError, match="at least one channel and a non-empty grid"):
                PatchCovariance().fit(X)
    for dtype in (torch.complex64, torch.bool):
        X = torch.ones((3, 2, 2, 2), dtype=dtype)
        for form in (X, X.numpy()):  # tensors follow the rule for arrays
            with pytest.raises(TypeError, match="real numbers"):
                PatchCovariance().fit(form)
    # Integers are real numbers, as tensors and as arrays.
    X = np.random.RandomState(23).randint(0, 9, size=(10, 3, 2, 2))
    np.testing.assert_allclose(PatchCovariance().fit(torch.from_numpy(X)).covariance_,
                               PatchCovariance().fit(X).covariance_)

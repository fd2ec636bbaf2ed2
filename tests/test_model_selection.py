"""Hyper-parameter search: both compositions, normal-only training folds, caching."""

import doctest
import inspect
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torchvision
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
    # A stray 0 among +1 / -1 labels turned every +1 (normal) into an anomaly.
    with pytest.raises(ValueError, match="mixes the two label conventions"):
        list(NormalOnlyKFold(2).split(np.zeros(8), [1, 1, 1, 1, -1, -1, 0, 0]))
    with pytest.raises(ValueError, match="n_splits"):
        NormalOnlyKFold(1)
    with pytest.raises(ValueError, match="no effect since shuffle is False"):
        NormalOnlyKFold(3, random_state=0)  # as KFold


def test_normal_only_kfold_warns_of_test_folds_without_anomalies():
    y = np.array([0] * 7 + [1] * 3)
    with pytest.warns(UserWarning, match="Only 3 anomalous samples for n_splits=5: 2 test folds"):
        folds = list(NormalOnlyKFold(5).split(np.zeros(10), y))
    assert sum((y[test] == 1).any() for _, test in folds) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(NormalOnlyKFold(3).split(np.zeros(10), y))  # one anomaly per fold
        list(NormalOnlyKFold(5).split(np.zeros(10), np.zeros(10)))  # no anomalies at all


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
    with pytest.raises(ValueError, match="at least 3 training images"):
        clone(det).fit(X[y == 1], masks[y == 1])  # defective images only: nothing to learn
    inlier = np.where(y == 0, 1, -1)  # scikit-learn's outlier convention
    fitted = clone(det).fit(X, inlier)
    assert fitted.gaussian_.n_samples_seen_ == int((y == 0).sum())


def test_cache_reuses_embeddings_and_keys_on_parameters(labelled_textures, tmp_path, monkeypatch,
                                                        fresh_memos):
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


# -- what makes cached candidates cheap: the traced-backbone memo, per-image caching ----


@pytest.fixture
def fresh_memos(monkeypatch):
    """Empty process-wide memos, so that counts do not depend on earlier tests."""
    import skpadim.feature_extraction as fe

    monkeypatch.setattr(fe, "_TRACED", fe._TracedBackbones(max_entries=4))
    monkeypatch.setattr(fe, "_RECENT", fe._RecentEmbeddings(max_bytes=256 * 2**20))
    return fe


def _count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    monkeypatch.setattr(owner, name, staticmethod(counting) if static else counting)
    return calls


def test_refits_get_independent_copies_of_one_traced_backbone(
    labelled_textures, fresh_memos, monkeypatch
):
    X = labelled_textures[0][:4]
    traces = _count_calls(monkeypatch, TorchvisionExtractor, "_trace")
    a = TorchvisionExtractor(image_size=64).fit()
    b = clone(a).fit()
    assert len(traces) == 1  # the second fit copied the memoised trace
    assert a.model_ is not b.model_
    assert not {p.data_ptr() for p in a.model_.parameters()} & {
        p.data_ptr() for p in b.model_.parameters()
    }
    # A copied torchvision feature extractor starts in train mode (another graph): not ours.
    assert not any(m.training for m in b.model_.modules())
    assert (a.layers_, a.channels_per_layer_, a.grid_shape_) == (
        b.layers_, b.channels_per_layer_, b.grid_shape_)
    expected = a.transform(X)
    np.testing.assert_array_equal(b.transform(X), expected)
    # Changing one fitted extractor's weights changes neither the others nor later fits.
    with torch.no_grad():
        for p in b.model_.parameters():
            p.mul_(0.5)
    assert not np.array_equal(b.transform(X), expected)
    np.testing.assert_array_equal(a.transform(X), expected)
    np.testing.assert_array_equal(clone(a).fit().transform(X), expected)
    # Other image sizes are probed anew on the same trace.
    c = clone(a).set_params(image_size=96).fit()
    assert len(traces) == 1 and c.grid_shape_ == (24, 24) and a.grid_shape_ == (16, 16)
    # Unpickling rebuilds from the memo too, with the pickled weights.
    loaded = pickle.loads(pickle.dumps(b))
    assert len(traces) == 1 and loaded.model_ is not b.model_
    np.testing.assert_array_equal(loaded.transform(X), b.transform(X))


def test_backbone_memo_tells_layers_and_weights_apart(fresh_memos, tmp_path, monkeypatch):
    import torchvision

    X = torch.rand(2, 3, 32, 32)
    traces = _count_calls(monkeypatch, TorchvisionExtractor, "_trace")
    lite = [TorchvisionExtractor(layers=layers, image_size=64).fit() for layers in LAYERS]
    assert [e.layers_ for e in lite] == [tuple(layers) for layers in LAYERS]
    assert lite[0].n_channels_ < lite[1].n_channels_ and len(traces) == 2

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    ext = TorchvisionExtractor("resnet18", layers=("layer1",), weights=str(path), image_size=32)
    first = ext.fit().transform(X)
    np.testing.assert_array_equal(clone(ext).fit().transform(X), first)
    assert len(traces) == 3
    # Replacing the file (same path, same size) is seen: the key holds its modification time.
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not np.allclose(clone(ext).fit().transform(X), first)
    assert len(traces) == 4

    # Random weights are never memoised: every fit draws its own from torch's generator.
    random = TorchvisionExtractor("resnet18", layers=("layer1",), weights=None, image_size=32)
    torch.manual_seed(0)
    r0 = clone(random).fit().transform(X)
    torch.manual_seed(1)
    r1 = clone(random).fit().transform(X)
    torch.manual_seed(0)
    np.testing.assert_array_equal(clone(random).fit().transform(X), r0)
    assert not np.allclose(r0, r1)
    # Pretrained weights overwrite the initialisation, so fitting leaves the generator
    # alone, whether the memo is hit or missed.
    torch.manual_seed(0)
    untouched = torch.rand(3)
    for _ in range(2):
        torch.manual_seed(0)
        clone(ext).fit()
        np.testing.assert_array_equal(torch.rand(3), untouched)


def test_concurrent_fits_in_threads(labelled_textures, fresh_memos):
    from concurrent.futures import ThreadPoolExecutor

    X = labelled_textures[0][:2]
    ext = TorchvisionExtractor(image_size=64)
    with ThreadPoolExecutor(4) as pool:
        fitted = list(pool.map(lambda _: clone(ext).fit(), range(4)))
    assert len({id(e.model_) for e in fitted}) == 4
    expected = fitted[0].transform(X)
    for e in fitted[1:]:
        np.testing.assert_array_equal(e.transform(X), expected)


def test_forward_passes_in_one_thread_while_another_traces():
    # torch.fx patches torch.nn.Module for the whole process while it traces: a
    # transform in another thread meanwhile failed ("not installed as a submodule").
    import threading
    import time

    from conftest import TinyNet, textured_images

    X = textured_images(2, 32)

    def extractor():
        return TorchvisionExtractor(TinyNet(), layers=("block1", "block2"), weights=None,
                                    image_size=32, device="cpu")

    fitted = extractor().fit()  # modules are not memoised: every fit below traces
    expected = fitted.transform(X)
    stop, errors, counts = threading.Event(), [], {"fits": 0, "transforms": 0}

    def run(work, name):
        while not stop.is_set():
            try:
                work()
                counts[name] += 1
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(repr(exc))

    def check():
        np.testing.assert_array_equal(fitted.transform(X), expected)

    threads = [threading.Thread(target=run, args=(lambda: extractor().fit(), "fits")),
               threading.Thread(target=run, args=(check, "transforms"))]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert counts["fits"] > 5 and counts["transforms"] > 5, counts


def test_an_interrupted_trace_does_not_hold_forward_passes_back(monkeypatch):
    # Ctrl-C while a trace waits for running forward passes left a count behind,
    # and every later forward pass in the process waited for ever.
    import threading

    from skpadim.feature_extraction import _TraceGuard

    guard = _TraceGuard()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with guard.forward():  # a forward pass runs: the trace has to wait
        monkeypatch.setattr(guard._cond, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            with guard.trace():
                pass
        monkeypatch.undo()
    later = threading.Thread(target=lambda: guard.forward().__enter__(), daemon=True)
    later.start()
    later.join(timeout=5)
    assert not later.is_alive()


def _child_succeeds(check, timeout=20):
    """Fork; the child runs ``check`` and exits 0 if it returned, 1 if it raised.
    True if the child exited 0 within ``timeout`` seconds (else it is killed)."""
    import time

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            check()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not done:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return False
    return os.waitstatus_to_exitcode(status) == 0


def _use_every_lock():
    from skpadim import feature_extraction as fe

    with fe._FX_GUARD.forward():
        pass
    with fe._FX_GUARD.trace(), fe._BUILD_LOCK:
        fe._TRACED.clear()
        fe._RECENT.clear()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_is_not_held_by_locks_of_threads_it_lost():
    # A child made by os.fork has only the forking thread: a trace or build that
    # another thread was running kept its lock held in the child for ever.
    import threading

    from skpadim import feature_extraction as fe

    entered, leave = threading.Event(), threading.Event()

    def hold():
        with fe._BUILD_LOCK, fe._FX_GUARD.trace(), fe._TRACED._lock, fe._RECENT._lock:
            entered.set()
            leave.wait()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert entered.wait(5)
        assert _child_succeeds(_use_every_lock), "the forked child hung or failed"
        assert not _child_succeeds(lambda: 1 / 0)  # a failing child is seen as one
    finally:
        leave.set()
        holder.join(5)
    # The parent's own guard and locks are untouched by the fork handler.
    _use_every_lock()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_child_forked_inside_a_forward_pass_can_trace_once_out_of_it():
    # The forking thread's own pass stays counted in the child, and is undone
    # as it leaves it: dropped, the count went to -1 and every trace waited.
    from skpadim import feature_extraction as fe

    def leave_then_use_every_lock():
        forward.__exit__(None, None, None)
        _use_every_lock()

    forward = fe._FX_GUARD.forward()
    forward.__enter__()
    try:
        assert _child_succeeds(leave_then_use_every_lock), "the forked child hung or failed"
    finally:
        forward.__exit__(None, None, None)
    _use_every_lock()


def test_cache_finds_each_image_whatever_its_batch(labelled_textures, fresh_memos, tmp_path,
                                                   monkeypatch):
    X = labelled_textures[0][:12]
    embedded = _count_calls(monkeypatch, TorchvisionExtractor, "embed")
    n_embedded = lambda: sum(len(args[1]) for args in embedded)  # noqa: E731
    plain = TorchvisionExtractor(image_size=64, batch_size=5).fit()
    expected = plain.transform(X)
    embedded.clear()

    cached = clone(plain).set_params(memory=str(tmp_path), batch_size=4).fit()
    first = cached.transform(X[:8])
    assert n_embedded() == 8
    np.testing.assert_allclose(first, expected[:8], rtol=1e-5, atol=1e-5)
    # Other batches, overlapping: only the 4 new images go through the backbone.
    again = cached.set_params(batch_size=3).transform(X[4:])
    assert n_embedded() == 12
    np.testing.assert_allclose(again, expected[4:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again[:4], first[4:])
    assert again.image_shapes.tolist() == [[64, 64]] * 8
    # Writing into a result leaves the cached embeddings alone.
    again[:] = 0
    np.testing.assert_array_equal(cached.transform(X[:8]), first)
    # With the in-memory copies gone, the disk still serves them.
    fresh_memos._RECENT.clear()
    np.testing.assert_array_equal(cached.transform(X[:8]), first)
    assert n_embedded() == 12


def test_cache_keys_random_weights_by_their_values(fresh_memos, tmp_path):
    X = torch.rand(2, 3, 32, 32)
    ext = TorchvisionExtractor("resnet18", layers=("layer1",), weights=None, image_size=32,
                               memory=str(tmp_path))
    torch.manual_seed(0)
    r0 = clone(ext).fit().transform(X)
    torch.manual_seed(1)
    r1 = clone(ext).fit().transform(X)  # other random weights: not served from the cache
    assert not np.allclose(r0, r1)


def test_cache_keys_the_model_as_it_is_not_its_parameters(fresh_memos, tmp_path):
    # Each case: a model that computes something else under the same parameters
    # (or the same weights) must not be served the other's cached embeddings.
    X = torch.rand(2, 3, 32, 32)

    def fresh(ext):
        return clone(ext).set_params(memory=None).fit().transform(X)

    # Two modules sharing their weights but not their layers.
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    for second in (torch.nn.Sigmoid(), torch.nn.Tanh()):
        ext = TorchvisionExtractor(torch.nn.Sequential(conv, second), layers=("1",), weights=None,
                                   image_size=32, memory=str(tmp_path))
        np.testing.assert_allclose(clone(ext).fit().transform(X), fresh(ext), rtol=1e-6)
    # A fitted extractor whose model is changed in place.
    ext = TorchvisionExtractor("resnet18", layers=("layer1",), weights=None, image_size=32,
                               memory=str(tmp_path)).fit()
    before = ext.transform(X)
    with torch.no_grad():
        for p in ext.model_.parameters():
            p.mul_(0.5)
    assert not np.allclose(ext.transform(X), before)
    # A weights file replaced after a fit that read it: the new file's fit gets its own embeddings.
    path = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    old = TorchvisionExtractor("resnet18", layers=("layer1",), weights=str(path), image_size=32,
                               memory=str(tmp_path / "cache")).fit()
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    old.transform(X)  # cached under the old model
    np.testing.assert_allclose(clone(old).fit().transform(X), fresh(old), rtol=1e-6)


def test_cache_key_sees_every_tensor_and_is_hashed_once_per_change(fresh_memos, tmp_path,
                                                                   monkeypatch):
    from conftest import TinyNet

    class Scaled(TinyNet):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(()), persistent=False)  # not in state_dict

        def forward(self, x):
            return super().forward(x * self.scale)

    X = torch.rand(2, 3, 32, 32)
    ext = TorchvisionExtractor(Scaled(), layers=("block1", "block2"), weights=None, image_size=32,
                               memory=str(tmp_path)).fit()
    first = ext.transform(X)
    hashed = []
    original = fresh_memos._weights_digest
    monkeypatch.setattr(fresh_memos, "_weights_digest",
                        lambda tensors: hashed.append(1) or original(tensors))
    np.testing.assert_array_equal(ext.transform(X), first)
    assert not hashed  # unchanged model: the digest of its weights is kept
    ext.model_.scale.fill_(3.0)
    changed = ext.transform(X)
    assert len(hashed) == 1 and not np.allclose(changed, first)
    # A layer swapped in place changes no tensor, and is seen all the same.
    setattr(ext.model_.block1, "1", torch.nn.Sigmoid())  # was a ReLU
    assert not np.allclose(ext.transform(X), changed)


def test_pickled_module_extractor_refuses_a_backbone_changed_after_fit(tmp_path):
    # The fitted graph is rebuilt from the backbone module on load: if its owner
    # changed it since fit, the rebuilt model would compute something else.
    from conftest import TinyNet

    X = torch.rand(2, 3, 32, 32)
    module = TinyNet()
    ext = TorchvisionExtractor(module, layers=("block1", "block2"), weights=None, image_size=32).fit()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ext)).transform(X), ext.transform(X))
    ext.model_.train()  # a mode is not a change
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(ext))
    module.block1[1] = torch.nn.Sigmoid()  # was a ReLU
    with pytest.warns(UserWarning, match="backbone module differs from the one it was fitted with"):
        pickle.loads(pickle.dumps(ext))


def test_patch_embeddings_compare_with_numpy():
    from skpadim import PatchEmbeddings

    emb = PatchEmbeddings(np.zeros((2, 3, 4, 4)), image_shapes=[(8, 8), (8, 16)])
    assert np.allclose(emb, emb)  # indexes the result with (), which once failed
    assert emb[()].image_shapes.tolist() == [[8, 8], [8, 16]]


def test_recent_embeddings_are_bounded_and_read_only(fresh_memos):
    recent = fresh_memos._RecentEmbeddings(max_bytes=3 * 400)
    arrays = [np.full(100, i, np.float32) for i in range(5)]  # 400 bytes each
    for i, a in enumerate(arrays[:3]):
        recent.put(i, a)
    assert recent.get(0) is arrays[0]  # 0 is now the most recent
    recent.put(3, arrays[3])
    assert recent.get(1) is None and recent.get(0) is arrays[0]  # 1 was the least recent
    recent.put(4, np.zeros(1000, np.float32))  # larger than the whole budget: not kept
    assert recent.get(4) is None and recent._nbytes <= recent.max_bytes
    with pytest.raises(ValueError, match="read-only"):
        arrays[0][0] = 1.0


def test_cache_keys_the_device_and_library_versions(fresh_memos, tmp_path, monkeypatch):
    # Embeddings cached on another device or before an upgrade of the code that
    # computes them are not served: the same model and pixels miss the cache.
    import torchvision as tv

    import skpadim
    import skpadim.feature_extraction as fe

    X = torch.rand(2, 3, 32, 32)
    embedded = _count_calls(monkeypatch, TorchvisionExtractor, "embed")
    ext = TorchvisionExtractor("resnet18", layers=("layer1",), weights=None, image_size=32,
                               memory=str(tmp_path)).fit()
    first = ext.transform(X)
    np.testing.assert_array_equal(ext.transform(X), first)
    assert len(embedded) == 1  # the second call was served from the cache
    for module, name in ((torch, "__version__"), (tv, "__version__"), (skpadim, "__version__")):
        with monkeypatch.context() as m:
            m.setattr(module, name, "0.0.0-other")
            before = len(embedded)
            np.testing.assert_array_equal(ext.transform(X), first)  # same values: same code
            assert len(embedded) == before + 1, f"{module.__name__}.{name} is not in the key"
    assert len(embedded) == 4
    np.testing.assert_array_equal(ext.transform(X), first)
    assert len(embedded) == 4  # back on the original versions: served again
    # The device type: a GPU's embeddings differ from a CPU's in the last digits.
    key = ext._feature_key()
    monkeypatch.setattr(fe, "resolve_device", lambda device: torch.device("cuda", 0))
    gpu = {"name": "GPU A", "capability": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    other = ext._feature_key()
    assert other != key and other[:-1] == key[:-1]
    # GPUs of other models, and TF32 allowed or not, round differently too.
    seen = {other}
    gpu["name"] = "GPU B"
    seen.add(ext._feature_key())
    gpu["capability"] = (9, 0)
    before = ext._feature_key()
    seen.add(before)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        settings = [(torch.backends.cudnn.conv, "ieee"), (torch.backends.cuda.matmul, "tf32")]
    else:
        settings = [(torch.backends.cudnn, False), (torch.backends.cuda.matmul, True)]
    for owner, value in settings:
        # (Set and restored by hand: these are properties monkeypatch cannot see.)
        name = "fp32_precision" if isinstance(value, str) else "allow_tf32"
        old = getattr(owner, name)
        setattr(owner, name, value)
        try:
            seen.add(ext._feature_key())
        finally:
            setattr(owner, name, old)
    assert len(seen) == 5
    assert ext._feature_key() == before  # the settings restored: the same key

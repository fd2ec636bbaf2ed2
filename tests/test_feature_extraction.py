"""The feature extractor and PatchEmbeddings: their inputs checked, their geometry kept."""

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from skpadim import PatchEmbeddings, TorchvisionExtractor
from skpadim.feature_extraction import auto_image_size

IMAGES = np.random.RandomState(0).randint(0, 256, size=(2, 48, 48, 3)).astype(np.uint8)


def _resnet18(**params):
    return TorchvisionExtractor("resnet18", weights=None, image_size=48, device="cpu", **params)


# -- PatchEmbeddings ---------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    # reshape(-1, 2) once scrambled these into 3 shapes without a word.
    (dict(image_shapes=[(60, 80, 3), (60, 80, 3)]), r"image_shapes must be \(2, 2\)"),
    (dict(image_shapes=[(-1, 0), (4, 4)]), "image_shapes must hold positive integers"),
    (dict(image_shapes=[(4.5, 4), (4, 4)]), "image_shapes must hold positive integers"),
    (dict(resize_shape=(-5, 0)), "resize_shape must be 2 integers >= 1"),
    (dict(resize_shape=(8, 8, 8)), "resize_shape must be 2 integers >= 1"),
    # Read as image shapes before: "0 image shapes for 2 embeddings".
    (dict(crop_box=(1, 2)), "crop_box must be 4 integers >= 0"),
    (dict(resize_shape=(10, 10), crop_box=(5, 5, 8, 8)), "does not lie within resize_shape"),
])
def test_patch_embeddings_geometry_is_checked(params, message):
    with pytest.raises(ValueError, match=message):
        PatchEmbeddings(np.zeros((2, 3, 5, 5)), **params)


def test_patch_embeddings_keep_their_geometry_and_own_it():
    a = PatchEmbeddings(np.zeros((2, 3, 4, 4)), image_shapes=[(10, 20), (30, 40)], resize_shape=(16, 16))
    # Wrapped again, they keep it (np.asarray used to strip it).
    assert PatchEmbeddings(a).image_shapes.tolist() == [[10, 20], [30, 40]]
    assert PatchEmbeddings(a).resize_shape == (16, 16)
    # Copies shared the shapes array with the original: now read-only.
    for other in (a.copy(), copy.deepcopy(a)[:], a[:1]):
        with pytest.raises(ValueError, match="read-only"):
            other.image_shapes[0] = (1, 1)
    assert a.image_shapes.tolist() == [[10, 20], [30, 40]]
    # The caller's shapes are copied, not made read-only.
    shapes = np.array([(10, 20), (30, 40)], dtype=np.int64)
    PatchEmbeddings(np.zeros((2, 3, 4, 4)), image_shapes=shapes)
    shapes[0] = (1, 1)
    # A plain array viewed as embeddings gets the grid's geometry, as PatchEmbeddings(arr).
    view = np.zeros((2, 3, 4, 4)).view(PatchEmbeddings)
    assert view[:1].image_shapes.tolist() == [[4, 4]] and view.take([0], axis=0).shape == (1, 3, 4, 4)
    assert a.take_rows([]).shape == (0, 3, 4, 4)  # an empty list is no float index
    assert a.take_rows(np.array([False, True])).image_shapes.tolist() == [[30, 40]]
    with pytest.raises(IndexError):
        a.take_rows([0.5])
    assert pickle.loads(pickle.dumps(a)).image_shapes.tolist() == [[10, 20], [30, 40]]
    # Methods that regroup the axes give plain arrays (they kept two shapes on 1-D data).
    for out in (a.flatten(), a.diagonal(), a.ravel()):
        assert type(out) is np.ndarray


# -- TorchvisionExtractor ----------------------------------------------------------


def test_sequential_backbone_names_its_layers():
    # Names "0", "1", ... and "input" could not be sorted for the message.
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
    with pytest.raises(ValueError, match="layers must be given .* valid names include: 0, 1, 2, input"):
        TorchvisionExtractor(seq, image_size=48).fit(IMAGES)
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['conv1'\]"):
        TorchvisionExtractor(seq, layers=("conv1",), image_size=48).fit(IMAGES)
    emb = TorchvisionExtractor(seq, layers=("0", "2"), image_size=48).fit(IMAGES).transform(IMAGES)
    assert emb.shape == (2, 24, 24, 24)


def test_fit_names_what_is_not_images_even_with_a_fixed_size():
    # With a fixed image_size fit never reads X, and took anything.
    with pytest.raises(TypeError, match="single path"):
        _resnet18().fit("not images")
    with pytest.raises(TypeError, match="expected images .*, got int"):
        _resnet18().fit(5)
    assert _resnet18().fit().n_channels_ == _resnet18().fit(IMAGES).n_channels_


def test_layers_without_a_feature_map_are_refused_at_fit():
    # fit accepted them; transform then failed unpacking a 2-D shape.
    for layers in (("fc",), ("layer1", "flatten")):
        with pytest.raises(ValueError, match="outputs shape .* not a feature map"):
            _resnet18(layers=layers).fit(IMAGES)


def test_pickle_rebuilds_the_fitted_backbone_after_set_params():
    # It rebuilt the backbone the parameter named at pickling time: unloadable.
    ext = _resnet18().fit(IMAGES)
    expected = np.asarray(ext.transform(IMAGES))
    ext.set_params(backbone="resnet34")
    restored = pickle.loads(pickle.dumps(ext))
    np.testing.assert_array_equal(np.asarray(restored.transform(IMAGES)), expected)


def test_embed_checks_values_as_transform_does():
    ext = _resnet18().fit(IMAGES)
    with pytest.raises(ValueError, match=r"images\[0\]: image contains NaN"):
        ext.embed([torch.full((3, 48, 48), float("nan"))])
    with pytest.raises(ValueError, match=r"images\[1\]: float images must lie in \[0, 1\]"):
        ext.embed([torch.zeros(3, 48, 48), torch.full((3, 48, 48), 300.0)])
    with pytest.raises(ValueError, match="got 0 images"):
        ext.embed([])


@pytest.mark.parametrize("X, message", [
    # Read as (H, W) = (3, 100): 224 x 896 instead of what transform refuses.
    (np.zeros((2, 3, 100, 200), np.uint8), "channels-last"),
    (np.zeros((2, 100, 200, 4), np.uint8), "alpha channel"),
    (torch.zeros(2, 5, 10, 10), r"torch tensor of shape \(n, 3, H, W\)"),
    (PatchEmbeddings(np.zeros((2, 8, 10, 10))), "got patch embeddings of shape .*, not images"),
    (PatchEmbeddings(np.zeros((2, 8, 10, 3))), "got patch embeddings of shape .*, not images"),
])
def test_auto_image_size_checks_the_layout_as_transform_does(X, message):
    with pytest.raises(ValueError, match=message):
        auto_image_size(X)
    with pytest.raises(ValueError, match=message):
        TorchvisionExtractor("resnet18", weights=None).fit(X)


def test_auto_image_size_refuses_a_cap_below_the_short_side():
    with pytest.raises(ValueError, match=r"max_long_side \(100\) must be at least short_side \(224\)"):
        auto_image_size(None, max_long_side=100)

"""Bad input gets a clear error naming the culprit; a failed fit loses nothing."""

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from sklearn.base import clone
from sklearn.utils._param_validation import InvalidParameterError

from conftest import textured_images
from skpadim import PatchCovariance, PatchEmbeddings, PatchGaussianDetector, TorchvisionExtractor
from skpadim._images import iter_image_batches


def _convert(X, batch_size=4):
    return [img for batch in iter_image_batches(X, batch_size) for img in batch]


# -- property-based: the image validator either converts or explains -----------------

image_shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda s: st.sampled_from([s, s + (1,), s + (3,), s + (2,), s + (4,), s[1:]])
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays(
        dtype=st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, np.float64, np.bool_]),
        shape=image_shapes,
    )
)
def test_image_validator_converts_or_explains(X):
    try:
        images = _convert(X)
    except (ValueError, TypeError) as exc:
        assert str(exc).startswith("X"), exc  # the message names the input at fault
        return
    assert len(images) == len(X)
    for img in images:
        assert img.dtype == torch.float32 and img.shape[0] == 3
        assert img.shape[1:] == X.shape[1:3]
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 255), min_size=1, max_size=4),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
def test_float_images_outside_unit_range_or_nonfinite_are_rejected(values, bad):
    X = np.zeros((len(values), 4, 4), np.float32) + np.array(values, np.float32)[:, None, None] / 255
    X[-1, 0, 0] = bad
    if np.isfinite(bad) and 0 <= bad <= 1:
        assert len(_convert(X)) == len(values)
    else:
        with pytest.raises(ValueError, match=r"NaN or infinite|must lie in \[0, 1\]"):
            _convert(X)


def test_dtypes_and_ranges():
    np.testing.assert_allclose(_convert(np.full((1, 4, 4), 65535, np.uint16))[0], 1.0)
    np.testing.assert_allclose(_convert(np.full((1, 4, 4), 51, np.int64))[0], 0.2)
    with pytest.raises(ValueError, match=r"8-bit values 0..255.*\[0, 300\]"):
        _convert(np.array([[[0, 300]]], np.int32))
    with pytest.raises(ValueError, match=r"X\[1\]: .*\(H, W\), \(H, W, 1\) or \(H, W, 3\)"):
        _convert([np.zeros((4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8)])
    with pytest.raises(TypeError, match="single path"):
        _convert("image.png")
    with pytest.raises(TypeError, match=r"X\[0\]: unsupported image of type dict"):
        _convert([{}])
    with pytest.raises(TypeError, match="bool"):
        _convert(np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match=r"torch tensor of shape \(n, 3, H, W\)"):
        _convert(torch.zeros(2, 4, 4, 3))
    # Embeddings that lost their type (np.concatenate) are named as such.
    with pytest.raises(ValueError, match=r"got shape \(2, 8, 5, 6\)\. Patch embeddings .* PatchEmbeddings"):
        _convert(np.zeros((2, 8, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"channels-last: transpose to \(n, H, W, 3\)"):
        _convert(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"alpha channel \(RGBA\)"):
        _convert(np.zeros((2, 8, 8, 4), np.uint8))


def test_more_dtypes_are_converted_or_named():
    # Byte-swapped and wide-integer data hold the same pixels as native uint8.
    ref = _convert(np.full((1, 4, 4), 51, np.uint8))[0]
    for X in (np.full((1, 4, 4), 51 / 255, ">f4"), np.full((1, 4, 4), 51 * 257, ">u2"),
              np.full((1, 4, 4), 51, np.uint32), np.full((1, 4, 4), 51, np.uint64),
              np.full((1, 4, 4), 51 / 255, np.longdouble)):
        np.testing.assert_allclose(_convert(X)[0], ref, rtol=1e-6)
        np.testing.assert_allclose(_convert(list(X))[0], ref, rtol=1e-6)
    with pytest.raises(ValueError, match=r"X\[0:1\]: .*uint32 must hold 8-bit values"):
        _convert(np.full((1, 4, 4), 300, np.uint32))
    with pytest.raises(TypeError, match=r"X\[0:1\]: images must be .* got dtype <U1"):
        _convert(np.full((1, 4, 4), "a"))
    with pytest.raises(ValueError, match=r"X: images of shape \(0, 5\) have no pixels"):
        _convert(np.zeros((2, 0, 5), np.uint8))
    with pytest.raises(ValueError, match=r"X\[0\]: image of shape \(0, 0, 3\) has no pixels"):
        _convert([np.zeros((0, 0, 3), np.uint8)])


def test_one_image_is_not_read_as_a_batch():
    # (H, W, 1) was read as H greyscale images one pixel wide, and scored as such.
    for channels in (1, 3, 4):
        with pytest.raises(ValueError, match=r"looks like one image.*X\[None\]"):
            _convert(np.zeros((32, 32, channels), np.uint8))
    assert len(_convert(np.zeros((32, 32, 3), np.uint8)[None])) == 1
    assert len(_convert(np.zeros((32, 32, 1), np.uint8)[None])) == 1


def test_an_empty_image_left_after_labels_is_named_by_its_index_in_X(tiny_extractor, normal_images):
    # The automatic frame counted positions among the images kept by y.
    X = list(normal_images[:5]) + [np.zeros((0, 40, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"X\[5\]: an image of shape \(0, 40\) has no pixels"):
        PatchGaussianDetector(clone(tiny_extractor).set_params(image_size="auto")).fit(X, [0, 1, 0, 0, 0, 0])


@pytest.mark.parametrize("name, value", [("mean", (0.5,)), ("mean", ("a", "b", "c")),
                                         ("std", (0.2, 0.0, 0.2)), ("std", (1, 2, float("nan")))])
def test_normalisation_statistics_are_checked_at_fit(tiny_extractor, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be three .*; got {re.escape(repr(value))}"):
        tiny_extractor.set_params(**{name: value}).fit()


def test_read_only_arrays_are_read_without_warning():
    X = np.zeros((2, 4, 4, 3), np.uint8)
    X.setflags(write=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_convert(X)) == 2


def test_a_folder_or_single_path_is_named_whatever_the_image_size(tiny_extractor, tmp_path):
    # Not read as a sequence of one-character paths, nor as a one-shot iterator.
    for size in ("auto", 32):
        det = PatchGaussianDetector(tiny_extractor.set_params(image_size=size))
        for X in (str(tmp_path), tmp_path):
            with pytest.raises(TypeError, match="single path"):
                det.fit(X)
    with pytest.raises(TypeError, match="single path"):
        TorchvisionExtractor(weights=None).fit(str(tmp_path))


def test_32_bit_integer_files_of_8_bit_values_read_as_8_bit(tmp_path):
    # As integer arrays are read, and as skpadim.datasets.load_images reads them.
    from skpadim.datasets import load_images

    values = np.arange(30, dtype=np.int32).reshape(6, 5) * 8
    Image.fromarray(values.astype(np.uint8)).convert("I").save(tmp_path / "i.tiff")
    expected = torch.from_numpy(values.astype(np.float32) / 255)
    torch.testing.assert_close(_convert([tmp_path / "i.tiff"])[0][0], expected)
    np.testing.assert_array_equal(load_images([tmp_path / "i.tiff"])[0][..., 0], values)


@pytest.mark.parametrize("kind", ["uint16", "int32", "float32"])
def test_deep_image_files_keep_their_range(tmp_path, kind):
    # 16-bit PNGs (opened as "I;16", or "I" by older PIL) and float TIFFs ("F")
    # must read as the arrays they hold, not clipped to 8 bits through RGB.
    rng = np.random.RandomState(0)
    if kind == "float32":
        values, scale, path = rng.rand(6, 5).astype(np.float32), 1.0, tmp_path / "f.tiff"
        Image.fromarray(values).save(path)
    else:
        values, scale = rng.randint(0, 65536, (6, 5)).astype(np.uint16), 65535.0
        img = Image.fromarray(values)
        path = tmp_path / ("d.tiff" if kind == "int32" else "d.png")  # PNG cannot hold mode "I"
        (img.convert("I") if kind == "int32" else img).save(path)
    expected = torch.from_numpy(values.astype(np.float32) / scale)
    for image in (_convert([path])[0], _convert([Image.open(path)])[0]):
        assert image.shape == (3, 6, 5)
        torch.testing.assert_close(image[0], expected, rtol=1e-6, atol=1e-7)


def test_mixed_sizes_and_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    buf = tmp_path / "full.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).save(buf)
    truncated.write_bytes(buf.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    images = _convert([good, np.zeros((3, 9), np.uint8), torch.zeros(3, 2, 2)])
    assert [tuple(i.shape) for i in images] == [(3, 5, 7), (3, 3, 9), (3, 2, 2)]
    with pytest.raises(ValueError, match=r"X\[1\]: cannot read image file .*truncated.png"):
        _convert([good, truncated])
    with pytest.raises(ValueError, match=r"X\[0\]: cannot read image file .*garbage.jpg"):
        _convert([garbage])
    with pytest.raises(FileNotFoundError, match=r"X\[2\]: image file .*missing.png' does not exist"):
        _convert([good, good, tmp_path / "missing.png"])


# -- parameters ----------------------------------------------------------------------


def test_extractor_parameter_errors():
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        TorchvisionExtractor("resnet1800").fit()
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['layer9'\].*layer1, layer1.0"):
        TorchvisionExtractor("resnet18", layers=("layer1", "layer9"), weights=None).fit()
    with pytest.raises(FileNotFoundError, match="TORCH_HOME"):
        TorchvisionExtractor("resnet18").fit()  # no cached weights, no download
    with pytest.raises(ValueError, match="weights='NOPE' is not known for resnet18"):
        TorchvisionExtractor("resnet18", weights="NOPE").fit()
    with pytest.raises(FileNotFoundError, match="no file at"):
        TorchvisionExtractor("resnet18", weights="/does/not/exist.pth").fit()
    with pytest.raises(ValueError, match="crop_size"):
        TorchvisionExtractor(weights=None, image_size=32, crop_size=64).fit()
    with pytest.raises(ValueError, match="image_size"):
        TorchvisionExtractor(weights=None, image_size=8).fit()
    from conftest import TinyNet

    with pytest.raises(ValueError, match="layers must be given for backbone TinyNet"):
        TorchvisionExtractor(TinyNet(), weights=None).fit()
    # A pair is not truncated or converted: its entries must be ints already.
    for bad in ((32.7, 40.2), ("a", "b"), (True, 32), (32, 40, 48)):
        with pytest.raises(ValueError, match=r"image_size must be an int or a pair \(H, W\) of ints"):
            TorchvisionExtractor(weights=None, image_size=bad).fit()
    with pytest.raises(ValueError, match=r"crop_size must be an int or a pair"):
        TorchvisionExtractor(weights=None, image_size=32, crop_size=(20.9, 20.9)).fit()
    assert TorchvisionExtractor(weights=None, image_size=(np.int64(32), 48)).fit().resize_shape_ == (32, 48)


def test_local_state_dict_is_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    ext = TorchvisionExtractor("resnet18", weights=str(tmp_path / "r18.pth"), image_size=32).fit()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(reference.children())[:5]).eval()(x)
    np.testing.assert_allclose(ext.model_(x)["layer1"].detach(), expected, rtol=1e-5, atol=1e-6)


def test_cuda_requested_without_gpu(tiny_extractor, normal_images):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so asking for one is not an error")
    with pytest.raises(RuntimeError, match="device='cuda' was requested"):
        PatchGaussianDetector(tiny_extractor, n_features=4, device="cuda").fit(normal_images)
    tiny_extractor.set_params(device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        PatchGaussianDetector(tiny_extractor, n_features=4).fit(normal_images)


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0), "auto"])
def test_cpu_devices_are_accepted_in_any_spelling(tiny_extractor, normal_images, device):
    det = PatchGaussianDetector(tiny_extractor, n_features=4, device=device).fit(normal_images)
    assert clone(det).get_params()["device"] == device
    assert np.isfinite(det.score_samples(normal_images[:2])).all()


def test_indexed_cuda_device_is_accepted_and_checked(tiny_extractor, normal_images):
    # "cuda:1" is how torch users name a GPU: it is a valid value, refused only
    # where there is no GPU, with the same message as "cuda".
    det = PatchGaussianDetector(tiny_extractor, n_features=4, device="cuda:1")
    assert clone(det).get_params()["device"] == "cuda:1"
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so asking for one is not an error")
    with pytest.raises(RuntimeError, match="device='cuda:1' was requested"):
        det.fit(normal_images)


@pytest.mark.parametrize("tiled", [False, True])
def test_setting_a_fitted_detectors_devices_moves_where_it_scores(tiny_extractor, normal_images, tiled):
    # A model fitted with device="cuda", loaded on a machine without a GPU,
    # kept asking for one after set_params(device="cpu"): its fitted Gaussian
    # and extractor held their own copies of the devices. Emulated on a CPU by
    # moving a CPU-fitted model to "cuda" and back.
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so moving a model to it is not an error")
    from skpadim import TiledDetector

    det = PatchGaussianDetector(tiny_extractor, n_features=4, random_state=0, device="cpu")
    prefix = ""
    if tiled:
        det, prefix = TiledDetector(det, short_side=32, window=(32, 32)), "detector__"
    expected = det.fit(normal_images).score_samples(normal_images[:3])
    for key in ("device", "feature_extractor__device"):
        det.set_params(**{prefix + key: "cuda"})
        with pytest.raises(RuntimeError, match="device='cuda' was requested"):
            det.score_samples(normal_images[:3])
        det.set_params(**{prefix + key: "cpu"})
        np.testing.assert_array_equal(det.score_samples(normal_images[:3]), expected)
    assert clone(det).get_params()[prefix + "device"] == "cpu"
    # Unfitted, only the parameters change.
    unfitted = PatchGaussianDetector(tiny_extractor, n_features=4).set_params(device="cuda")
    assert unfitted.device == "cuda" and not hasattr(unfitted, "gaussian_")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta", 3])
def test_misspelt_devices_are_named_before_any_work(monkeypatch, tiny_extractor, normal_images,
                                                     device):
    # Strings reach check_device; other types are refused by the parameter constraints.
    expected, message = (ValueError, "device must be 'auto'") if isinstance(device, str) else (
        InvalidParameterError, "'device' parameter")
    built = []
    traced = TorchvisionExtractor._traced_backbone
    monkeypatch.setattr(TorchvisionExtractor, "_traced_backbone",
                        lambda self, shape: built.append(shape) or traced(self, shape))
    det = PatchGaussianDetector(tiny_extractor, n_features=4, device=device)
    with pytest.raises(expected, match=message):
        det.fit(normal_images)
    ext = clone(tiny_extractor).set_params(device=device)
    with pytest.raises(expected, match=message):
        ext.fit(normal_images)
    assert built == []  # neither fit got as far as building the backbone
    with pytest.raises(expected, match=message):
        PatchCovariance(device=device).fit(np.zeros((4, 3, 2, 2), np.float32))


@pytest.mark.parametrize("name", ["short_side", "multiple", "max_long_side"])
@pytest.mark.parametrize("value", [0, -32, 224.0, True])
def test_auto_image_size_names_a_bad_setting(name, value):
    from skpadim.feature_extraction import auto_image_size

    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        auto_image_size(None, **{name: value})


def test_auto_image_size_of_no_images_is_named():
    from skpadim.feature_extraction import auto_image_size

    for empty in (np.zeros((0, 32, 48, 3), np.uint8), torch.zeros((0, 3, 32, 48)), []):
        with pytest.raises(ValueError, match="got 0 images"):
            auto_image_size(empty)


def test_auto_image_size_counts_portrait_and_landscape_alike():
    from skpadim.feature_extraction import auto_image_size

    mixed = [np.zeros((100, 200, 3), np.uint8), np.zeros((200, 100, 3), np.uint8)] * 2
    assert auto_image_size(mixed) == (224, 224)
    assert auto_image_size(mixed + [mixed[0]]) == (224, 448)  # the landscape ones prevail
    with pytest.raises(ValueError, match=r"X\[0\]: an image of shape \(10, 0\) has no pixels"):
        auto_image_size(np.zeros((2, 10, 0, 3), np.uint8))


def test_embed_takes_float_tensors_and_names_others(tiny_extractor):
    ext = clone(tiny_extractor).fit()
    image = torch.rand(3, 32, 32)
    assert ext.embed([image, image.double()]).shape[0] == 2
    for bad in ((image * 255).to(torch.uint8), image[0], np.zeros((3, 32, 32), np.float32)):
        with pytest.raises(ValueError, match=r"images\[1\]: embed takes float tensors \(3, H, W\)"):
            ext.embed([image, bad])


def test_embeddings_of_non_real_dtypes_are_refused_when_made():
    # Refused at construction, whatever step would read them next: the
    # detector accepted booleans with pooling (which casts to float first) and
    # refused them without; objects met torch's own message.
    for data in (np.ones((4, 2, 2, 2), dtype=bool), np.full((4, 2, 2, 2), "a", dtype=object),
                 np.ones((4, 2, 2, 2), dtype=complex), np.ones((4, 2, 2, 2), dtype="timedelta64[s]")):
        dtype = re.escape(str(data.dtype))
        with pytest.raises(TypeError, match=f"PatchEmbeddings: .*real numbers, got dtype {dtype}"):
            PatchEmbeddings(data)
    # Integers are real numbers, whatever the pooling.
    ints = np.random.RandomState(0).randint(0, 9, size=(6, 2, 3, 3))
    for pooling in (1, 3):
        PatchGaussianDetector(n_features=None, pooling=pooling).fit(PatchEmbeddings(ints))


def test_too_few_images_for_a_tiny_fixed_shrinkage(tiny_extractor, normal_images):
    # Ledoit-Wolf is well defined for any number of images; a tiny eps is not.
    PatchGaussianDetector(tiny_extractor, n_features=8).fit(normal_images[:3])
    with pytest.warns(UserWarning, match="singular"):
        PatchGaussianDetector(tiny_extractor, n_features=8, shrinkage=1e-6).fit(normal_images[:3])


def test_detector_parameter_errors(tiny_extractor, normal_images):
    for params, match in [
        ({"contamination": 0.7}, "contamination"),
        ({"sigma": -1}, "sigma"),
        ({"batch_size": 0}, "batch_size"),
        ({"shrinkage": "oas"}, "shrinkage"),
        ({"feature_extractor": "resnet18"}, "feature_extractor"),
    ]:
        with pytest.raises(ValueError, match=match):
            PatchGaussianDetector(**{"feature_extractor": tiny_extractor, **params}).fit(normal_images)


# -- failure without loss ------------------------------------------------------------


class _Interrupting:
    """A sequence of images whose iteration is interrupted after ``stop`` images."""

    def __init__(self, images, stop):
        self.images, self.stop = images, stop

    def __len__(self):
        return len(self.images)

    def __iter__(self):
        for i, img in enumerate(self.images):
            if i == self.stop:
                raise KeyboardInterrupt
            yield img


@pytest.mark.parametrize("stop", [3, 20])
def test_interrupted_refit_keeps_the_fitted_state(tiny_extractor, normal_images, test_images, stop):
    det = PatchGaussianDetector(tiny_extractor, n_features=8, random_state=0, batch_size=4)
    det.fit(normal_images)
    before_scores = det.score_samples(test_images)
    before_params = det.get_params()
    other = textured_images(24, seed=9)
    with pytest.raises(KeyboardInterrupt):
        det.set_params(n_features=6).fit(_Interrupting(list(other), stop))
    det.set_params(**{k: v for k, v in before_params.items() if "__" not in k})
    np.testing.assert_array_equal(det.score_samples(test_images), before_scores)
    assert det.channel_indices_.shape == (8,)


def test_failed_partial_fit_keeps_statistics():
    X = np.random.RandomState(0).randn(20, 3, 2, 2)
    est = PatchCovariance().partial_fit(X[:10])
    before = est.covariance_.copy()
    bad = X[10:].copy()
    bad[3, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        est.partial_fit(bad)
    np.testing.assert_array_equal(est.covariance_, before)
    # Nor does a precision changed between batches.
    with pytest.raises(ValueError, match="dtype='float64' differs .* before the first partial_fit"):
        est.set_params(dtype="float64").partial_fit(X[10:])
    np.testing.assert_array_equal(est.covariance_, before)
    est.set_params(dtype="float32").partial_fit(X[10:])
    np.testing.assert_allclose(est.covariance_, PatchCovariance().fit(X).covariance_, rtol=1e-5)


# -- determinism ---------------------------------------------------------------------


def test_same_data_and_seed_give_identical_results(tiny_extractor, normal_images, test_images):
    runs = [
        PatchGaussianDetector(tiny_extractor, n_features=8, random_state=3).fit(normal_images)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].channel_indices_, runs[1].channel_indices_)
    np.testing.assert_array_equal(runs[0].anomaly_maps(test_images), runs[1].anomaly_maps(test_images))
    np.testing.assert_array_equal(runs[0].score_samples(test_images), runs[1].score_samples(test_images))


def test_fit_transform_reads_a_one_shot_iterator_once(tiny_extractor, normal_images):
    ext = tiny_extractor.set_params(image_size="auto")
    emb = ext.fit_transform(iter(list(normal_images[:3])))
    np.testing.assert_array_equal(emb, clone(ext).fit(normal_images[:3]).transform(normal_images[:3]))

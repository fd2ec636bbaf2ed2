"""Turn the image formats users hold into float tensors, validating as we go.

Accepted inputs (see :func:`iter_image_batches`):

* a numpy array ``(n, H, W, 3)``, ``(n, H, W, 1)`` or ``(n, H, W)``, of dtype
  uint8 (0..255), uint16 (0..65535) or float (0..1);
* a torch tensor ``(n, 3, H, W)`` or ``(n, 1, H, W)``, uint8 or float in [0, 1];
* a sequence (list, tuple) or iterator of image file paths, of 2-D / 3-D numpy
  arrays of possibly different sizes, or of PIL images.

Every image comes out as a float32 tensor ``(3, H, W)`` in [0, 1]; greyscale is
replicated to three channels because ImageNet backbones expect RGB.
"""

import itertools
import os
from pathlib import Path

import numpy as np
import torch

from ._memory import release_freed_memory

__all__ = ["iter_image_batches", "count_images", "image_shapes", "ValidatedImages"]


def _is_path(obj):
    return isinstance(obj, (str, os.PathLike))


def _load_path(path, where):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: image file {str(path)!r} does not exist.")
    try:
        with Image.open(path) as img:
            img.load()  # force decoding now so a truncated file fails here
            return _pil_to_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(
            f"{where}: cannot read image file {str(path)!r} ({exc})."
        ) from exc


def _pil_to_array(img):
    """A PIL image as a numpy array with its full range of values.

    8-bit modes (RGB, greyscale, palette, with alpha, CMYK...) become uint8 RGB.
    One-channel modes of more bits are not converted to RGB, which would clip
    them to 0..255: 16-bit images ("I;16...") become uint16, scaled by 65535
    like 16-bit arrays; 32-bit integer images ("I", as which older PIL also
    opens 16-bit PNGs) become uint8 when every value fits 8 bits, as integer
    arrays are read, and uint16 otherwise; float images ("F") stay float, to
    lie in [0, 1] like float arrays. Colour images of 16 bits per channel are
    opened by PIL as 8-bit RGB already.
    """
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"32-bit integer image with values in [{values.min()}, {values.max()}]; "
                "expected 8-bit or 16-bit values"
            )
        return values.astype(np.uint8 if values.max(initial=0) <= 255 else np.uint16)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    return np.asarray(img.convert("RGB"))


def _array_to_tensor(img, where):
    """One image as numpy (H, W), (H, W, 1) or (H, W, 3) -> float tensor (3, H, W)."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(
            f"{where}: expected an image of shape (H, W), (H, W, 1) or (H, W, 3), "
            f"got shape {img.shape}."
        )
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{where}: image of shape {img.shape} has no pixels.")
    img = _as_torch_compatible(img, where)
    # A copy where needed: PIL hands out read-only buffers that torch cannot wrap.
    img = np.ascontiguousarray(img) if img.flags.writeable else np.array(img)
    return _to_unit_float(torch.from_numpy(img), where).permute(2, 0, 1)


def _as_torch_compatible(a, where):
    """A numpy image array in a dtype torch can wrap, or a TypeError naming it.

    Byte-swapped data is put in native order, wide unsigned integers (uint32,
    uint64) become int64 (then checked as 8-bit values like other integers),
    long doubles become float64; strings, objects and the like are refused.
    """
    kind = a.dtype.kind
    if kind not in "biufc":
        raise TypeError(
            f"{where}: images must be uint8 (0..255), uint16 or float (0..1), got dtype {a.dtype}."
        )
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if kind == "u" and a.dtype.itemsize > 2:
        if a.size and a.max() > 255:
            raise ValueError(
                f"{where}: integer images of dtype {a.dtype} must hold 8-bit values 0..255, "
                f"got values up to {a.max()}; pass 16-bit data as uint16."
            )
        a = a.astype(np.int64)
    elif kind == "f" and a.dtype.itemsize > 8:
        a = a.astype(np.float64)
    return a


def _to_unit_float(t, where):
    """uint8 -> /255, uint16 -> /65535, other integers in 0..255 -> /255,
    float -> checked to lie in [0, 1]; anything else rejected."""
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0
    if t.dtype == torch.uint16:  # 16-bit cameras
        return t.to(torch.float32) / 65535.0
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(
            f"{where}: images must be uint8 (0..255), uint16 or float (0..1), got dtype "
            f"{str(t.dtype).replace('torch.', '')}."
        )
    if not t.is_floating_point():
        # int32/int64 arrays often hold 8-bit values (np.array of Python ints).
        if t.numel() and (t.min() < 0 or t.max() > 255):
            raise ValueError(
                f"{where}: integer images of dtype {str(t.dtype).replace('torch.', '')} must "
                f"hold 8-bit values 0..255, got values in [{int(t.min())}, {int(t.max())}]; "
                "pass 16-bit data as uint16."
            )
        return t.to(torch.float32) / 255.0
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: image contains NaN or infinite values.")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(
            f"{where}: float images must lie in [0, 1], got values in "
            f"[{float(t.min()):.4g}, {float(t.max()):.4g}]; divide uint8 data by 255 "
            "or pass it as uint8."
        )
    return t


def _batch_array_to_tensors(X, start):
    """A whole numpy batch (n, H, W[, C]) -> float tensor (n, 3, H, W)."""
    _check_pixel_batch_layout(X)
    if X.ndim == 4 and X.shape[-1] == 1:
        X = X[..., 0]
    if X.ndim == 3:
        X = np.repeat(X[..., None], 3, axis=-1)
    where = f"X[{start}:{start + len(X)}]"
    if X.shape[1] == 0 or X.shape[2] == 0:
        raise ValueError(f"X: images of shape {X.shape[1:3]} have no pixels.")
    X = _as_torch_compatible(X, where)
    # Read-only input (a memory map, a frozen array) is copied: torch cannot
    # wrap it without a warning, and it is never written to.
    X = np.ascontiguousarray(X) if X.flags.writeable else np.array(X)
    return _to_unit_float(torch.from_numpy(X), where).permute(0, 3, 1, 2)


def _check_pixel_batch_layout(X):
    """A numpy batch must be (n, H, W), (n, H, W, 1) or (n, H, W, 3); else a
    ValueError with a hint at what it likely is."""
    if hasattr(X, "image_shapes"):  # PatchEmbeddings, whatever their grid
        raise ValueError(f"X: got patch embeddings of shape {X.shape}, not images.")
    if not (X.ndim == 3 or (X.ndim == 4 and X.shape[-1] in (1, 3))):
        hint = ""
        if X.ndim == 4 and X.shape[1] in (1, 3):
            hint = (" Numpy images are channels-last: transpose to (n, H, W, 3), or pass a "
                    "torch tensor (n, 3, H, W).")
        elif X.ndim == 4 and X.shape[-1] == 4:
            hint = " Images with an alpha channel (RGBA) must be converted to RGB."
        elif X.ndim == 4:
            # (n, C, h, w) embeddings lose their type to np.concatenate and the like.
            hint = (" Patch embeddings (n, C, h, w) must come as PatchEmbeddings; wrap them "
                    "with skpadim.PatchEmbeddings(X) (PatchGaussianDetector only).")
        raise ValueError(
            "X: expected a numpy array of shape (n, H, W), (n, H, W, 1) or (n, H, W, 3), "
            f"got shape {X.shape}.{hint}"
        )


def _check_tensor_batch_layout(X):
    if X.ndim != 4 or X.shape[1] not in (1, 3):
        raise ValueError(
            "X: expected a torch tensor of shape (n, 3, H, W) or (n, 1, H, W), got "
            f"shape {tuple(X.shape)}."
        )


def _batch_tensor_to_tensors(X, start):
    _check_tensor_batch_layout(X)
    where = f"X[{start}:{start + len(X)}]"
    t = _to_unit_float(X.detach().cpu(), where)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t


def _item_to_tensor(item, index):
    where = f"X[{index}]"
    if _is_path(item):
        return _array_to_tensor(_load_path(item, where), where)
    if isinstance(item, torch.Tensor):
        if item.ndim == 2:
            item = item[None]
        if item.ndim != 3 or item.shape[0] not in (1, 3):
            raise ValueError(
                f"{where}: expected a tensor of shape (3, H, W), (1, H, W) or (H, W), "
                f"got shape {tuple(item.shape)}."
            )
        t = _to_unit_float(item.detach().cpu(), where)
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        try:
            values = _pil_to_array(item)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}.") from None
        return _array_to_tensor(values, where)
    if isinstance(item, np.ndarray):
        return _array_to_tensor(item, where)
    raise TypeError(
        f"{where}: unsupported image of type {type(item).__name__}; expected a file "
        "path, a numpy array, a torch tensor or a PIL image."
    )


class ImageSubset(list):
    """Some of the images of a sequence X, with their ``positions`` in it.

    A fit that keeps only some images (those labelled normal, the halves of a
    trimmed fit) validates them in this form, so that an error names the image
    by its index in the caller's X, not in the subset.
    """

    def __init__(self, images, positions):
        super().__init__(images)
        self.positions = np.asarray(positions, dtype=np.int64)


def _position(X, i):
    """The index in the caller's X of the image at ``i`` in X."""
    positions = getattr(X, "positions", None)
    return i if positions is None else int(positions[i])


def image_subset(X, keep):
    """The images ``keep`` (indices) of X, as an :class:`ImageSubset`.

    Arrays and tensors are taken image by image (views, no copy), to be
    validated so from here on: their layout, with the hints the whole-batch
    path gives, is checked now, on the whole batch.
    """
    if _is_pixel_batch(X):
        _check_batch_shape(X)
        _check_pixel_batch_layout(X)
    elif isinstance(X, torch.Tensor):
        _check_tensor_batch_layout(X)
    positions = [_position(X, i) for i in keep]
    if hasattr(X, "iloc"):  # pandas: by position, whatever the index's labels
        return ImageSubset(X.iloc[keep], positions)
    return ImageSubset([X[i] for i in keep], positions)


class ValidatedImages(list):
    """A list of float tensors (3, H, W) in [0, 1] that already passed validation.

    The detector converts and checks its input once, then hands batches to the
    feature extractor in this form so that they are not checked a second time.
    """


def _shape_of(item, index):
    if _is_path(item):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(item) as img:  # reads the header only
                return img.size[1], img.size[0]
        except FileNotFoundError:
            raise FileNotFoundError(f"X[{index}]: image file {str(item)!r} does not exist.") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"X[{index}]: cannot read image file {str(item)!r} ({exc}).") from exc
    if isinstance(item, torch.Tensor):
        return tuple(item.shape[-2:])
    if hasattr(item, "convert") and hasattr(item, "size"):
        return item.size[1], item.size[0]
    shape = np.shape(item)
    if len(shape) < 2:
        raise ValueError(f"X[{index}]: expected an image, got shape {shape}.")
    return tuple(shape[:2])


def _check_batch_shape(X):
    """A numpy batch must have 3 or 4 dimensions and not be one image (H, W, 1, 3 or 4)."""
    if X.ndim < 3:
        raise ValueError(
            f"X: expected a batch of images with 3 or 4 dimensions, got shape {X.shape}."
        )
    if X.ndim == 3 and X.shape[-1] in (1, 3, 4) and X.shape[1] >= 8:
        # Read as a batch, it would be greyscale images at least 8 pixels high
        # and only 1, 3 or 4 wide: far likelier one image (H, W, 1, 3 or 4).
        raise ValueError(
            f"X: shape {X.shape} looks like one image, not a batch; pass a batch "
            "of one, X[None], or a list of images."
        )


def _check_not_a_path(X):
    if isinstance(X, (str, os.PathLike)):
        raise TypeError(
            "X: got a single path; pass a list of image paths (e.g. [path]) instead."
        )


def _is_pixel_batch(X):
    """Whether X is one numpy array of pixels, not an array of separate images
    (object dtype) or of paths (strings in one dimension, as ``np.array(paths)``)."""
    return isinstance(X, np.ndarray) and X.dtype != object and not (X.dtype.kind == "U" and X.ndim == 1)


def image_shapes(X):
    """``(H, W)`` of every image in X, without decoding files."""
    _check_not_a_path(X)
    if _is_pixel_batch(X):
        _check_batch_shape(X)
        _check_pixel_batch_layout(X)  # (n, 3, H, W) would give (3, H) as (H, W)
        shapes = [tuple(X.shape[1:3])] * len(X)
    elif isinstance(X, torch.Tensor):
        _check_tensor_batch_layout(X)
        shapes = [tuple(X.shape[2:])] * len(X)
    else:
        shapes = [_shape_of(item, _position(X, i)) for i, item in enumerate(X)]
    empty = [i for i, (h, w) in enumerate(shapes) if min(h, w) < 1]
    if empty:  # named here, where the caller's index is known
        raise ValueError(f"X[{_position(X, empty[0])}]: an image of shape "
                         f"{tuple(shapes[empty[0]])} has no pixels.")
    if not shapes:
        raise ValueError("X: got 0 images; at least one is required.")
    return shapes


def count_images(X):
    """Number of images in X, or None for an iterator whose length is unknown."""
    _check_not_a_path(X)
    if isinstance(X, (np.ndarray, torch.Tensor)):
        return len(X) if X.ndim else 0
    try:
        return len(X)
    except TypeError:
        pass
    if not hasattr(X, "__iter__"):  # None, a number: not images at all
        raise TypeError(
            f"X: expected images as an array, a tensor or a list of images, got {type(X).__name__}."
        )
    return None


# A batch_size counts images of this many pixels (224 x 224, the paper's
# frame); larger frames go through in proportionally fewer images per batch, so
# that the backbone's activations and the batch's embeddings take about the same
# memory whatever the frame (an elongated 224 x 576 frame: 12 images instead of 32).
_BATCH_FRAME_PIXELS = 224 * 224


def images_per_batch(batch_size, frame):
    """``batch_size``, scaled down for frames ``(H, W)`` larger than 224 x 224
    (at least 1); ``frame`` None (unknown) leaves it unchanged."""
    if frame is None:
        return batch_size
    pixels = max(1, int(frame[0]) * int(frame[1]))
    return max(1, min(batch_size, batch_size * _BATCH_FRAME_PIXELS // pixels))


def iter_image_batches(X, batch_size):
    """Yield lists of float tensors ``(3, H, W)`` in [0, 1], ``batch_size`` at a time.

    Arrays and tensors are converted a slice at a time, and paths are read a batch
    at a time, so that memory does not grow with the number of images.

    Parameters
    ----------
    X : array-like, tensor, sequence or iterator of images
        See the module docstring for the accepted formats.
    batch_size : int
        Number of images per yielded list.

    Yields
    ------
    batch : list of torch.Tensor
        Float32 tensors of shape ``(3, H, W)``; sizes may differ within a batch.

    Notes
    -----
    Before each batch but the first, the memory that the work on the previous
    batch freed is handed back to the system (:func:`release_freed_memory`), so
    that the resident size stays flat over long streams.
    """
    for i, batch in enumerate(_image_batches(X, batch_size)):
        if i:
            release_freed_memory()
        yield batch


def _image_batches(X, batch_size):
    """:func:`iter_image_batches` without the memory release."""
    if isinstance(X, ValidatedImages):
        for start in range(0, len(X), batch_size):
            yield X[start : start + batch_size]
        return
    _check_not_a_path(X)
    if _is_pixel_batch(X):
        _check_batch_shape(X)
        for start in range(0, len(X), batch_size):
            yield list(_batch_array_to_tensors(X[start : start + batch_size], start))
        return
    if isinstance(X, torch.Tensor):
        for start in range(0, len(X), batch_size):
            yield list(_batch_tensor_to_tensors(X[start : start + batch_size], start))
        return
    try:
        iterator = iter(X)
    except TypeError:
        raise TypeError(
            f"X: expected images as an array, a tensor or a list of images, got "
            f"{type(X).__name__}."
        ) from None
    index = 0
    while True:
        chunk = list(itertools.islice(iterator, batch_size))
        if not chunk:
            return
        yield [_item_to_tensor(item, _position(X, index + i)) for i, item in enumerate(chunk)]
        index += len(chunk)

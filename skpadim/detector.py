"""PaDiM in scikit-learn's terms: a feature extractor and a per-position Gaussian.

:class:`PatchGaussianDetector` streams the training images through a feature
extractor, keeps a random subset of embedding channels, and fits one Gaussian per
patch position (:class:`~skpadim.PatchCovariance`). A new image's anomaly map is
the Mahalanobis distance of each patch, upsampled to the image and smoothed; its
anomaly score summarises the map's highest values (``image_score``).
"""

import functools
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, OutlierMixin, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._device import resolve_device
from ._images import ValidatedImages, count_images, image_subset, images_per_batch, iter_image_batches
from .covariance import PatchCovariance
from .feature_extraction import PatchEmbeddings, TorchvisionExtractor, _as_patch_embeddings, _input_frame
from .metrics import _normal_flags

__all__ = ["PatchGaussianDetector"]

# Images whose height/width ratio lies this far outside the training images'
# range would be distorted differently by the resize than the training images.
_ASPECT_TOLERANCE = 0.1
# n_features="auto" keeps at most this many channels: all of the default
# EfficientNet-Lite0 extractor's 176, and a random subset of wider backbones,
# whose per-position covariances would otherwise grow with the square.
_AUTO_MAX_FEATURES = 200
# size_calibration learns how the level of a normal map varies with the resize
# factor from the training images only when there are at least this many and
# their factors spread by more than 5% (log(1.05)) along an axis, and learns a
# slope only along a direction in which they spread that much: fewer images, or
# images of one size, leave nothing to learn a slope from.
_LEVEL_MIN_IMAGES = 10
_LEVEL_MIN_SPREAD = float(np.log(1.05))
# Neighbourhood pooling goes through the channels in blocks of about this many
# bytes: its one temporary, the sums along rows, is one block, and stays in
# cache while the sums along columns read it (3 x 3 on 32 images of 56 x 56
# positions, 2 CPU threads: 2 MB blocks 1.33-1.55x faster than 8 MB or whole).
_POOL_BLOCK_BYTES = 2 * 2**20


def _gaussian_blur(maps, sigma):
    """Separable Gaussian smoothing of maps ``(n, H, W)``, as scipy's gaussian_filter.

    The kernel is truncated at 4 sigma and the borders are mirrored including
    the edge pixel (scipy's default ``mode="reflect"``), so that the result equals
    ``scipy.ndimage.gaussian_filter(map, sigma)`` used by the PaDiM paper.
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype).to(maps.device)
    out = maps
    for dim in (1, 2):
        size = out.shape[dim]
        idx = torch.arange(-radius, size + radius) % (2 * size)
        idx = torch.where(idx >= size, 2 * size - 1 - idx, idx).to(maps.device)
        padded = out.index_select(dim, idx)
        # Move the axis to blur last and convolve all rows at once.
        moved = padded.movedim(dim, -1)
        rows = moved.reshape(-1, 1, moved.shape[-1])
        blurred = F.conv1d(rows, kernel.view(1, 1, -1))
        out = blurred.reshape(*moved.shape[:-1], size).movedim(-1, dim)
    return out


@functools.lru_cache(maxsize=16)
def _upsample_blur_operator(size_in, size_out, sigma, dtype, device):
    """Matrix ``(size_out, size_in)``: bilinear upsampling, then the Gaussian blur.

    Both steps are linear and act on rows and columns separately, so a whole
    map is ``M_h @ D @ M_w.T``: two small matrix products instead of an
    interpolation and two one-channel convolutions, several times faster and
    equal to them up to rounding. Built by sending the identity through
    ``F.interpolate`` and :func:`_gaussian_blur` (in float64), so it is exactly
    what they compute.
    """
    basis = torch.eye(size_in, dtype=torch.float64).view(size_in, 1, size_in, 1)
    up = F.interpolate(basis, size=(size_out, 1), mode="bilinear", align_corners=False)
    # A width of 1 is left as it is by the blur (its mirror is itself).
    columns = _gaussian_blur(up[:, 0], sigma)[:, :, 0]  # (size_in, size_out)
    return columns.T.contiguous().to(dtype=dtype, device=device)


def _upsample_and_blur(dist, size, sigma):
    """Bilinear upsampling of maps ``(n, h, w)`` to ``size``, then :func:`_gaussian_blur`."""
    n, h, w = dist.shape
    H, W = (int(s) for s in size)
    rows = _upsample_blur_operator(h, H, float(sigma), dist.dtype, dist.device)
    cols = _upsample_blur_operator(w, W, float(sigma), dist.dtype, dist.device)
    return torch.matmul(torch.matmul(rows, dist), cols.T)


def _pool_embeddings(emb, size):
    """Average each embedding with its ``size x size`` neighbours (stride 1).

    Every patch then describes its neighbourhood, not only its own receptive
    field: a small misalignment between parts moves a feature less than a
    patch, and an isolated noisy activation weighs less. Borders average over
    the neighbours that exist, so the grid keeps its shape.
    """
    if size == 1:
        return emb
    n, c, h, w = emb.shape
    radius = size // 2
    # At least float32: an average of integers is not an integer, and float16
    # sums of nine or 25 values would lose digits or overflow.
    out = torch.empty((n, c, h, w), dtype=torch.promote_types(emb.dtype, torch.float32),
                      device=emb.device)  # fmt: skip
    counts = _box_counts(h, radius, out)[:, None] * _box_counts(w, radius, out)[None, :]
    # Separable: sums along rows, then along columns, then one division by the
    # number of neighbours each sum holds: 3 times as fast on a CPU as
    # avg_pool2d, which visits the whole window of every value. A block of
    # channels at a time, so that the row sums, the one temporary, stay small.
    step = max(1, _POOL_BLOCK_BYTES // max(1, n * h * w * out.element_size()))
    rows = None
    for c0 in range(0, c, step):
        block = emb[:, c0 : c0 + step]
        if rows is None or rows.shape != block.shape:
            rows = torch.empty(block.shape, dtype=out.dtype, device=out.device)
        _box_sums(block, radius, 2, out=rows)
        _box_sums(rows, radius, 3, out=out[:, c0 : c0 + step]).div_(counts)
    return out


def _box_sums(x, radius, dim, out):
    """Sum of each value of ``x`` and its ``radius`` neighbours on either side
    along ``dim`` (as many as exist), into ``out``."""
    out.copy_(x)
    n = x.shape[dim]
    for shift in range(1, min(radius, n - 1) + 1):
        out.narrow(dim, shift, n - shift).add_(x.narrow(dim, 0, n - shift))
        out.narrow(dim, 0, n - shift).add_(x.narrow(dim, shift, n - shift))
    return out


def _box_counts(n, radius, like):
    """How many of the ``n`` positions lie within ``radius`` of each one."""
    i = torch.arange(n, device=like.device)
    return (i.clamp(max=radius) + (n - 1 - i).clamp(max=radius) + 1).to(like.dtype)


def _leave_one_out_distances(dist, in_fit, counts, shrinkage=None):
    """Distances of training patches as if each had been left out of its Gaussian.

    A training patch is part of the Gaussian it is measured against, which pulls
    the mean towards it and stretches the covariance along it: its in-sample
    distance is far too small when the number of samples ``n`` is not large
    against the number of channels, and a threshold set on such distances flags
    most new normal images. Leaving the patch out is a rank-one downdate of the
    covariance, so by the Sherman-Morrison formula its squared distance becomes
    ``a d^2 / (1 - b d^2)`` from the in-sample ``d^2``, with, for the
    Ledoit-Wolf estimate of shrinkage ``s`` (taken as unchanged),
    ``a = n / (n - 1)``, ``b = (1 - s) / (n - 1)``, and for a fixed ``eps``,
    ``a = n^2 (n - 2) / (n - 1)^3``, ``b = n / (n - 1)^2``. For a fixed
    ``eps`` this neglects only a change of the ridge of relative size
    ``1 / n``. For Ledoit-Wolf it also takes the ridge ``s * mu`` as unchanged,
    while ``mu``, the mean variance, loses the left-out patch's share of the
    total scatter, and the coefficient is not refitted. Against refits, the
    median ratio is 0.993 for 24 images of 8 correlated channels and 0.999 for
    200 of 100, but where the ridge dominates (independent channels of equal
    variance, coefficients near 1) it is lower: 0.956 for 12 images of 4
    channels, 0.973 for 20 of 30, so the threshold is set somewhat strict with
    few images; and the distance of a patch that dominates the scatter of its
    position, an outlier among few images, comes out too small (by a third for
    one image shifted by 4 standard deviations among 24).

    Parameters
    ----------
    dist : torch.Tensor of shape (b, h, w)
        In-sample Mahalanobis distances.
    in_fit : torch.Tensor of bool, shape (b, h * w) or (b, 1)
        The patches the Gaussians were fitted on; the others keep their distance.
    counts : array-like of shape (h * w,) or (1,)
        Number of patches each Gaussian was fitted on.
    shrinkage : array-like of shape (h * w,) or None, default=None
        Ledoit-Wolf coefficients per position, or None for a fixed ``eps``.

    Returns
    -------
    dist : torch.Tensor of shape (b, h, w)
        The distances, leave-one-out where ``in_fit``.
    """
    n = torch.as_tensor(np.asarray(counts, dtype=np.float64), device=dist.device)
    # With 2 samples the leave-one-out Gaussian has one sample and no covariance
    # (Ledoit-Wolf's formula would divide by zero): left as is.
    valid = n >= 3
    if shrinkage is None:
        a = n * n * (n - 2) / (n - 1) ** 3
        b = n / (n - 1) ** 2
    else:
        a = n / (n - 1)
        b = (1 - torch.as_tensor(np.asarray(shrinkage, dtype=np.float64), device=dist.device)) / (n - 1)
    d2 = dist.flatten(1).to(torch.float64).square()
    # The exact denominator is positive (the left-out covariance is positive
    # definite) but can be tiny, with fewer images than channels and almost no
    # shrinkage, where float32 distances may even take it to zero or below: the
    # floor keeps such a distance finite and very large, as it then is.
    loo = (a * d2 / (1 - b * d2).clamp(min=1e-12)).sqrt()
    use = in_fit.to(dist.device) & valid
    return torch.where(use, loo.to(dist.dtype), dist.flatten(1)).view_as(dist)


def _image_scores_from_maps(maps, image_score):
    """Anomaly score of each map ``(n, H, W)``: its maximum or its top-fraction mean."""
    flat = maps.flatten(1)
    if image_score == "max":
        return flat.amax(dim=1)
    k = max(1, int(round(float(image_score) * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def _log_magnifications(emb):
    """(n_images, 2): log of how much the resize to the frame magnifies each image
    of ``emb``, along its height and its width."""
    frame = np.asarray(emb.resize_shape, dtype=np.float64)
    return np.log(frame / np.asarray(emb.image_shapes, dtype=np.float64))


def _magnification_range(log_magnifications):
    """(2, 2): the smallest (first row) and largest log magnification along each axis."""
    return np.stack([log_magnifications.min(axis=0), log_magnifications.max(axis=0)])


def _fit_level_slopes(log_magnifications, levels):
    """Exponents ``(a_h, a_w)`` of the magnifications in a normal map's level.

    Least squares of ``log(levels)`` on a constant and the log magnifications
    (n_images, 2), along their principal directions: a direction along which the
    images spread by less than ``_LEVEL_MIN_SPREAD`` gets slope 0. Images of one
    aspect ratio at several sizes, or of one height and several widths, span one
    direction only; a slope along the other would be fitted to rounding noise
    (large, and of opposite signs on the two axes) and would rescale any image a
    little off those proportions. Both slopes are 0 with fewer than
    ``_LEVEL_MIN_IMAGES`` images or a level that is not positive and finite (no
    logarithm).
    """
    slopes = np.zeros(2)
    if len(levels) < _LEVEL_MIN_IMAGES or not np.all(np.isfinite(levels) & (levels > 0)):
        return slopes
    centred = np.asarray(log_magnifications, dtype=np.float64)
    centred = centred - centred.mean(axis=0)
    directions = np.linalg.svd(centred, full_matrices=False)[2]  # rows: principal directions
    along = centred @ directions.T
    spans = np.ptp(along, axis=0) > _LEVEL_MIN_SPREAD
    if not spans.any():
        return slopes
    design = np.column_stack([np.ones(len(levels)), along[:, spans]])
    coef = np.linalg.lstsq(design, np.log(levels), rcond=None)[0][1:]
    return directions[spans].T @ coef


def _to_image_resolution(amap, image_shape, resize_shape, crop_box):
    """A map on the preprocessed image -> a map on the original image."""
    amap = amap[None, None]
    if crop_box is not None:
        # The crop discarded the borders; extend the map over them by replication.
        top, left, h, w = crop_box
        pad = (left, resize_shape[1] - left - w, top, resize_shape[0] - top - h)
        amap = F.pad(amap, pad, mode="replicate")
    if tuple(amap.shape[2:]) != tuple(image_shape):
        amap = F.interpolate(amap, size=tuple(int(s) for s in image_shape), mode="bilinear",
                             align_corners=False)
    return amap[0, 0]


# The threshold is set on leave-one-out scores: each image against a Gaussian
# of the others, which takes at least two.
_LEAVE_ONE_OUT = (3, ": 2 to estimate a distribution, and one more to leave out in turn "
                     "for the decision threshold")


def _normal_training_images(X, y, minimum=_LEAVE_ONE_OUT):
    """``(X, n_images)``: the images of X that y labels normal (all when y is
    None), checked to be a sequence (fit reads them more than once) of at least
    ``minimum``, a pair (count, why) for the message (TiledDetector fits on
    windows, which its detector counts)."""
    n_images = count_images(X)
    if n_images is None:
        raise TypeError(
            "fit reads the training images more than once (statistics, then the decision "
            "threshold); pass a list, array or tensor rather than a one-shot iterator."
        )
    if y is not None:
        X, n_images = _normal_only(X, y, n_images)
    least, why = minimum
    if n_images < least:
        raise ValueError(f"fit needs at least {least} training images{why}; got {n_images}.")
    return X, n_images


def _normal_only(X, y, n_images):
    """The images of X labelled normal (0, or an empty mask) by y, and their number."""
    normal = _normal_flags(y)
    if len(normal) != n_images:
        raise ValueError(
            f"y has {len(normal)} labels for {n_images} images; pass one label (0 = normal) "
            "or one mask per image."
        )
    keep = np.flatnonzero(normal)
    if len(keep) == n_images:
        return X, n_images
    return _take_images(X, keep), len(keep)


def _computes_subsets(extractor, X):
    """Whether ``extractor`` can compute the detector's channels of images ``X`` alone.

    The default extractor then picks them from each layer before upsampling it
    to the first grid: the same values, without the concatenation of all
    channels (for Wide-ResNet-50 about three times the kept ones' memory).
    Not through an embedding cache (``memory``), which keeps every channel, and
    not for subclasses, whose transform may do more; and not when ``X`` holds
    embeddings already.
    """
    return (type(extractor) is TorchvisionExtractor and extractor.memory is None
            and getattr(extractor, "n_channels_", None) is not None
            and not isinstance(X, PatchEmbeddings))


class _ChannelTaker:
    """Copies the chosen channels of successive batches into one reused buffer.

    ``np.take`` copies whole channel planes; fancy indexing after a slice would
    return a transposed layout that then costs a second, strided copy. A batch
    is tens of megabytes, so a fresh array per batch would be mapped anew by
    the allocator each time, its page faults costing as much as the copy. The
    result is only valid until the next call: each loop has its own taker.
    When every channel is kept, in order (``n_features=None``), the embeddings
    themselves are returned: what follows only reads them.
    """

    def __init__(self, channels):
        self.channels = channels
        self._all = np.array_equal(channels, np.arange(len(channels)))
        self._buffer = None

    def __call__(self, emb):
        emb = np.asarray(emb)
        if self._all and emb.shape[1] == len(self.channels):
            return emb
        shape = (len(emb), len(self.channels), *emb.shape[2:])
        buf = self._buffer
        if buf is None or buf.dtype != emb.dtype or buf.shape[1:] != shape[1:] or len(buf) < len(emb):
            buf = self._buffer = np.empty(shape, dtype=emb.dtype)
        # The channels are valid indices; mode="clip" only spares numpy's
        # bounds-checked path, which would copy through a temporary buffer.
        return np.take(emb, self.channels, axis=1, out=buf[: len(emb)], mode="clip")


def _grid_change_error(grid, first, part):
    """The error of an extractor whose grid differs between two ``part``s of a fit."""
    return ValueError(
        f"The feature extractor returned a grid of {grid} positions for one {part} and {first} "
        "for another; it must resize every image to one size (TiledDetector takes images of "
        "mixed sizes)."
    )


def _check_embedding_array(emb, n_images):
    """A feature extractor's plain output for ``n_images`` images, checked."""
    emb = np.asarray(emb.detach().cpu() if isinstance(emb, torch.Tensor) else emb)
    if emb.ndim != 4 or len(emb) != n_images:
        raise ValueError(
            f"The feature extractor's transform returned shape {emb.shape} for {n_images} "
            "images; expected (n_images, n_channels, h, w)."
        )
    return emb


def _refuse_nested_params_of_none(estimator, params, name, default):
    """Raise a clear error for ``<name>__<param>`` in ``params`` while the
    sub-estimator ``name`` is None: its default instance is only built at fit."""
    nested = [k for k in params if k.startswith(name + "__")]
    if nested and getattr(estimator, name) is None and params.get(name) is None:
        raise ValueError(
            f"Cannot set {nested[0]}: {name} is None (the default is only built at "
            f"fit). Pass {name}={default}(...) to set or search its parameters."
        )


def _take_images(X, keep):
    """The images ``keep`` (indices) of X, whatever container X is."""
    return X.take_rows(keep) if isinstance(X, PatchEmbeddings) else image_subset(X, keep)


class _ImageOutlierDetector(OutlierMixin):
    """What an outlier detector of images derives from its ``score_samples``,
    ``iter_anomaly_maps`` and ``offset_``: ``anomaly_maps``,
    ``decision_function``, ``predict``, ``fit_predict`` that passes labels to
    ``fit``, and tags that say X is not a 2-D array; and how a fit adopts the
    state it assembled aside."""

    def anomaly_maps(self, X):
        """Pixel-level anomaly maps at each input image's resolution.

        Parameters
        ----------
        X : images (or, fitted on them, PatchEmbeddings)
            Images in any format accepted by ``fit``; a generator is fine.

        Returns
        -------
        maps : ndarray of shape (n_images, H, W) or list of ndarray
            Higher = more anomalous (smoothed Mahalanobis distances). An array
            when all images have the same size, else a list of 2-D arrays.
        """
        out = list(self.iter_anomaly_maps(X))
        return np.stack(out) if len({m.shape for m in out}) == 1 else out

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for anomalies.

        Parameters
        ----------
        X : images (or, fitted on them, PatchEmbeddings)
            Images in any format accepted by ``fit``.

        Returns
        -------
        decision : ndarray of shape (n_images,)
            Negative for images scored as anomalous.
        """
        check_is_fitted(self, "offset_")
        if np.isnan(self.offset_):
            raise ValueError(
                "This detector has no threshold: it is a localizer, fitted for its maps only "
                "(see PatchGaussianDetector's localization); threshold score_samples yourself."
            )
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """Label images: +1 normal, -1 anomalous.

        Parameters
        ----------
        X : images (or, fitted on them, PatchEmbeddings)
            Images in any format accepted by ``fit``.

        Returns
        -------
        labels : ndarray of shape (n_images,)
            +1 for normal, -1 for anomalous.
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def fit_predict(self, X, y=None):
        """Fit on X, then label X (+1 normal, -1 anomalous).

        Parameters
        ----------
        X : images (or PatchEmbeddings)
            Training images, in any format accepted by ``fit``.
        y : array-like of shape (n_images,), masks, or None, default=None
            Optional labels, as in ``fit``: the images labelled anomalous
            are left out of the fit, and labelled like the others.

        Returns
        -------
        labels : ndarray of shape (n_images,)
            +1 for normal, -1 for anomalous.
        """
        return self.fit(X, y).predict(X)

    def _adopt(self, fitted):
        """Take the fitted attributes of ``fitted``, a fitted clone of self: a fit
        assembles its state aside, so that failing part way it leaves self intact."""
        self.__dict__.update(
            {k: v for k, v in fitted.__dict__.items() if k.endswith("_") and not k.startswith("_")}
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.non_deterministic = False
        return tags


class PatchGaussianDetector(_ImageOutlierDetector, BaseEstimator):
    """PaDiM anomaly detector: one Gaussian of patch embeddings per image position.

    Fit it on images of normal (defect-free) parts only. For a new image, every
    patch is compared with the Gaussian of its position by the Mahalanobis
    distance; the distances, upsampled to the image and smoothed, form the anomaly
    map, and the mean of the map's highest values (or its maximum, see
    ``image_score``) is the image's anomaly score. When the training images
    differ in size, the maps returned come by default from a second set of
    Gaussians fitted on windows at one pixel scale (``localization``), while
    the scores stay those of the frame.

    Parameters
    ----------
    feature_extractor : estimator or None, default=None
        Turns images into patch embeddings (see :mod:`skpadim.feature_extraction`
        for the interface). ``None`` uses
        ``TorchvisionExtractor("efficientnet_lite0")``, whose ImageNet weights
        come with pip. It is cloned at fit. When ``X`` is already a
        :class:`~skpadim.PatchEmbeddings` (the detector as the last step of a
        :class:`~sklearn.pipeline.Pipeline` after an extractor) it is not used.
    n_features : int, "auto" or None, default="auto"
        Number of embedding channels kept, drawn at random without replacement
        from ``random_state`` as in the paper (Rd100, Rd550). ``None`` keeps all;
        ``"auto"`` keeps all up to 200 and draws 200 at random from more (all 176
        of the default extractor; the Gaussians' size grows with the square of
        this number).
    shrinkage : "ledoit-wolf" or float, default="ledoit-wolf"
        Covariance regularisation per position: the Ledoit-Wolf estimate, or a
        fixed ``eps`` added to the diagonal of the sample covariance (the paper's
        ``Sigma + 0.01 I``). See :class:`~skpadim.PatchCovariance`.
    pooling : odd int, default=3
        Size of the neighbourhood each embedding is averaged over (stride 1)
        before the Gaussians are fitted and distances taken, so that a patch
        describes its surroundings and small misalignments between parts matter
        less. 1 disables it (the paper's recipe).
    sigma : float, default=4.0
        Standard deviation, in pixels of the preprocessed image (of a window,
        for the maps of a localizer), of the Gaussian smoothing of the anomaly
        maps (4 as in the paper); 0 disables it.
    image_score : "max" or float in (0, 1], default=0.01
        How an image's anomaly score is read from its map (on the preprocessed
        frame): ``"max"``, the map's maximum (the paper's recipe), or a float
        ``f``, the mean of the highest fraction ``f`` of the map's values, which
        one stray hot pixel moves less than the maximum.
    size_calibration : bool, default=True
        Whether maps are put on one scale across image sizes. Every image is
        resized to the same frame, so images of different sizes are magnified
        differently, and the distances of normal patches change with the
        magnification (a narrow image, stretched more, scores higher all
        over). With ``True``, the fit learns from the training images'
        leave-one-out maps how the median of a normal map varies with the
        magnification along the height and the width (a power law, by least
        squares on logarithms, only along directions in which the training
        images' magnifications spread: images of one aspect ratio at several
        sizes learn one slope for both axes), and every map of the frame (hence
        every score) is divided by the level so expected for its image,
        magnifications outside the training images' range taken at its edge.
        It changes nothing when the training images all have one size (or
        fewer than 10 images, or sizes that vary by less than 5%):
        ``level_slopes_`` is then zero.
    localization : {"auto", "frame", "tiled"}, default="auto"
        Where the anomaly maps come from. ``"frame"``: from the Gaussians that
        score the images, each image resized onto the frame. ``"tiled"``: from
        a second set of Gaussians, fitted on windows of the training images
        all resized by one factor (a :class:`~skpadim.TiledDetector` around
        this detector's settings, without a centre crop; its windows' shorter
        side is the frame's rounded to a multiple of 32, their proportions the
        training images' median ones), so that a defect keeps its
        size in pixels whatever the size of its image; the image scores, and
        so ``predict`` and ``offset_``, still come from the frame, which sees
        the whole part at once. ``"auto"``: ``"tiled"`` when the training
        images' sizes differ by more than 5% along a side, else ``"frame"``
        (images of one size give both nearly the same pixels); also
        ``"frame"`` when fitted on embeddings, with ``trim_by="patch"``
        (whose trimming acts on the frame's patches) or with an extractor
        without an ``image_size`` parameter (which could not embed the windows
        at their size). The second set costs one more pass over the training
        images, about as much memory as the first plus a copy of the backbone,
        and the windows' backbone passes for every map; a search scored on
        image-level metrics alone can set ``"frame"``.
    contamination : float in (0, 0.5], default=0.01
        Expected fraction of anomalous images, used to place the decision
        threshold: ``offset_`` is the ``contamination`` quantile of the training
        images' scores, each taken as if that image had been left out of the
        fit (in-sample scores are far too optimistic when the images do not
        greatly outnumber the channels). With only a few dozen images or fewer,
        it flags more than ``contamination`` of new normal images (see the user
        guide's Thresholds); a held-out set of normal images can also set
        ``offset_``.
    trim : float in [0, 0.5), default=0.0
        Fraction of the training data left out of the final fit, judged out of
        fold: the training images are split into two halves, alternately, and
        each half is scored by a Gaussian fitted on the other. A remedy for
        training folders that hold a few defective images: a fit on all of them
        would learn their defects as normal. It costs two more passes over the
        training images. 0 fits once on all of them. Set it to about the
        fraction of defective images you expect.
    trim_by : {"image", "patch"}, default="image"
        What ``trim`` leaves out. ``"image"``: the fraction ``trim`` of whole
        training images with the highest out-of-fold image scores (listed in
        ``trimmed_indices_``). ``"patch"``: at each position, the fraction
        ``trim`` of training patches farthest from the other half's Gaussian,
        so a defect is dropped where it is and the rest of its image still
        counts; it recovers more of the lost localisation (pixel AUROC, AUPRO)
        but less of the image-level detection, since the rare good patches it
        also drops make the Gaussians too tight for the next unusual good image.
    batch_size : int, default=32
        Images per batch, for frames up to 224 x 224 pixels; bounds the memory
        of fit and scoring. Larger frames go in proportionally fewer images per
        batch (at least one), so that a batch takes about the same memory
        whatever the image size: 12 images of an elongated part's 224 x 576.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the covariance and distance computations run (the extractor has
        its own ``device``).
    compact : bool, default=False
        Keep the per-position Cholesky factors rounded to float16 and pickle only
        their lower triangles, a quarter of the size; see
        :class:`~skpadim.PatchCovariance`.
    random_state : int, RandomState instance or None, default=None
        Seeds the channel subset. Pass an int for reproducible results.

    Attributes
    ----------
    feature_extractor_ : estimator or None
        The fitted clone of ``feature_extractor`` (None if fitted on embeddings).
    channel_indices_ : ndarray of shape (n_features,)
        Sorted indices of the embedding channels kept.
    gaussian_ : PatchCovariance
        The fitted per-position Gaussian over the kept channels.
    offset_ : float
        Threshold on :meth:`score_samples`; ``decision_function`` subtracts it.
    n_features_in_ : int
        Number of embedding channels before the random subset.
    input_shape_ : tuple of int
        ``(H, W)`` of the preprocessed images, the frame of the unresized maps.
    aspect_range_ : tuple of float
        Smallest and largest height/width ratio of the training images.
    trimmed_indices_ : ndarray of int
        Indices (into the normal training images) of the images left out by
        ``trim`` with ``trim_by="image"``; empty otherwise.
    level_slopes_ : ndarray of shape (2,)
        Exponents of an image's magnification onto the frame, along its height
        and its width, in the level of its normal map (``size_calibration``);
        every map is divided by ``exp(level_slopes_ @ (m - centre))``, ``m``
        the log magnifications clipped to ``log_magnification_range_`` and
        ``centre`` that range's middle. Zero: no calibration.
    log_magnification_range_ : ndarray of shape (2, 2)
        Smallest (first row) and largest (second row) log magnification of the
        training images along the height and the width (of those the
        calibration learnt from: without the images ``trim`` left out).
    localizer_ : TiledDetector or None
        The fitted detector the maps come from (``localization``), fitted on
        the training images that ``trim`` kept; None when they come from the
        frame. It serves maps only: its thresholds (``offset_``) are NaN.
    fitted_on_embeddings_ : bool
        True when ``fit`` received patch embeddings rather than images.

    See Also
    --------
    sklearn.covariance.EllipticEnvelope : The same idea for a single Gaussian.

    Examples
    --------
    >>> from skpadim import PatchGaussianDetector, TorchvisionExtractor
    >>> from skpadim.datasets import make_textures
    >>> data = make_textures("brick", n_train=12, n_test=4, image_size=64, random_state=0)
    >>> det = PatchGaussianDetector(
    ...     TorchvisionExtractor(image_size=64), n_features=20, random_state=0)
    >>> det = det.fit(data.X_train)
    >>> det.score_samples(data.X_test).shape, det.anomaly_maps(data.X_test).shape
    ((4,), (4, 64, 64))
    >>> sorted(set(det.predict(data.X_test).tolist()) - {-1, 1})
    []
    """

    _parameter_constraints = {
        "feature_extractor": [HasMethods(["fit", "transform"]), None],
        "n_features": [Interval(numbers.Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "shrinkage": [StrOptions({"ledoit-wolf"}), Interval(numbers.Real, 0, None, closed="left")],
        "pooling": [Interval(numbers.Integral, 1, None, closed="left")],
        "sigma": [Interval(numbers.Real, 0, None, closed="left")],
        "image_score": [StrOptions({"max"}), Interval(numbers.Real, 0, 1, closed="right")],
        "size_calibration": ["boolean"],
        "localization": [StrOptions({"auto", "frame", "tiled"})],
        "trim": [Interval(numbers.Real, 0, 0.5, closed="left")],
        "trim_by": [StrOptions({"patch", "image"})],
        "contamination": [Interval(numbers.Real, 0, 0.5, closed="right")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "compact": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        feature_extractor=None,
        *,
        n_features="auto",
        shrinkage="ledoit-wolf",
        pooling=3,
        sigma=4.0,
        image_score=0.01,
        size_calibration=True,
        localization="auto",
        contamination=0.01,
        trim=0.0,
        trim_by="image",
        batch_size=32,
        device="auto",
        compact=False,
        random_state=None,
    ):
        self.feature_extractor = feature_extractor
        self.n_features = n_features
        self.shrinkage = shrinkage
        self.pooling = pooling
        self.sigma = sigma
        self.image_score = image_score
        self.size_calibration = size_calibration
        self.localization = localization
        self.contamination = contamination
        self.trim = trim
        self.trim_by = trim_by
        self.batch_size = batch_size
        self.device = device
        self.compact = compact
        self.random_state = random_state

    def __setstate__(self, state):
        # Pickled before size_calibration or localization existed: fitted without them.
        state.setdefault("size_calibration", False)
        state.setdefault("localization", "frame")
        if "offset_" in state:
            state.setdefault("localizer_", None)
        super().__setstate__(state)

    # -- batches of embeddings -------------------------------------------------
    def _embedding_batches(self, X, extractor, channels=None):
        """Yield PatchEmbeddings batch by batch, from images or from embeddings;
        with ``channels`` (only where :func:`_computes_subsets`), only those."""
        if isinstance(X, PatchEmbeddings) or (
            extractor is None and isinstance(X, np.ndarray) and X.ndim == 4
        ):
            if not isinstance(X, PatchEmbeddings) and hasattr(self, "input_shape_"):
                if X.shape[1] != self.n_features_in_ and X.shape[-1] in (1, 3) and (
                        X.dtype == np.uint8 or X.shape[2] >= 8):
                    # Channels-last images (bytes, or at least 8 pixels wide: no
                    # embedding grid is 1 or 3 positions across that), not
                    # (n, C, h, w) embeddings: say so rather than count their
                    # rows as channels.
                    raise ValueError(
                        f"X: this detector was fitted on patch embeddings ({self.n_features_in_} "
                        f"channels), so it can only score embeddings, not images; a plain array "
                        f"of shape {X.shape} reads as {X.shape[1]} channels."
                    )
                if np.any(getattr(self, "level_slopes_", 0)):
                    raise ValueError(
                        "X: a plain array of embeddings carries no image sizes, and this detector "
                        "scales each map by its image's size (size_calibration, learnt from the "
                        "sizes its training embeddings carried); pass PatchEmbeddings with their "
                        "image_shapes (np.concatenate drops them)."
                    )
                # A plain array (np.concatenate of PatchEmbeddings gives one) is
                # read on the frame of the training embeddings, so that its maps,
                # blur and scores are those the threshold was set on.
                X = PatchEmbeddings(X, resize_shape=self.input_shape_)
            X = _as_patch_embeddings(X)
            step = images_per_batch(self.batch_size, X.input_shape)
            for start in range(0, len(X), step):
                yield X.rows(start, start + step)
            return
        if extractor is None:
            raise ValueError(
                "This detector was fitted on patch embeddings (e.g. as the last step of a "
                "Pipeline), so it can only score PatchEmbeddings, not images."
            )
        # A custom extractor that does not tell its frame gets batch_size images.
        per_batch = images_per_batch(self.batch_size, _input_frame(extractor))
        for batch in iter_image_batches(X, per_batch):
            if channels is not None:
                yield extractor._transform(ValidatedImages(batch), channels)
                continue
            emb = extractor.transform(ValidatedImages(batch))
            if not isinstance(emb, PatchEmbeddings):
                # The interface allows a plain array: its grid is then the frame,
                # and the batch tells each image's size.
                emb = PatchEmbeddings(_check_embedding_array(emb, len(batch)),
                                      image_shapes=[tuple(t.shape[-2:]) for t in batch])  # fmt: skip
            yield emb

    def _check_aspect(self, emb, start):
        low, high = self.aspect_range_
        ratios = emb.image_shapes[:, 0] / emb.image_shapes[:, 1]
        bad = np.flatnonzero(
            (ratios < low * (1 - _ASPECT_TOLERANCE)) | (ratios > high * (1 + _ASPECT_TOLERANCE))
        )
        if len(bad):
            i = bad[0]
            h, w = emb.image_shapes[i]
            raise ValueError(
                f"X[{start + i}] has shape ({h}, {w}), height/width {h / w:.3g}, outside the "
                f"range {low:.3g}..{high:.3g} of the training images: resizing would distort "
                "it differently and its scores would not be comparable. Crop or pad it to "
                "the training images' proportions."
            )

    def _select(self, emb, take, picked=False):
        """The kept channels of ``emb``, pooled; ``picked``: ``emb`` holds only them."""
        if not picked:
            self._check_channel_count(emb.shape[1])
        return self._pooled(take(emb))

    def _check_channel_count(self, n_channels):
        if n_channels != self.n_features_in_:
            raise ValueError(
                f"X: embeddings have {n_channels} channels but the detector was fitted "
                f"on {self.n_features_in_}."
            )

    def _pooled(self, selected):
        selected = torch.from_numpy(np.ascontiguousarray(selected))
        return _pool_embeddings(selected, int(self.pooling))

    def set_params(self, **params):
        """Set the parameters of this detector, and of its feature extractor.

        Parameters
        ----------
        **params : dict
            Detector parameters, and ``feature_extractor__<name>`` for those of
            the feature extractor (searchable with
            :class:`~sklearn.model_selection.GridSearchCV`).

        Returns
        -------
        self : PatchGaussianDetector
            This detector.

        Notes
        -----
        ``device`` and ``feature_extractor__device`` say where the work runs,
        not what is learnt: on a fitted detector they also move its fitted
        Gaussians and extractor, so that a model fitted with ``device="cuda"``
        scores on a machine without a GPU after ``set_params(device="cpu")``
        (and ``feature_extractor__device="cpu"`` when an extractor was given).
        """
        _refuse_nested_params_of_none(self, params, "feature_extractor", "TorchvisionExtractor")
        super().set_params(**params)
        if "device" in params and hasattr(self, "gaussian_"):
            self.gaussian_._release_device_memory()  # a copy kept on the GPU goes
            self.gaussian_.set_params(device=params["device"])
        # (No fitted extractor, or one without a device: nothing to move.)
        extractor = getattr(self, "feature_extractor_", None)
        if "feature_extractor__device" in params and "device" in getattr(extractor, "get_params", dict)():
            extractor.set_params(device=params["feature_extractor__device"])
        localizer = getattr(self, "localizer_", None)
        devices = {key: value for key, value in params.items()
                   if key in ("device", "feature_extractor__device")}  # fmt: skip
        if localizer is not None and devices:
            localizer.detector_.set_params(**devices)  # (its extractor is its own clone, never None)
        return self

    # -- fit -------------------------------------------------------------------
    def fit(self, X, y=None):
        """Fit the per-position Gaussians on images of normal parts.

        Parameters
        ----------
        X : array-like, tensor, list of paths/arrays, or PatchEmbeddings
            Training images of normal parts: ``(n, H, W, 3)`` or ``(n, H, W)``
            uint8 or float in [0, 1], a tensor ``(n, 3, H, W)``, or a list of
            image paths or arrays (sizes may differ); or their embeddings. ``X``
            is read more than once (statistics, then the threshold; once more
            for the ``localization`` Gaussians, twice more with ``trim``), so it
            must be a sequence, not a one-shot iterator.
        y : array-like of shape (n_images,), masks, or None, default=None
            Optional labels: 0 normal / 1 anomalous (False / True for
            booleans), or scikit-learn's outlier convention +1 normal / -1
            anomalous (taken when integer labels hold no 0), or
            ground-truth masks (an empty mask meaning normal). When given, only the normal images are
            fitted on and the others are left out, so that a cross-validation
            or the final refit of a :class:`~sklearn.model_selection.GridSearchCV`
            on a labelled set never learns defects as normal. ``None`` takes
            every image as normal.

        Returns
        -------
        self : PatchGaussianDetector
            The fitted detector.
        """
        fitted, X, in_fit = self._fit_gaussians(X, y)
        # The threshold is set on leave-one-out scores: in-sample ones are too
        # optimistic (see _leave_one_out_distances). Images and patches left out
        # by trim are scored as they are.
        normal = np.ones(len(in_fit), dtype=bool)
        normal[fitted.trimmed_indices_] = False  # the suspects teach nothing about normal levels
        if not fitted._calibrates(int(normal.sum())):
            train_scores = fitted._score_samples(X, in_fit)
        else:
            # One pass gives the uncalibrated scores and each map's median; the
            # calibration divides a whole map, hence its score, by one number.
            scores, medians, magnifications = fitted._level_pass(X, in_fit)
            fitted._learn_levels(magnifications[normal], medians[normal])
            train_scores = -scores / fitted._normal_levels(magnifications)
        fitted.offset_ = float(np.percentile(train_scores, 100.0 * self.contamination))
        if fitted._localizes():
            fitted.localizer_ = fitted._fit_localizer(
                X if normal.all() else _take_images(X, np.flatnonzero(normal)))
        self._adopt(fitted)
        return self

    def _localizes(self):
        """Whether this fitted detector's maps come from a localizer (see ``localization``)."""
        if self.localization == "frame" or self.fitted_on_embeddings_:
            return False
        if self.localization == "tiled":
            return True
        # An extractor without an image size could not be told to embed the
        # windows at their own size.
        sized = "image_size" in self.feature_extractor_.get_params(deep=False)
        return sized and self._sizes_vary() and not (self.trim and self.trim_by == "patch")

    def _fit_localizer(self, X):
        """The localizer (``localizer_``) fitted on the normal images X."""
        from .tiling import TiledDetector  # (tiling builds on this module)

        # The same settings on windows of one size: nothing to calibrate, and
        # the images left out by trim are left out of X already.
        inner = clone(self).set_params(localization="frame", size_calibration=False, trim=0.0)
        extractor = inner.feature_extractor
        if extractor is not None and extractor.get_params(deep=False).get("crop_size") is not None:
            # A window is embedded whole: a centre crop would leave its borders
            # out of every map.
            inner.set_params(feature_extractor=clone(extractor).set_params(crop_size=None))
        # Its windows' shorter side is the frame's, the resolution this detector
        # was given (the extractor's, where it says: a plain array's frame is its grid).
        frame = getattr(self.feature_extractor_, "resize_shape_", None) or self.input_shape_
        localizer = TiledDetector(inner, short_side=min(frame))._fit_windows(X)[0]
        # The scores and their threshold are the frame's: the localizer's own
        # thresholds would cost another pass over the training windows.
        localizer.offset_ = localizer.detector_.offset_ = float("nan")
        return localizer

    def _fit_gaussians(self, X, y=None):
        """All of :meth:`fit` but the threshold pass.

        Returns ``(fitted, X, in_fit)``: a fitted clone of self whose ``offset_`` is
        still 0, the normal training images, and the ``in_fit`` flags of their
        patches (see :meth:`_iter_distances`) for leave-one-out scores. Self is
        left unchanged.
        """
        self._validate_params()
        resolve_device(self.device)  # a bad or absent device fails before any image is read
        if hasattr(self, "gaussian_"):  # the previous model's copy on a GPU is not kept through a refit
            self.gaussian_._release_device_memory()
            if getattr(self, "localizer_", None) is not None:
                self.localizer_.detector_.gaussian_._release_device_memory()
        X, n_images = _normal_training_images(X, y)
        if self.pooling % 2 == 0:
            raise ValueError(
                f"pooling must be odd so that a neighbourhood is centred on its patch; got "
                f"{self.pooling}."
            )
        on_embeddings = isinstance(X, PatchEmbeddings)
        if self.localization == "tiled" and (on_embeddings or (self.trim and self.trim_by == "patch")):
            raise ValueError(
                "localization='tiled' fits Gaussians on windows of the training images, "
                + ("so it needs the images, not their embeddings" if on_embeddings else
                   "which trim_by='patch' cannot trim (its patches are the frame's)")
                + "; use localization='auto' or 'frame'."
            )
        if on_embeddings:
            extractor = None
        else:
            extractor = clone(
                self.feature_extractor if self.feature_extractor is not None else TorchvisionExtractor()
            ).fit(X)
        n_trim = int(np.floor(self.trim * n_images))
        trimming = n_trim > 0 and n_images - n_trim >= 3 and n_images >= 4
        if trimming:
            # Two Gaussians, each on every other image: together one pass.
            halves = (np.arange(0, n_images, 2), np.arange(1, n_images, 2))
            gaussian_a, channels, n_channels, input_shape, shapes_a = self._fit_gaussian(
                _take_images(X, halves[0]), extractor)
            # The second half must give the first half's grid and channels:
            # checked at its first batch, not after it is fitted.
            first = (gaussian_a.grid_shape_, n_channels)
            gaussian_b, _, _, _, shapes_b = self._fit_gaussian(
                _take_images(X, halves[1]), extractor, channels, like=first)
            aspects, magnifications = (np.concatenate([a, b]) for a, b in zip(shapes_a, shapes_b))
        else:
            gaussian, channels, n_channels, input_shape, (aspects, magnifications) = self._fit_gaussian(
                X, extractor)

        # The new state is assembled on a copy and only then written onto self
        # (by fit), so that a fit failing part way leaves a previously fitted
        # detector intact.
        fitted = clone(self)
        fitted.feature_extractor_ = extractor
        fitted.fitted_on_embeddings_ = on_embeddings
        fitted.channel_indices_ = channels
        fitted.n_features_in_ = int(n_channels)
        fitted.input_shape_ = tuple(int(s) for s in input_shape)
        fitted.aspect_range_ = (float(aspects.min()), float(aspects.max()))
        fitted.log_magnification_range_ = _magnification_range(magnifications)
        fitted.level_slopes_ = np.zeros(2)  # no calibration until fit learns one
        fitted.offset_ = 0.0  # provisional: the scoring passes below use it
        fitted.localizer_ = None  # (fit adds one, after the threshold pass)
        fitted.trimmed_indices_ = np.array([], dtype=np.intp)
        if trimming and self.trim_by == "image":
            # A defective training image is learnt as normal at its defect's
            # positions, which hides it from an in-sample score; each half is
            # therefore scored by the Gaussian of the other half, and the n_trim
            # images with the worst of these out-of-fold scores are left out.
            # Images magnified more score higher all over: with size_calibration
            # the out-of-fold scores are calibrated too (by a fit on all of them,
            # suspects included, as they are not known yet), so that the sizes of
            # the images do not decide which ones are left out.
            calibrate = fitted._calibrates(n_images)
            scores, medians, magnifications = np.empty(n_images), np.empty(n_images), np.empty((n_images, 2))
            for half, other in ((halves[0], gaussian_b), (halves[1], gaussian_a)):
                fitted.gaussian_ = other
                if calibrate:
                    scores[half], medians[half], magnifications[half] = fitted._level_pass(
                        _take_images(X, half))
                else:
                    scores[half] = -fitted.score_samples(_take_images(X, half))
            if calibrate:
                scores /= fitted._learn_levels(magnifications, medians)
                fitted.level_slopes_ = np.zeros(2)  # the final fit learns its own
            fitted.gaussian_ = gaussian_a = gaussian_b = None  # free them before the refit
            order = np.argsort(-scores, kind="stable")  # (anomaly scores: the worst first)
            fitted.trimmed_indices_ = np.sort(order[:n_trim])
            kept = _take_images(X, np.sort(order[n_trim:]))
            gaussian, *_, (_, kept_magnifications) = self._fit_gaussian(kept, extractor, channels, like=first)
            # The images left out tell nothing about the sizes of normal ones.
            fitted.log_magnification_range_ = _magnification_range(kept_magnifications)
        elif trimming:
            # Per position, the n_trim training patches farthest (out of fold)
            # from the Gaussian of the other half are left out: a defect covers
            # few positions, so the rest of a defective image still counts.
            distances = np.empty((n_images, 0), dtype=np.float32)
            for half, other in ((halves[0], gaussian_b), (halves[1], gaussian_a)):
                fitted.gaussian_ = other
                d = fitted._patch_distances(_take_images(X, half))
                if distances.shape[1] == 0:
                    distances = np.empty((n_images, d.shape[1]), dtype=np.float32)
                distances[half] = d
            fitted.gaussian_ = gaussian_a = gaussian_b = None  # free them before the refit
            worst = np.argsort(distances, axis=0, kind="stable")[-n_trim:]
            keep = np.ones(distances.shape, dtype=bool)
            np.put_along_axis(keep, worst, False, axis=0)
            gaussian = self._fit_gaussian(X, extractor, channels, keep=keep, like=first)[0]
        fitted.gaussian_ = gaussian
        if trimming and self.trim_by == "patch":
            in_fit = keep
        else:
            in_fit = np.ones((n_images, 1), dtype=bool)
            in_fit[fitted.trimmed_indices_] = False
        return fitted, X, in_fit

    def _fit_gaussian(self, X, extractor, channels=None, keep=None, like=None):
        """One streaming pass: the per-position Gaussian of X's (pooled) embeddings,
        with the images' aspect ratios and log magnifications;
        ``keep``: None or bool (n_images, h * w), the patches to fit on; ``like``:
        None or the ``(grid, n_channels)`` of an earlier pass of the same fit, which
        every batch must give too."""
        gaussian = PatchCovariance(
            shrinkage=self.shrinkage, device=self.device, dtype="float32",
            store_covariance=False, compact=self.compact,
        )
        gaussian._validate_params()
        moments, n_channels, aspects, magnifications, start = None, None, [], [], 0
        grid, part = (None, "batch") if like is None else (like[0], "part of the images")
        subsets = _computes_subsets(extractor, X)
        if subsets:  # the extractor computes the kept channels only
            n_channels = extractor.n_channels_
            if channels is None:
                channels = self._draw_channels(n_channels)
            take = np.asarray
        for emb in self._embedding_batches(X, extractor, channels if subsets else None):
            if start == 0:
                input_shape = emb.input_shape
                grid = tuple(emb.shape[2:]) if grid is None else grid
            if tuple(emb.shape[2:]) != grid:
                # One Gaussian per position: every batch must share the grid
                # (else the first batch's positions would take other patches).
                raise _grid_change_error(tuple(emb.shape[2:]), grid, part)
            if n_channels is None:  # (known already where the extractor picks them)
                n_channels = emb.shape[1] if like is None else like[1]
                if channels is None:
                    channels = self._draw_channels(n_channels)
                take = _ChannelTaker(channels)
            if not subsets and emb.shape[1] != n_channels:
                raise ValueError(
                    f"The feature extractor returned {emb.shape[1]} channels for one {part} "
                    f"and {n_channels} for another."
                )
            part = "batch"  # (the later batches of this pass are checked against its first)
            aspects.append(emb.image_shapes[:, 0] / emb.image_shapes[:, 1])
            magnifications.append(_log_magnifications(emb))
            selected = self._pooled(take(emb))
            selected = gaussian._check_embeddings(selected, reset=True)
            mask = None if keep is None else torch.from_numpy(keep[start : start + len(emb)])
            # Deferred: the products wait for several batches (finalised below).
            moments = gaussian._accumulate(moments, selected, mask, defer=True)
            start += len(emb)
        gaussian._finalize(moments, (moments.n, len(channels), *emb.shape[2:]), consume=True)
        return gaussian, channels, n_channels, input_shape, (np.concatenate(aspects),
                                                            np.concatenate(magnifications))

    def _draw_channels(self, n_channels):
        n_features = self.n_features
        if n_features == "auto":
            n_features = None if n_channels <= _AUTO_MAX_FEATURES else _AUTO_MAX_FEATURES
        if n_features is None:
            return np.arange(n_channels)
        if n_features > n_channels:
            raise ValueError(
                f"n_features={self.n_features} is larger than the {n_channels} channels the "
                "feature extractor produces; use n_features <= "
                f"{n_channels} or None to keep all."
            )
        rng = check_random_state(self.random_state)
        return np.sort(rng.choice(n_channels, n_features, replace=False))

    def _patch_distances(self, X):
        """Mahalanobis distance of every patch of X, (n_images, h * w), unsmoothed."""
        return np.concatenate([dist.flatten(1).cpu().numpy() for dist, _ in self._iter_distances(X)])

    # -- maps and scores -----------------------------------------------------
    def _iter_maps(self, X, in_fit=None):
        """Yield (smoothed maps on the preprocessed frame (b, H, W), embeddings);
        ``in_fit`` as for :meth:`_iter_distances`."""
        calibrated = np.any(getattr(self, "level_slopes_", 0))  # (absent from older pickles)
        for dist, emb in self._iter_distances(X, in_fit):
            maps = _upsample_and_blur(dist, emb.input_shape, self.sigma)
            if calibrated:
                levels = self._normal_levels(_log_magnifications(emb))
                maps = maps / torch.as_tensor(levels, dtype=maps.dtype, device=maps.device)[:, None, None]
            yield maps, emb

    def _calibrates(self, n_images):
        """Whether a fit on ``n_images`` normal images with the magnifications of
        ``log_magnification_range_`` learns a size calibration."""
        return bool(self.size_calibration) and n_images >= _LEVEL_MIN_IMAGES and self._sizes_vary()

    def _sizes_vary(self):
        """Whether the training images' magnifications (``log_magnification_range_``)
        spread by more than 5% along an axis."""
        low, high = self.log_magnification_range_
        return bool(np.any(high - low > _LEVEL_MIN_SPREAD))

    def _level_pass(self, X, in_fit=None):
        """``(anomaly scores, map medians, log magnifications)`` of X's images in
        one pass, with the maps as they are (uncalibrated while ``level_slopes_``
        is zero); ``in_fit`` as for :meth:`_iter_distances`."""
        scores, medians, magnifications = [], [], []
        for maps, emb in self._iter_maps(X, in_fit):
            scores.append(_image_scores_from_maps(maps, self.image_score).cpu().numpy())
            medians.append(maps.flatten(1).median(dim=1).values.cpu().numpy())
            magnifications.append(_log_magnifications(emb))
        return tuple(np.concatenate(a).astype(np.float64) for a in (scores, medians, magnifications))

    def _learn_levels(self, magnifications, medians):
        """Set ``level_slopes_`` and the range from these images' magnifications and
        map medians; return their relative normal levels."""
        self.log_magnification_range_ = _magnification_range(magnifications)
        self.level_slopes_ = _fit_level_slopes(magnifications, medians)
        return self._normal_levels(magnifications)

    def _normal_levels(self, log_magnifications):
        """The level of a normal map, relative, at each log magnification (n, 2)
        (see ``size_calibration``)."""
        low, high = self.log_magnification_range_
        m = np.clip(log_magnifications, low, high)
        return np.exp((m - (low + high) / 2) @ self.level_slopes_)

    def _iter_distances(self, X, in_fit=None):
        """Yield (patch distances (b, h, w), embeddings), batch by batch.

        ``in_fit``: None, or bool (n_images, h * w) or (n_images, 1) marking the
        patches of X that the Gaussians were fitted on, whose distances are then
        taken leave-one-out (:func:`_leave_one_out_distances`).
        """
        check_is_fitted(self, "offset_")
        extractor = None if self.fitted_on_embeddings_ else self.feature_extractor_
        start = 0
        take = _ChannelTaker(self.channel_indices_)
        if in_fit is not None:
            counts = in_fit.sum(axis=0)
            shrinkage = None if self.gaussian_.shrinkage != "ledoit-wolf" else self.gaussian_.shrinkage_
        # Embeddings from an extractor carry their images' shapes too (a
        # Pipeline's): checked alike when the training embeddings had them, that
        # is when their frame is not just the grid. A plain array has none.
        check_aspect = not self.fitted_on_embeddings_ or (
            isinstance(X, PatchEmbeddings)
            and tuple(self.input_shape_) != tuple(self.gaussian_.grid_shape_)
        )
        subsets = _computes_subsets(extractor, X)
        channels = None
        if subsets:  # the extractor computes the kept channels only
            self._check_channel_count(extractor.n_channels_)  # before any image is read
            channels, take = self.channel_indices_, np.asarray
        for emb in self._embedding_batches(X, extractor, channels):
            if check_aspect:
                self._check_aspect(emb, start)
            dist = self.gaussian_._mahalanobis_tensor(self._select(emb, take, subsets))
            if check_aspect and tuple(emb.input_shape) != tuple(self.input_shape_):
                # The training grid and channels (checked above) from another
                # frame: its maps would be blurred and scored on a scale the
                # threshold was not set on. (Bare training embeddings have no
                # frame to hold others to, as they have no proportions.)
                raise ValueError(
                    f"X: embeddings of images preprocessed to {tuple(emb.input_shape)}, but the "
                    f"detector was fitted on {tuple(self.input_shape_)}; embed them as the "
                    "training images were."
                )
            if in_fit is not None:
                dist = _leave_one_out_distances(
                    dist, torch.from_numpy(in_fit[start : start + len(emb)]), counts, shrinkage)
            yield dist, emb
            start += len(emb)
        if start == 0:
            raise ValueError("X: got 0 images; at least one is required.")

    def iter_anomaly_maps(self, X):
        """Yield the anomaly map of each image in turn, batch by batch.

        For long streams (an inspection line, thousands of image paths, a
        generator): memory stays bounded by ``batch_size`` images.

        Parameters
        ----------
        X : array-like, tensor, list or iterator of images, or PatchEmbeddings
            Images in any format accepted by :meth:`fit`; not embeddings when
            the maps come from a localizer (``localizer_``), which cuts images
            into windows.

        Returns
        -------
        maps : iterator of ndarray of shape (H, W)
            The map of each image in turn, at its own resolution.

        Examples
        --------
        >>> import numpy as np
        >>> from skpadim import PatchEmbeddings, PatchGaussianDetector
        >>> emb = PatchEmbeddings(np.random.RandomState(0).rand(10, 4, 3, 3))
        >>> det = PatchGaussianDetector(n_features=None).fit(emb)
        >>> [m.shape for m in det.iter_anomaly_maps(emb[:2])]
        [(3, 3), (3, 3)]
        """
        # Checked now, not at the first next(): a generator runs nothing until then.
        check_is_fitted(self, "offset_")
        if getattr(self, "localizer_", None) is not None:
            if isinstance(X, PatchEmbeddings):
                raise ValueError(
                    "X: this detector's maps come from Gaussians fitted on windows of the "
                    "training images (localization), which embeddings cannot be cut into; "
                    "pass the images, or fit with localization='frame'."
                )
            return self.localizer_.iter_anomaly_maps(X)
        return (
            _to_image_resolution(amap, shape, emb.resize_shape, emb.crop_box).cpu().numpy()
            for maps, emb in self._iter_maps(X)
            for amap, shape in zip(maps, emb.image_shapes)
        )

    def score_samples(self, X):
        """Opposite of the anomaly score: higher means more normal.

        The anomaly score of an image summarises its anomaly map as
        ``image_score`` says (the mean of its top fraction, or its maximum), on
        the preprocessed frame, so it does not depend on the input resolution
        beyond what ``size_calibration`` corrects for.

        Parameters
        ----------
        X : array-like, tensor, list or iterator of images, or PatchEmbeddings
            Images in any format accepted by :meth:`fit`.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            Minus each image's anomaly score.
        """
        return self._score_samples(X)

    def _score_samples(self, X, in_fit=None):
        """:meth:`score_samples`, leave-one-out where ``in_fit`` (see _iter_maps)."""
        scores = [
            -_image_scores_from_maps(maps, self.image_score).cpu().numpy()
            for maps, _ in self._iter_maps(X, in_fit)
        ]
        return np.concatenate(scores).astype(np.float64)


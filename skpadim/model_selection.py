"""Cross-validation for detectors that learn from normal images only.

A PaDiM detector must be fitted on normal images, yet its hyper-parameters are
judged on a labelled set holding normal and defective images. scikit-learn's
splitters put defective images into the training folds, and an outlier
detector's ``fit`` ignores ``y`` (as :class:`sklearn.covariance.EllipticEnvelope`
does), so they would silently be learnt as normal. :class:`NormalOnlyKFold`
splits so that every training fold holds only normal samples and every test fold
holds its share of both classes; pass it as ``cv=`` to
:class:`~sklearn.model_selection.GridSearchCV` or
:func:`~sklearn.model_selection.cross_val_score`.
"""

import numbers
import warnings

import numpy as np
from sklearn.model_selection import BaseCrossValidator
from sklearn.utils import check_random_state

from .metrics import _normal_flags

__all__ = ["NormalOnlyKFold"]


class NormalOnlyKFold(BaseCrossValidator):
    """K-fold splits whose training folds hold normal samples only.

    Normal samples (``y == 0``, see ``split``) are split into ``n_splits`` folds as by
    :class:`~sklearn.model_selection.KFold`; anomalous samples (``y != 0``)
    are spread over the test folds too and never appear in a training fold.
    Test fold ``k`` = normal fold ``k`` + anomalous fold ``k``; training set
    ``k`` = all other normal folds.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds, at least 2.
    shuffle : bool, default=False
        Whether to shuffle each class before splitting.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling when ``shuffle=True``.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.model_selection import NormalOnlyKFold
    >>> y = np.array([0, 0, 0, 0, 1, 1])
    >>> for train, test in NormalOnlyKFold(n_splits=2).split(np.zeros(6), y):
    ...     print(train, test)
    [2 3] [0 1 4]
    [0 1] [2 3 5]
    """

    def __init__(self, n_splits=5, *, shuffle=False, random_state=None):
        # Splitters validate at construction, as scikit-learn's KFold does.
        if not isinstance(n_splits, numbers.Integral) or isinstance(n_splits, bool) or n_splits < 2:
            raise ValueError(f"n_splits must be an integer >= 2, got {n_splits!r}.")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be True or False, got {shuffle!r}.")
        if not shuffle and random_state is not None:
            # As KFold: a seed without shuffling would suggest randomness there is not.
            raise ValueError(
                "Setting a random_state has no effect since shuffle is False. Leave "
                "random_state at None, or set shuffle=True."
            )
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state

    def split(self, X, y, groups=None):
        """Generate indices of training (normal only) and test samples.

        Parameters
        ----------
        X : array-like or list of length n_samples
            The samples; only their number is used.
        y : array-like of shape (n_samples,), or masks
            0 normal / 1 anomalous (False / True for booleans), or +1 normal /
            -1 anomalous (scikit-learn's outlier convention, taken when integer
            labels hold no 0); or the
            ground-truth masks ``(n_samples, H, W)`` (or a list of 2-D masks) that
            the pixel-level scorers take as ``y``: a sample is normal when its mask
            is empty.
        groups : None
            Ignored.

        Yields
        ------
        train : ndarray
            Indices of normal samples to fit on.
        test : ndarray
            Indices of the samples to score, normal and anomalous.
        """
        if y is None:
            raise ValueError("NormalOnlyKFold needs y (0 = normal) to keep anomalies out of training.")
        flags = _normal_flags(y)
        if len(flags) != len(X):
            raise ValueError(f"X has {len(X)} samples but y has {len(flags)}.")
        normal = np.flatnonzero(flags)
        anomalous = np.flatnonzero(~flags)
        if len(normal) < self.n_splits:
            raise ValueError(
                f"n_splits={self.n_splits} needs at least that many normal samples; "
                f"got {len(normal)}."
            )
        if 0 < len(anomalous) < self.n_splits:
            # As StratifiedKFold warns of a class smaller than n_splits: some
            # test folds have no anomaly, and an AUROC cannot be computed on them.
            warnings.warn(
                f"Only {len(anomalous)} anomalous samples for n_splits={self.n_splits}: "
                f"{self.n_splits - len(anomalous)} test folds have none, so image-level "
                "scores such as the AUROC cannot be computed on them.",
                UserWarning,
            )
        rng = check_random_state(self.random_state)
        if self.shuffle:
            normal = rng.permutation(normal)
            anomalous = rng.permutation(anomalous)
        normal_folds = np.array_split(normal, self.n_splits)
        anomalous_folds = np.array_split(anomalous, self.n_splits)
        for k in range(self.n_splits):
            train = np.concatenate([f for i, f in enumerate(normal_folds) if i != k])
            test = np.concatenate([normal_folds[k], anomalous_folds[k]])
            yield np.sort(train), np.sort(test)

    def _iter_test_indices(self, X=None, y=None, groups=None):  # pragma: no cover - split overrides
        for _, test in self.split(X, y, groups):
            yield test

    def get_n_splits(self, X=None, y=None, groups=None):
        """Number of splits.

        Parameters
        ----------
        X, y, groups : ignored

        Returns
        -------
        n_splits : int
            The ``n_splits`` parameter.
        """
        return self.n_splits

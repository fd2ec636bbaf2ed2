"""The per-position Gaussian of PaDiM: patch embeddings -> means, shrunk covariances,
Cholesky factors and Mahalanobis maps.

Every patch position ``(i, j)`` of the feature grid gets its own multivariate
Gaussian over the ``C`` embedding channels. Fitting streams: a batch of embeddings
is reduced to sufficient statistics (count, mean, centred scatter matrix and the
two higher moments that Ledoit-Wolf needs), which are merged into the running
totals with centred updates, so memory does not grow with the number of images
and float32 inputs with a large mean lose no precision.

The math lives in plain functions over torch tensors shaped ``(P, ...)``, one entry
per position, so that whole chunks of positions are processed by batched matrix
products; :class:`PatchCovariance` is the thin validated estimator around them.
"""

import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._device import resolve_device

__all__ = ["PatchCovariance", "ledoit_wolf_shrinkage_from_moments"]

# Bound on the float64 temporaries of one chunk of positions (bytes). Chunking
# over positions keeps peak memory independent of the grid size.
_CHUNK_BYTES = 256 * 2**20


class _Moments:
    """Centred sufficient statistics of a set of vectors, one set per position.

    For each position with samples ``x_k`` and mean ``m`` (``y_k = x_k - m``):
    ``n`` samples, ``mean = m``, ``m2 = sum y y^T``, ``t = sum |y|^2 y`` and
    ``q = sum |y|^4``. ``t`` and ``q`` are what Ledoit-Wolf needs beyond the
    covariance; ``t`` is only needed to move ``q`` to a new centre when merging.
    """

    def __init__(self, n, mean, m2, t, q):
        self.n, self.mean, self.m2, self.t, self.q = n, mean, m2, t, q

    @classmethod
    def of_batch(cls, Y):
        """Statistics of ``Y`` with shape ``(P, n, C)`` (float64)."""
        n = Y.shape[1]
        mean = Y.mean(dim=1)
        Yc = Y - mean[:, None, :]
        m2 = torch.bmm(Yc.transpose(1, 2), Yc)
        sq = (Yc * Yc).sum(dim=2)  # (P, n): |y_k|^2
        t = torch.bmm(sq[:, None, :], Yc)[:, 0, :]
        q = (sq * sq).sum(dim=1)
        return cls(n, mean, m2, t, q)

    def _shifted(self, d):
        """The statistics about ``mean + d`` instead of ``mean`` (``d``: (P, C))."""
        n, m2, t, q = self.n, self.m2, self.t, self.q
        tr = torch.diagonal(m2, dim1=1, dim2=2).sum(dim=1)
        m2d = torch.bmm(m2, d[:, :, None])[:, :, 0]
        dd = (d * d).sum(dim=1)
        m2_new = m2 + n * d[:, :, None] * d[:, None, :]
        t_new = t - 2 * m2d - (tr + n * dd)[:, None] * d
        q_new = (
            q + 4 * (d * m2d).sum(dim=1) + n * dd * dd - 4 * (d * t).sum(dim=1) + 2 * dd * tr
        )
        return m2_new, t_new, q_new

    def merge(self, other):
        """Statistics of the union of both sample sets (Chan et al.'s pairwise update)."""
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        a = self._shifted(mean - self.mean)
        b = other._shifted(mean - other.mean)
        return _Moments(n, mean, a[0] + b[0], a[1] + b[1], a[2] + b[2])


def ledoit_wolf_shrinkage_from_moments(n, m2, q):
    """Ledoit-Wolf shrinkage per position from centred moments.

    The same estimate as :func:`sklearn.covariance.ledoit_wolf_shrinkage` on the
    centred samples, written in terms of statistics that can be streamed.

    Parameters
    ----------
    n : int
        Number of samples.
    m2 : torch.Tensor of shape (P, C, C)
        Centred scatter matrices ``sum_k y_k y_k^T``.
    q : torch.Tensor of shape (P,)
        ``sum_k |y_k|^4``.

    Returns
    -------
    shrinkage : torch.Tensor of shape (P,)
        Coefficient in [0, 1] of the convex combination
        ``(1 - s) * S + s * mu * I`` with ``S = m2 / n``, ``mu = trace(S) / C``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn.covariance import ledoit_wolf_shrinkage
    >>> x = np.random.RandomState(0).randn(20, 5)
    >>> y = torch.from_numpy(x - x.mean(0))
    >>> s = ledoit_wolf_shrinkage_from_moments(20, (y.T @ y)[None], ((y**2).sum(1)**2).sum()[None])
    >>> bool(np.isclose(float(s[0]), ledoit_wolf_shrinkage(x)))
    True
    """
    c = m2.shape[-1]
    S = m2 / n
    mu = torch.diagonal(S, dim1=1, dim2=2).sum(dim=1) / c
    fro2 = (S * S).sum(dim=(1, 2))
    # beta: estimated variance of the sample covariance entries; delta: squared
    # distance of S to the scaled identity. Both as in Ledoit & Wolf (2004).
    beta = (q / n - fro2) / (c * n)
    delta = (fro2 - c * mu * mu) / c
    beta = torch.minimum(beta.clamp(min=0), delta)
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    return torch.where(beta > 0, beta / safe_delta, torch.zeros_like(beta))


def cholesky_lower(cov):
    """Lower Cholesky factors of a batch of SPD matrices, robust to semi-definiteness.

    Positions whose covariance is singular in floating point (constant image
    regions give zero-variance channels) receive a small diagonal jitter, growing
    tenfold until the factorisation succeeds, instead of failing the whole fit.
    """
    L, info = torch.linalg.cholesky_ex(cov)
    bad = info > 0
    if bool(bad.any()):
        scale = torch.diagonal(cov, dim1=1, dim2=2).mean(dim=1).abs()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        for exponent in range(-10, 1):
            idx = torch.nonzero(bad).flatten()
            if len(idx) == 0:
                break
            jitter = (scale[idx] * 10.0**exponent)[:, None, None] * eye
            L_fix, info_fix = torch.linalg.cholesky_ex(cov[idx] + jitter)
            ok = info_fix == 0
            L[idx[ok]] = L_fix[ok]
            bad[idx[ok]] = False
        if bool(bad.any()):
            raise np.linalg.LinAlgError(
                f"Covariance of {int(bad.sum())} patch positions is not positive definite."
            )
    return L


def mahalanobis_from_cholesky(X, location, cholesky):
    """Mahalanobis distances ``sqrt((x - mu)^T Sigma^-1 (x - mu))`` per position.

    Parameters
    ----------
    X : torch.Tensor of shape (P, n, C)
    location : torch.Tensor of shape (P, C)
    cholesky : torch.Tensor of shape (P, C, C)
        Lower factors ``L`` with ``L L^T = Sigma``.

    Returns
    -------
    distances : torch.Tensor of shape (P, n)
    """
    diff = (X - location[:, None, :]).transpose(1, 2)  # (P, C, n)
    # Solving L z = diff whitens the residuals; |z|^2 is the squared distance.
    z = torch.linalg.solve_triangular(cholesky, diff, upper=False)
    return (z * z).sum(dim=1).sqrt()


def _positions_view(X):
    """(n, C, h, w) -> (P, n, C) without copying the channels."""
    n, c, h, w = X.shape
    return X.reshape(n, c, h * w).permute(2, 0, 1)


def _chunk_size(n, c, bytes_per_value=8):
    per_position = max(n * c + c * c, 1) * bytes_per_value * 3
    return max(1, _CHUNK_BYTES // per_position)


class PatchCovariance(BaseEstimator):
    """One Gaussian per patch position, with Ledoit-Wolf or fixed shrinkage.

    Fits, for every position of a feature grid, the mean and covariance of the
    ``C``-dimensional patch embeddings of the training images, and scores new
    embeddings by their Mahalanobis distance to the Gaussian of their position.
    Statistics are streamed: :meth:`partial_fit` can be called on successive
    batches and memory depends on the grid and ``C``, not on the number of
    images.

    Parameters
    ----------
    shrinkage : "ledoit-wolf" or float, default="ledoit-wolf"
        ``"ledoit-wolf"`` shrinks each position's maximum-likelihood covariance
        ``S`` towards ``mu * I`` by the Ledoit-Wolf coefficient, exactly as
        :class:`sklearn.covariance.LedoitWolf` fitted on that position alone. A
        float ``eps >= 0`` is the PaDiM paper's regularisation: the unbiased
        sample covariance plus ``eps * I`` (the paper uses 0.01).
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the batched linear algebra runs; ``"auto"`` takes a GPU when there
        is one. Fitted attributes are always stored as numpy arrays.
    dtype : {"float32", "float64"}, default="float32"
        Precision of the stored location, covariance and Cholesky factors.
        Accumulation always uses float64.
    store_covariance : bool, default=True
        Whether to keep ``covariance_``; scoring needs only ``cholesky_``, so
        turning it off halves the fitted size.

    Attributes
    ----------
    location_ : ndarray of shape (P, C)
        Mean embedding of each of the ``P = h * w`` positions.
    covariance_ : ndarray of shape (P, C, C)
        Shrunk covariance per position (only if ``store_covariance``).
    cholesky_ : ndarray of shape (P, C, C)
        Lower Cholesky factor of each shrunk covariance.
    shrinkage_ : ndarray of shape (P,)
        Ledoit-Wolf coefficient per position (or ``nan`` for a fixed ``eps``).
    grid_shape_ : tuple of int
        ``(h, w)`` of the feature grid.
    n_features_in_ : int
        Number of embedding channels ``C``.
    n_samples_seen_ : int
        Number of training embeddings (images) seen so far.

    See Also
    --------
    sklearn.covariance.LedoitWolf : The same estimate for a single Gaussian.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PatchCovariance
    >>> X = np.random.RandomState(0).randn(30, 4, 2, 3)   # 30 images, 4 channels, 2x3 grid
    >>> gauss = PatchCovariance(shrinkage="ledoit-wolf").fit(X)
    >>> gauss.location_.shape, gauss.cholesky_.shape
    ((6, 4), (6, 4, 4))
    >>> gauss.mahalanobis(X[:2]).shape
    (2, 2, 3)
    """

    _parameter_constraints = {
        "shrinkage": [StrOptions({"ledoit-wolf"}), Interval(numbers.Real, 0, None, closed="left")],
        "device": [StrOptions({"auto", "cpu", "cuda"}), torch.device],
        "dtype": [StrOptions({"float32", "float64"})],
        "store_covariance": ["boolean"],
    }

    def __init__(
        self, shrinkage="ledoit-wolf", *, device="auto", dtype="float32", store_covariance=True
    ):
        self.shrinkage = shrinkage
        self.device = device
        self.dtype = dtype
        self.store_covariance = store_covariance

    # -- input -----------------------------------------------------------------
    def _check_embeddings(self, X, reset):
        if isinstance(X, torch.Tensor):
            X = X.detach()
        else:
            X = np.asarray(X)
            if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
                raise TypeError(f"X: embeddings must be real numbers, got dtype {X.dtype}.")
            X = torch.from_numpy(np.ascontiguousarray(X))
        if X.ndim != 4:
            raise ValueError(
                "X: expected patch embeddings of shape (n_images, n_channels, height, width), "
                f"got shape {tuple(X.shape)}."
            )
        if X.shape[0] == 0:
            raise ValueError("X: got 0 images; at least one is required.")
        if not bool(torch.isfinite(X).all()):
            raise ValueError("X: embeddings contain NaN or infinite values.")
        if not reset:
            expected = (self.n_features_in_, *self.grid_shape_)
            if tuple(X.shape[1:]) != expected:
                raise ValueError(
                    f"X: embeddings have shape (n, C, h, w) = (n, {', '.join(map(str, X.shape[1:]))}) "
                    f"but this PatchCovariance was fitted on (n, {', '.join(map(str, expected))})."
                )
        return X

    # -- fitting ---------------------------------------------------------------
    def fit(self, X, y=None):
        """Fit the per-position Gaussians on embeddings of normal images.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_images, C, h, w)
            Patch embeddings of normal images.
        y : None
            Ignored.

        Returns
        -------
        self : PatchCovariance
            The fitted estimator.
        """
        self._validate_params()
        X = self._check_embeddings(X, reset=True)
        self._moments = self._accumulate(None, X)
        self._finalize(self._moments, X.shape)
        return self

    def partial_fit(self, X, y=None):
        """Update the statistics with a batch of embeddings and refit.

        Successive calls give the same result as one :meth:`fit` on all batches
        together, and a call after :meth:`fit` continues from it. The float64
        running statistics (as large as the covariances) are kept in a private
        attribute, and pickled, so that more batches can follow.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_images, C, h, w)
            Patch embeddings of normal images.
        y : None
            Ignored.

        Returns
        -------
        self : PatchCovariance
            The updated estimator.
        """
        first = not hasattr(self, "_moments")
        if first:
            self._validate_params()
        X = self._check_embeddings(X, reset=first)
        self._moments = self._accumulate(None if first else self._moments, X)
        self._finalize(self._moments, X.shape)
        return self

    def _accumulate(self, moments, X):
        """Merge the statistics of batch X into ``moments`` (None to start afresh)."""
        device = resolve_device(self.device)
        n, c = X.shape[:2]
        Y = _positions_view(X)
        step = _chunk_size(n, c)
        parts = []
        for start in range(0, Y.shape[0], step):
            chunk = Y[start : start + step].to(device=device, dtype=torch.float64)
            parts.append(_Moments.of_batch(chunk))
        batch = _Moments(
            n,
            torch.cat([p.mean for p in parts]),
            torch.cat([p.m2 for p in parts]),
            torch.cat([p.t for p in parts]),
            torch.cat([p.q for p in parts]),
        )
        return batch if moments is None else moments.merge(batch)

    def _finalize(self, moments, shape):
        """Shrunk covariances and their Cholesky factors from the moments."""
        n = moments.n
        c = moments.m2.shape[-1]
        eye = torch.eye(c, dtype=torch.float64, device=moments.m2.device)
        if self.shrinkage == "ledoit-wolf":
            shrink = ledoit_wolf_shrinkage_from_moments(n, moments.m2, moments.q)
            S = moments.m2 / n
            mu = torch.diagonal(S, dim1=1, dim2=2).sum(dim=1) / c
            cov = (1 - shrink)[:, None, None] * S + (shrink * mu)[:, None, None] * eye
        else:
            if n < 2:
                raise ValueError(
                    "A fixed shrinkage needs at least 2 training images to estimate a "
                    f"covariance; got {n}. Use shrinkage='ledoit-wolf' or more images."
                )
            if n <= c and self.shrinkage < 1e-3:
                warnings.warn(
                    f"Only {n} training images for {c} channels: the sample covariance "
                    f"is singular and shrinkage={self.shrinkage} barely regularises it; "
                    "distances may be unreliable. Consider shrinkage='ledoit-wolf'.",
                    UserWarning,
                )
            shrink = torch.full((moments.m2.shape[0],), float("nan"), dtype=torch.float64)
            cov = moments.m2 / (n - 1) + float(self.shrinkage) * eye
        L = cholesky_lower(cov)
        np_dtype = np.dtype(self.dtype)
        # C order: torch's factors are column-major per matrix, and a layout that
        # changed after a pickle round trip would change the floating-point results.
        self.location_ = np.ascontiguousarray(moments.mean.cpu().numpy(), dtype=np_dtype)
        self.cholesky_ = np.ascontiguousarray(L.cpu().numpy(), dtype=np_dtype)
        if self.store_covariance:
            self.covariance_ = np.ascontiguousarray(cov.cpu().numpy(), dtype=np_dtype)
        elif hasattr(self, "covariance_"):
            del self.covariance_
        self.shrinkage_ = shrink.cpu().numpy()
        self.grid_shape_ = (int(shape[2]), int(shape[3]))
        self.n_features_in_ = int(c)
        self.n_samples_seen_ = int(n)

    # -- scoring ---------------------------------------------------------------
    def mahalanobis(self, X):
        """Mahalanobis distance of each patch to the Gaussian of its position.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_images, C, h, w)
            Patch embeddings, with the channels and grid seen in :meth:`fit`.

        Returns
        -------
        distances : ndarray of shape (n_images, h, w)
            Non-negative float32 distances; larger means more anomalous.
        """
        return self._mahalanobis_tensor(X).cpu().numpy()

    def _mahalanobis_tensor(self, X):
        check_is_fitted(self, "cholesky_")
        X = self._check_embeddings(X, reset=False)
        device = resolve_device(self.device)
        n, c, h, w = X.shape
        Y = _positions_view(X)
        dtype = torch.from_numpy(self.cholesky_[:0]).dtype
        step = _chunk_size(n, c, bytes_per_value=4)
        out = torch.empty((h * w, n), dtype=dtype, device=device)
        for start in range(0, h * w, step):
            stop = start + step
            loc = torch.from_numpy(self.location_[start:stop]).to(device)
            chol = torch.from_numpy(self.cholesky_[start:stop]).to(device)
            out[start:stop] = mahalanobis_from_cholesky(
                Y[start:stop].to(device=device, dtype=dtype), loc, chol
            )
        return out.T.reshape(n, h, w)

    def score_samples(self, X):
        """Negative squared Mahalanobis distance, per patch (higher = more normal).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_images, C, h, w)
            Patch embeddings.

        Returns
        -------
        scores : ndarray of shape (n_images, h, w)
        """
        return -self.mahalanobis(X) ** 2

    def __getstate__(self):
        # Running statistics may live on a GPU; pickle them from the CPU so that
        # a model saved on a GPU machine loads on a CPU-only one.
        state = self.__dict__.copy()
        moments = state.get("_moments")
        if moments is not None:
            state["_moments"] = _Moments(
                moments.n, *(t.cpu() for t in (moments.mean, moments.m2, moments.t, moments.q))
            )
        return state

"""The per-position Gaussian of PaDiM: patch embeddings -> means, shrunk covariances,
Cholesky factors and Mahalanobis maps.

Every patch position ``(i, j)`` of the feature grid gets its own multivariate
Gaussian over the ``C`` embedding channels. Fitting streams: each batch of
embeddings is added to running sums (count, first and second moments, and the two
higher moments that Ledoit-Wolf needs) taken about the first batch's mean, so
memory does not grow with the number of images and float32 inputs with a large
mean lose no precision.

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
# Largest set of Cholesky factors for which scoring keeps their inverses too.
_WHITENING_BYTES = 1 * 2**30


class _Moments:
    """Sufficient statistics of a set of vectors, one set per position, streamed.

    Sums are taken about a fixed reference ``ref`` per position, the mean of the
    first batch: with ``y_k = x_k - ref``, ``n`` samples, ``s1 = sum y``,
    ``s2 = sum y y^T``, ``t = sum |y|^2 y`` and ``q = sum |y|^4``. Because the
    reference is already close to the mean, the final centring subtracts small
    corrections and loses no precision (the "shifted data" algorithm), while a
    batch costs one accumulating matrix product: no merge passes over the
    matrices. ``s2`` may be float32 to halve the memory; the rest is float64.
    """

    def __init__(self, n, ref, s1, s2, t, q):
        self.n, self.ref, self.s1, self.s2, self.t, self.q = n, ref, s1, s2, t, q

    @classmethod
    def zeros(cls, p, c, s2_dtype, device):
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            0,
            None,
            torch.zeros((p, c), **f64),
            torch.zeros((p, c, c), dtype=s2_dtype, device=device),
            torch.zeros((p, c), **f64),
            torch.zeros((p,), **f64),
        )

    def copy(self):
        return _Moments(self.n, *(None if x is None else x.clone()
                                  for x in (self.ref, self.s1, self.s2, self.t, self.q)))

    def add_chunk(self, sl, X):
        """Add samples ``X`` (float64, shape (P_chunk, n, C)) of positions ``sl``."""
        Y = X - self.ref[sl][:, None, :]
        self.s1[sl] += Y.sum(dim=1)
        Ys = Y.to(self.s2.dtype)
        self.s2[sl].baddbmm_(Ys.transpose(1, 2), Ys)
        sq = (Y * Y).sum(dim=2)  # (P, n): |y_k|^2
        self.t[sl] += torch.bmm(sq[:, None, :], Y)[:, 0, :]
        self.q[sl] += (sq * sq).sum(dim=1)

    def centred(self, sl):
        """``(mean, m2, q)`` of positions ``sl`` about their own mean, in float64.

        ``m2 = sum (x - mean)(x - mean)^T`` and ``q = sum |x - mean|^4``, from the
        sums about ``ref`` moved by ``d = mean - ref``.
        """
        n = self.n
        d = self.s1[sl] / n
        s2 = self.s2[sl].to(torch.float64)
        m2 = s2 - n * d[:, :, None] * d[:, None, :]
        dd = (d * d).sum(dim=1)
        s2d = torch.bmm(s2, d[:, :, None])[:, :, 0]
        tr = torch.diagonal(s2, dim1=1, dim2=2).sum(dim=1)
        q = (
            self.q[sl] - 4 * (d * self.t[sl]).sum(dim=1) + 4 * (d * s2d).sum(dim=1)
            + 2 * dd * tr - 3 * n * dd * dd
        )
        return self.ref[sl] + d, m2, q


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
        Precision of the stored location, covariance and Cholesky factors, and of
        the running scatter matrices (the one large statistic; everything else
        accumulates in float64, and the sums are taken about the first batch's
        mean, so float32 loses no digits to large means).
    store_covariance : bool, default=True
        Whether to keep ``covariance_``; scoring needs only ``cholesky_``, so
        turning it off halves the fitted size.
    compact : bool, default=False
        Round the Cholesky factors to float16 and pickle only their lower
        triangles: a quarter of the float32 size. Scores are computed from the
        rounded factors, before and after a pickle round trip alike.

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
        "compact": ["boolean"],
    }

    def __init__(
        self,
        shrinkage="ledoit-wolf",
        *,
        device="auto",
        dtype="float32",
        store_covariance=True,
        compact=False,
    ):
        self.shrinkage = shrinkage
        self.device = device
        self.dtype = dtype
        self.store_covariance = store_covariance
        self.compact = compact

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
        moments = self._accumulate(None, X)
        self._finalize(moments, X.shape, consume=True)
        if hasattr(self, "_moments"):
            del self._moments
        return self

    def partial_fit(self, X, y=None):
        """Update the statistics with a batch of embeddings and refit.

        Successive calls give the same result as one :meth:`fit` on all batches
        together. The running statistics (as large as the covariances) are kept
        in a private attribute, and pickled, so that more batches can follow;
        :meth:`fit` does not keep them, so a model fitted by :meth:`fit` cannot be
        continued (partial_fit then raises).

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
        if first and hasattr(self, "cholesky_"):
            raise ValueError(
                "This PatchCovariance was fitted with fit(), which does not keep the running "
                "statistics; use partial_fit for every batch (or fit on all of them)."
            )
        if first:
            self._validate_params()
        X = self._check_embeddings(X, reset=first)
        # Merge into a copy so that a failure part way leaves the statistics intact.
        moments = self._accumulate(None if first else self._moments.copy(), X)
        self._finalize(moments, X.shape, consume=False)
        self._moments = moments
        return self

    def _accumulate(self, moments, X):
        """Merge the statistics of batch X into ``moments`` (None to start afresh).

        The batch is added a chunk of positions at a time, in place, so
        temporaries stay chunk-sized.
        """
        device = resolve_device(self.device)
        n, c = X.shape[:2]
        Y = _positions_view(X)
        if moments is None:
            moments = _Moments.zeros(Y.shape[0], c, self._m2_dtype(), device)
        step = _chunk_size(n, c)
        if moments.ref is None:
            # The first batch's mean is the reference the sums are taken about.
            moments.ref = torch.cat([
                Y[start : start + step].to(device=device, dtype=torch.float64).mean(dim=1)
                for start in range(0, Y.shape[0], step)
            ])
        for start in range(0, Y.shape[0], step):
            chunk = Y[start : start + step].to(device=device, dtype=torch.float64)
            moments.add_chunk(slice(start, start + step), chunk)
        moments.n += n
        return moments

    def _m2_dtype(self):
        # The scatter matrices are the only large statistic; sums about a nearby
        # reference keep float32 accurate, and float64 is there for exact comparisons.
        return torch.float64 if self.dtype == "float64" else torch.float32

    def _finalize(self, moments, shape, consume=False):
        """Shrunk covariances and their Cholesky factors from the moments.

        Done a chunk of positions at a time; with ``consume`` the factors are
        written over the scatter matrices, so that the peak memory of a fit is one
        set of matrices rather than three.
        """
        n = moments.n
        p, c = moments.s1.shape
        if self.shrinkage != "ledoit-wolf":
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
        out_dtype = torch.float64 if self.dtype == "float64" else torch.float32
        chol = moments.s2 if consume and moments.s2.dtype == out_dtype else torch.empty(
            (p, c, c), dtype=out_dtype, device=moments.s2.device
        )
        cov_out = np.empty((p, c, c), dtype=self.dtype) if self.store_covariance else None
        shrink = torch.full((p,), float("nan"), dtype=torch.float64)
        eye = torch.eye(c, dtype=torch.float64, device=moments.s2.device)
        location = torch.empty((p, c), dtype=torch.float64)
        step = _chunk_size(0, c)
        for start in range(0, p, step):
            sl = slice(start, start + step)
            mean, m2, q = moments.centred(sl)
            location[sl] = mean.cpu()
            if self.shrinkage == "ledoit-wolf":
                s = ledoit_wolf_shrinkage_from_moments(n, m2, q)
                S = m2 / n
                mu = torch.diagonal(S, dim1=1, dim2=2).sum(dim=1) / c
                cov = (1 - s)[:, None, None] * S + (s * mu)[:, None, None] * eye
                shrink[sl] = s.cpu()
            else:
                cov = m2 / (n - 1) + float(self.shrinkage) * eye
            if cov_out is not None:
                cov_out[sl] = cov.cpu().numpy()
            factor = cholesky_lower(cov)
            if self.compact:
                factor = factor.to(torch.float16)
            chol[sl] = factor.to(out_dtype)
        # C order: a layout that changed after a pickle round trip would change the
        # floating-point results of the triangular solves.
        self.location_ = np.ascontiguousarray(location.numpy(), dtype=self.dtype)
        self.cholesky_ = np.ascontiguousarray(chol.cpu().numpy())
        if cov_out is not None:
            self.covariance_ = cov_out
        elif hasattr(self, "covariance_"):
            del self.covariance_
        self.shrinkage_ = shrink.numpy()
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
        # Whitening matrices make scoring several times faster but are as large as
        # the factors; past a size, solve with the factors chunk by chunk instead.
        whitening = self._whitening_matrices() if self.cholesky_.nbytes <= _WHITENING_BYTES else None
        dtype = torch.from_numpy(self.cholesky_[:0]).dtype
        step = _chunk_size(n, c, bytes_per_value=4)
        out = torch.empty((h * w, n), dtype=dtype, device=device)
        for start in range(0, h * w, step):
            stop = start + step
            loc = torch.from_numpy(self.location_[start:stop]).to(device)
            diff = (Y[start:stop].to(device=device, dtype=dtype) - loc[:, None, :]).transpose(1, 2)
            diff = diff.contiguous()  # batched products are much slower on strided operands
            if whitening is not None:
                z = torch.bmm(whitening[start:stop].to(device), diff)
            else:
                chol = torch.from_numpy(self.cholesky_[start:stop]).to(device)
                z = torch.linalg.solve_triangular(chol, diff, upper=False)
            out[start:stop] = (z * z).sum(dim=1).sqrt()
        return out.T.reshape(n, h, w)

    def _whitening_matrices(self):
        """``L^-1`` per position, from the Cholesky factors by triangular solves.

        Scoring then whitens residuals with one batched matrix product, several
        times faster than a triangular solve per call. Derived, so not pickled:
        recomputed (identically) after loading.
        """
        cached = self.__dict__.get("_whitening")
        if cached is not None and cached[0] is self.cholesky_:
            return cached[1]
        chol = torch.from_numpy(self.cholesky_)
        c = chol.shape[-1]
        W = torch.empty_like(chol)
        eye = torch.eye(c, dtype=chol.dtype)
        step = _chunk_size(0, c, bytes_per_value=4)
        for start in range(0, len(chol), step):
            block = chol[start : start + step]
            W[start : start + step] = torch.linalg.solve_triangular(
                block, eye.expand(len(block), c, c).contiguous(), upper=False
            )
        self._whitening = (self.cholesky_, W)
        return W

    def score_samples(self, X):
        """Negative squared Mahalanobis distance, per patch (higher = more normal).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_images, C, h, w)
            Patch embeddings.

        Returns
        -------
        scores : ndarray of shape (n_images, h, w)
            ``-mahalanobis(X) ** 2``.
        """
        return -self.mahalanobis(X) ** 2

    def __getstate__(self):
        # Running statistics may live on a GPU; pickle them from the CPU so that
        # a model saved on a GPU machine loads on a CPU-only one.
        state = self.__dict__.copy()
        state.pop("_whitening", None)
        moments = state.get("_moments")
        if moments is not None:
            state["_moments"] = _Moments(
                moments.n,
                *(x.cpu() for x in (moments.ref, moments.s1, moments.s2, moments.t, moments.q)),
            )
        if self.compact and "cholesky_" in state:
            # Only the lower triangle, in float16: what compact promises on disk.
            p, c, _ = state["cholesky_"].shape
            rows, cols = np.tril_indices(c)
            state["cholesky_"] = (state["cholesky_"][:, rows, cols].astype(np.float16), c)
        return state

    def __setstate__(self, state):
        packed = state.get("cholesky_")
        if isinstance(packed, tuple):
            tril, c = packed
            full = np.zeros((tril.shape[0], c, c), dtype=np.dtype(state.get("dtype", "float32")))
            rows, cols = np.tril_indices(c)
            full[:, rows, cols] = tril
            state["cholesky_"] = full
        self.__dict__.update(state)

"""The per-position Gaussian of PaDiM: patch embeddings -> means, shrunk covariances,
Cholesky factors and Mahalanobis maps.

Every patch position ``(i, j)`` of the feature grid gets its own multivariate
Gaussian over the ``C`` embedding channels. Fitting streams: each batch of
embeddings is added to running sums (count, first and second moments, and, for
Ledoit-Wolf only, two higher moments) taken about the first batch's mean, so
memory does not grow with the number of images and float32 sums lose no precision
to a large mean. The fit runs in the estimator's precision (float32 by default):
batched products accumulate the scatter matrices, and a blocked batched Cholesky
factorises the shrunk covariances, with a float64 retry for the rare positions
that are not positive definite in float32.

The math lives in plain functions over torch tensors shaped ``(P, ...)``, one entry
per position, so that whole chunks of positions are processed by batched matrix
products; :class:`PatchCovariance` is the thin validated estimator around them.
"""

import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._device import resolve_device

__all__ = ["PatchCovariance", "ledoit_wolf_shrinkage_from_moments"]

# Bound on the temporaries of one chunk of positions when scoring (bytes). Chunking
# over positions keeps peak memory independent of the grid size.
_CHUNK_BYTES = 256 * 2**20
# Largest set of Cholesky factors for which scoring keeps their inverses too.
_WHITENING_BYTES = 1 * 2**30
# Past that size, scoring on a CPU solves with the factors by block forward
# substitution, in blocks of this many rows, keeping only the inverses of the
# diagonal blocks (C x _SOLVE_BLOCK values per position): batched products, where
# one LAPACK triangular solve per position runs at a fraction of their speed.
# Even, and twice the blocked Cholesky's block for wide matrices, whose diagonal
# inverses the fit then reuses. The factors are read in place, so a chunk of
# positions is bounded by its residuals only (bytes), and large chunks make the
# products efficient.
_SOLVE_BLOCK = 64
# Widest triangular block inverted by one LAPACK solve per matrix (see
# _triangular_inverse).
_TRSM_LEAF = 16
_SOLVE_CHUNK_BYTES = 64 * 2**20

# Working-set targets of the fit on a CPU (bytes). A batch is added a chunk of
# positions at a time: the chunk's shifted samples (read by several reductions and
# products) and each product's output tile should stay in cache, while every
# chunk still amortises torch's per-call overhead. The finalisation factorises
# whole (narrow) matrices in place by cache-sized chunks, whose temporaries the
# allocator reuses; block-triangular ones a chunk of their storage at a time
# (see _SCATTER_CHUNK_BYTES). On a GPU the chunks only bound memory, so they are
# much larger.
_GATHER_BYTES = 4 * 2**20
_FINALIZE_BYTES = 16 * 2**20
_GPU_SCALE = 64
_GPU_FINALIZE_BYTES = 1 * 2**30
# Images whose shifted samples wait for one accumulating product over all of
# them: every update of the scatter matrices reads and writes all of them, so a
# batch of the detector (32 images) per update spends much of its time moving
# the statistics, and products summing over 32 images run slower than those
# over 128 (for 550 channels, 58 against 105 GFLOP/s on a 2-core CPU). They
# wait in the statistics' spare storage (see _ScatterBlocks: for 550 channels
# on a 56 x 56 grid 128 images take 883 MB of its 1.7 GB) when it holds at
# least as many as a buffer of their own would, else (whole matrices leave
# none) in a buffer of their own bounded by _PENDING_BYTES.
_PENDING_IMAGES = 128
_PENDING_BYTES = 64 * 2**20
# Bound on the images transposed at once in the reference's precision when the
# input has more than the work (float64, or integers, which are shifted in
# float64; bytes), before they are shifted and rounded into the buffer.
_TRANSPOSE_BYTES = 256 * 2**20
# Scatter matrices wider than twice this are accumulated in row blocks of this
# many rows, lower block triangle only: for 550 channels that saves 44% of the
# products' flops, memory and memory traffic.
_ROW_BLOCK = 64
# Such block-triangular statistics come in chunks of positions of about this
# size (bytes), and the finalisation unpacks and factorises one chunk at a time:
# large enough for the batched products of the blocked Cholesky to be efficient
# (100 matrices of 550 channels factorise 1.7x faster per matrix than 13 do).
_SCATTER_CHUNK_BYTES = 64 * 2**20
# With Ledoit-Wolf, the least average variance a position's covariance may have,
# as a fraction of the average over the grid. A region that never varies in
# training (a black background, padding) has a zero covariance, which the
# shrinkage cannot lift: it shrinks towards the region's own (zero) scale, and
# the tiniest change there would be an enormous distance.
_VARIANCE_FLOOR = 1e-2


class _ScatterBlocks:
    """Running scatter matrices of ``P`` positions, as their lower block triangles.

    Row block ``r`` (rows ``r0:r1``) keeps columns ``0:r1``: its whole diagonal
    block and everything left of it. In each chunk of positions every row block
    is one contiguous ``(m, r1 - r0, r1)`` tensor, so that a batched product
    accumulates straight into it (the GEMM's own beta = 1). A product into a
    strided slice of whole matrices falls back to one call per matrix, and one
    into a temporary needs a second pass over the statistics to be added: both
    several times slower. With ``rows >= C`` there is one block, the whole
    matrices, in a single chunk: a ``(P, C, C)`` tensor (:meth:`whole`).

    Fresh, the chunks lie side by side at the start of one ``(P, C, C)``
    allocation (:attr:`storage`), and the rest of it (:meth:`spare`, the size
    of the upper block triangles) holds the samples waiting for the products
    while the statistics accumulate. Once chunks are unpacked (:meth:`lower`),
    last chunk first, the factors of their positions can be written over them:
    a chunk's factors cover only its own statistics and those of the chunks
    after it. A fit thus allocates (and page-faults) the memory of one set of
    matrices, not two or three.
    """

    def __init__(self, p, c, rows, dtype, device, buffers=None):
        self.p, self.c, self.rows = p, c, rows
        self.bounds = [(r0, min(r0 + rows, c)) for r0 in range(0, c, rows)]
        self.size = sum((r1 - r0) * r1 for r0, r1 in self.bounds)  # values per position
        itemsize = torch.empty((), dtype=dtype).element_size()
        chunk = p if rows >= c else max(1, _SCATTER_CHUNK_BYTES // (self.size * itemsize))
        self.starts = list(range(0, p, chunk)) + [p]
        self.storage = None
        if buffers is None:
            # Not zeroed: the first batch assigns its products instead of adding them.
            self.storage = torch.empty(p * c * c, dtype=dtype, device=device)
            buffers = [self.storage[start * self.size : stop * self.size] for start, stop in self.chunks()]
        self.buffers = buffers
        self.dtype = dtype
        # Buffer of the finalisation, reused from one chunk to the next (a fresh
        # one this large would be mapped, and page-faulted, anew each time).
        self._work = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["storage"] = state["_work"] = None
        # A view pickles its whole storage: give each chunk one of its own.
        state["buffers"] = [
            None if b is None
            else b if b.untyped_storage().nbytes() == b.numel() * b.element_size()
            else b.clone()
            for b in self.buffers
        ]
        return state

    @classmethod
    def from_whole(cls, S, rows):
        """From whole ``(P, C, C)`` matrices (statistics pickled by older versions)."""
        p, c, _ = S.shape
        out = cls(p, c, rows, S.dtype, S.device)
        for j, (start, stop) in enumerate(out.chunks()):
            for r0, r1, B in out.blocks(j):
                B.copy_(S[start:stop, r0:r1, :r1])
        return out

    @property
    def device(self):
        return self.buffers[0].device if self.buffers[0] is not None else None

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()

    def chunks(self):
        """``(start, stop)`` positions of each chunk."""
        return list(zip(self.starts[:-1], self.starts[1:]))

    def blocks(self, j):
        """``(r0, r1, B)`` of chunk ``j``: ``B`` holds rows ``r0:r1``, columns ``0:r1``."""
        m = self.starts[j + 1] - self.starts[j]
        buffer, offset, out = self.buffers[j], 0, []
        for r0, r1 in self.bounds:
            n_values = m * (r1 - r0) * r1
            out.append((r0, r1, buffer[offset : offset + n_values].view(m, r1 - r0, r1)))
            offset += n_values
        return out

    def spare(self):
        """The storage after the chunks (flat; empty for whole matrices), free
        until the factors are written; None without a storage of its own."""
        return None if self.storage is None else self.storage[self.p * self.size :]

    def is_whole(self):
        return len(self.bounds) == 1 and len(self.buffers) == 1

    def whole(self):
        return self.buffers[0].view(self.p, self.c, self.c)

    def lower(self, idx, dtype=None):
        """Matrices of positions ``idx`` (a slice within one chunk, or indices).

        Returns ``(S, fresh)``: a ``(m, C, C)`` tensor in ``dtype`` (default: the
        stored one) whose lower block triangle holds the statistics and whose
        blocks above it are unspecified, and whether ``S`` may be written (else
        it is a view of the statistics). For a slice, valid until the next call
        with a slice: block triangles are unpacked into one reused buffer.
        """
        dtype = dtype or self.dtype
        if self.is_whole():
            S = self.whole()[idx]
            return (S, False) if dtype == self.dtype and isinstance(idx, slice) else (S.to(dtype), True)
        if isinstance(idx, slice):
            j = int(np.searchsorted(self.starts, idx.start, side="right")) - 1
            parts = [(j, idx.start - self.starts[j], idx.stop - self.starts[j])]
            m = idx.stop - idx.start
        else:
            positions = idx.tolist()
            js = np.searchsorted(self.starts, positions, side="right") - 1
            parts = [(j, q - self.starts[j], q - self.starts[j] + 1) for j, q in zip(js, positions)]
            m = len(positions)
        numel = m * self.c * self.c
        if dtype != self.dtype or not isinstance(idx, slice):
            # Positions redone apart (indices) must not overwrite the chunk being
            # finalised, which lives in the reused buffer.
            S = torch.empty((m, self.c, self.c), dtype=dtype, device=self.device)
        else:
            if self._work is None or self._work.numel() < numel:
                # For the largest chunk at once: the chunks come last (smallest) first.
                largest = max(b - a for a, b in self.chunks()) * self.c * self.c
                self._work = None
                self._work = torch.empty(max(numel, largest), dtype=dtype, device=self.device)
            S = self._work[:numel].view(m, self.c, self.c)
        at = 0
        for j, a, b in parts:
            for r0, r1, B in self.blocks(j):
                S[at : at + b - a, r0:r1, :r1] = B[a:b]
            at += b - a
        return S, True

    def diagonals(self, j):
        """The diagonals ``(m, C)`` of chunk ``j``'s matrices."""
        return torch.cat(
            [torch.diagonal(B[:, :, r0:r1], dim1=1, dim2=2) for r0, r1, B in self.blocks(j)], dim=1
        )

    def release(self, j):
        """Free the statistics of chunk ``j``."""
        self.buffers[j] = None
        if all(b is None for b in self.buffers):
            self._work = self.storage = None

    def map(self, f):
        return _ScatterBlocks(
            self.p, self.c, self.rows, self.dtype, None, buffers=[f(b) for b in self.buffers]
        )


class _Moments:
    """Sufficient statistics of a set of vectors, one set per position, streamed.

    Sums are taken about a fixed reference ``ref`` per position, the mean of the
    first batch (with a mask, of the first kept samples): with ``y_k = x_k -
    ref``, ``n`` samples, ``s1 = sum y``, ``s2 = sum y y^T``, ``t = sum |y|^2 y``
    and ``q = sum |y|^4``. Because the
    reference is already close to the mean, the ``y_k`` are small and the final
    centring subtracts small corrections, so float32 loses no digits to a large
    mean (the "shifted data" algorithm), while a batch costs one accumulating
    matrix product: no merge passes over the matrices.

    ``s2`` (the one large statistic, a :class:`_ScatterBlocks`) is in the working
    precision, and so are the shifted samples and their products; ``ref`` too,
    unless the input had more. The small sums ``s1``, ``t``, ``q`` are float64.
    ``t`` and ``q`` only serve the Ledoit-Wolf coefficient and are None for a
    fixed shrinkage. Matrices wider than ``rows`` are stored as their lower
    block triangle, in blocks of ``rows`` rows.
    """

    # Statistics pickled before the block layout existed hold whole matrices.
    rows = None
    # Samples per position (float64), once a mask has left some out; None while
    # every position has all ``n``.
    counts = None
    # Buffers reused by successive add() calls (the shifted samples waiting for
    # the products, and a block of input transposed in its own precision), the
    # number of images waiting, and whether the scatter matrices are still
    # unwritten (they are not zeroed: the first products assign). Never copied
    # or pickled: release() flushes and frees the buffers.
    _buffer = None
    _raw = None
    _pending = 0
    _unwritten = False

    def __init__(self, n, ref, s1, s2, t, q, rows=None):
        self.n, self.ref, self.s1, self.s2, self.t, self.q = n, ref, s1, s2, t, q
        self.rows = rows

    def __setstate__(self, state):
        s2 = state["s2"]
        if isinstance(s2, torch.Tensor):  # whole matrices, pickled by older versions
            c = s2.shape[-1]
            state["s2"] = _ScatterBlocks.from_whole(s2, state.get("rows") or c)
        self.__dict__.update(state)

    @classmethod
    def zeros(cls, p, c, s2_dtype, device, higher=True):
        f64 = dict(dtype=torch.float64, device=device)
        rows = _row_block(c)
        out = cls(
            0,
            None,
            torch.zeros((p, c), **f64),
            _ScatterBlocks(p, c, rows, s2_dtype, device),
            torch.zeros((p, c), **f64) if higher else None,
            torch.zeros((p,), **f64) if higher else None,
            rows,
        )
        out._unwritten = True
        return out

    def _map(self, f):
        self.flush()
        out = _Moments(
            self.n,
            *(None if x is None else f(x) for x in (self.ref, self.s1)),
            self.s2.map(f),
            *(None if x is None else f(x) for x in (self.t, self.q)),
            self.rows,
        )
        out.counts = None if self.counts is None else f(self.counts)
        return out

    def copy(self):
        return self._map(torch.clone)

    def cpu(self):
        return self._map(lambda x: x.cpu())

    def fewest(self):
        """Samples of the position that has fewest (all have ``n`` without a patch mask)."""
        return self.n if self.counts is None else int(self.counts.min())

    def release(self):
        """Flush the waiting samples and free the buffers kept between batches."""
        self.flush()
        self._buffer = self._raw = None

    def add(self, X, mask=None, defer=False):
        """Add samples ``X`` of shape (n, C, P): n images, P positions.

        ``mask``, a bool tensor (n, P), keeps only the samples where it is True:
        each position then has its own number of samples (``counts``).

        The shifted samples are kept in a buffer of up to ``_PENDING_IMAGES``
        images (fewer where its size would pass ``_PENDING_BYTES`` and the
        statistics' spare storage has no room), and the scatter matrices
        updated by one product over all of them (:meth:`flush`): every update
        reads and writes all of the statistics, so few large updates cost much
        less memory traffic than one per batch, and their products (summing
        over more images) run closer to the machine's peak. With ``defer`` the
        samples may stay in the buffer after the call, for the next calls to
        fill it; the caller then flushes (or releases) before the statistics are
        read.
        """
        n, c, p = X.shape
        s2 = self.s2
        device, work = s2.device, s2.dtype
        itemsize = s2.element_size()
        scale = 1 if _tuned_for_cpu(device) else _GPU_SCALE
        first = self.n == 0
        if first:
            # The reference: in the working precision, unless the input has more,
            # so that its samples are shifted exactly (a constant position then
            # gives exactly zero). Integers are shifted in float64, which holds
            # them exactly where float32 would round those past 2**24.
            dtype = torch.promote_types(X.dtype, work) if X.is_floating_point() else torch.float64
            self.ref = torch.empty((p, c), dtype=dtype, device=device)
        ref = self.ref
        if mask is None and self.counts is not None and bool((self.counts == 0).any()):
            # Positions that an earlier mask left without a kept sample still
            # need their reference moved to their first samples: keep all.
            mask = torch.ones((n, p), dtype=torch.bool)
        if mask is not None:
            if self.counts is None:
                self.counts = torch.full((p,), float(self.n), dtype=torch.float64, device=device)
            # Kept samples per position before the current block of images. Left-out
            # samples must not pull the reference away from the kept ones (a robust
            # fit leaves out outliers, whose offset would cost float32 all its
            # digits), so the reference of a position is the mean of its first kept
            # samples: until it has some, its sums are all zero, and a reference
            # set later shifts nothing already summed.
            seen = self.counts.clone()
            self.counts += mask.sum(dim=0, dtype=torch.float64).to(device)
            # A left-out sample is shifted to zero: it adds nothing to any sum.
            weights = mask.to(device=device, dtype=work).T[:, :, None]  # (P, n, 1)
        elif self.counts is not None:
            self.counts += n
        # Images waiting for the products, as (images, positions, channels):
        # per position, its samples as rows with a leading dimension, which the
        # products read in place. In the statistics' spare storage where it
        # has room (block triangles: the factors are written there later, so
        # its pages are faulted once for both), else in a buffer of their own,
        # kept from one call to the next (a fresh buffer this large is mapped
        # anew by the allocator each time, and its page faults cost as much as
        # filling it).
        capacity = max(1, min(_PENDING_IMAGES, _PENDING_BYTES // (p * c * itemsize)))
        spare = s2.spare()
        room = 0 if spare is None else min(_PENDING_IMAGES, len(spare) // (p * c))
        if self._buffer is None and room >= capacity:
            capacity = room
            self._buffer = spare[: room * p * c]
        rows = capacity if defer else min(capacity, self._pending + n)
        if self._buffer is None or self._buffer.numel() < rows * p * c:
            self.flush()
            self._buffer = None  # free the old one first
            self._buffer = torch.empty(rows * p * c, dtype=work, device=device)
        rows = self._buffer.numel() // (p * c)
        # Input of more precision than the work (or integers) is transposed in
        # the reference's precision a bounded block at a time, then shifted and
        # rounded into the buffer; input of the work's precision goes straight
        # to the buffer.
        raw = None
        if ref.dtype != work:
            block = max(1, min(n, _TRANSPOSE_BYTES // (p * c * ref.element_size())))
            if self._raw is None or self._raw.numel() < block * p * c:
                self._raw = None
                self._raw = torch.empty(block * p * c, dtype=ref.dtype, device=device)
            raw = self._raw
        k0 = 0
        while k0 < n:
            if self._pending == rows:
                self.flush()
            k1 = min(n, k0 + rows - self._pending)
            if raw is not None:
                k1 = min(k1, k0 + raw.numel() // (p * c))
            at, k = self._pending, k1 - k0
            Y_all = self._buffer[at * p * c : (at + k) * p * c].view(k, p, c)
            source = raw[: k * p * c].view(k, p, c) if raw is not None else Y_all
            # A whole-matrix transpose is several times faster than gathering the
            # channels of a chunk of positions.
            source.copy_(X[k0:k1].to(device).transpose(1, 2))
            assign = first and k0 == 0
            step = max(1, min(p, scale * _GATHER_BYTES // (k * c * itemsize)))
            for start in range(0, p, step):
                stop = min(start + step, p)
                T = source[:, start:stop]
                if assign:
                    # The mean of the first samples, summed exactly in float64.
                    ref[start:stop] = T.sum(dim=0, dtype=torch.float64) / k
                if mask is not None:
                    _move_to_kept_mean_(ref[start:stop], T, weights[start:stop, k0:k1], seen[start:stop])
                Y = Y_all[:, start:stop]
                torch.sub(T, ref[start:stop], out=Y)
                if mask is not None:
                    Y.transpose(0, 1).mul_(weights[start:stop, k0:k1])
                self.s1[start:stop] += Y.sum(dim=0)
                if self.t is not None:
                    # |y_k|^2 per position, contiguous: a strided row vector
                    # would send the product below to one call per position.
                    sq = torch.linalg.vecdot(Y, Y).T.contiguous()
                    self.t[start:stop] += torch.bmm(sq[:, None, :], Y.transpose(0, 1))[:, 0]
                    # (|y|^4 in float64: in float32 it overflows or underflows
                    # for embeddings far from unit scale.)
                    self.q[start:stop] += sq.to(torch.float64).square().sum(dim=1)
            self._pending += k
            k0 = k1
        self.n += n
        if not defer:
            self.flush()

    def flush(self):
        """Add the buffered samples' products to the scatter matrices."""
        k = self._pending
        if not k:
            return
        s2 = self.s2
        p, c = self.s1.shape
        scale = 1 if _tuned_for_cpu(s2.device) else _GPU_SCALE
        Y_all = self._buffer[: k * p * c].view(k, p, c)
        # Chunks of positions whose samples stay in cache for all the products.
        step = max(1, min(p, scale * _GATHER_BYTES // (k * c * s2.element_size())))
        for j, (c0, c1) in enumerate(s2.chunks()):
            blocks = s2.blocks(j)
            for start in range(c0, c1, step):
                stop = min(start + step, c1)
                # Per position, the samples as rows: a view, no copy.
                Yp = Y_all[:, start:stop].transpose(0, 1)
                for r0, r1, B in blocks:
                    target = B[start - c0 : stop - c0]  # contiguous
                    if self._unwritten:  # the statistics are not zeroed
                        torch.bmm(Yp[:, :, r0:r1].mT, Yp[:, :, :r1], out=target)
                    else:
                        target.baddbmm_(Yp[:, :, r0:r1].mT, Yp[:, :, :r1])
        self._unwritten = False
        self._pending = 0

    def mean_variance(self):
        """The variance of a channel averaged over channels and positions (float)."""
        self.flush()
        total = 0.0
        for j, (start, stop) in enumerate(self.s2.chunks()):
            n = self.sample_counts(slice(start, stop))
            n = n[:, None] if isinstance(n, torch.Tensor) else n
            d = self.s1[start:stop] / n
            variances = self.s2.diagonals(j).to(torch.float64) / n - d * d
            total += float(variances.clamp(min=0).mean(dim=1).sum())
        return total / self.s1.shape[0]

    def sample_counts(self, idx):
        """Number of samples of positions ``idx``: ``n``, or a float64 tensor
        once a mask has left samples out."""
        return self.n if self.counts is None else self.counts[idx]

    def centred(self, idx, dtype=None):
        """Location and centred scatter matrices of positions ``idx``.

        ``idx`` is a slice that lies within one chunk of ``s2``, or indices.
        Returns ``(mean, m2, terms)``: the location (float64); ``m2 = sum (x -
        mean)(x - mean)^T``, a new tensor in ``dtype`` (default: that of ``s2``)
        of which only the lower triangle is meaningful; and, with the higher
        moments, ``terms = (tr, fro2, q)``: the trace and squared Frobenius norm
        of ``m2`` and ``q = sum |x - mean|^4`` (float64), else None. All come from
        the sums about ``ref`` moved by ``d = mean - ref``, a small shift.
        """
        self.flush()
        n = self.sample_counts(idx)
        per_position = isinstance(n, torch.Tensor)
        d = self.s1[idx] / (n[:, None] if per_position else n)
        s2, fresh = self.s2.lower(idx, dtype)
        c = s2.shape[-1]
        dw = d.to(s2.dtype)
        # n d d^T: a scalar n folds into the product's coefficient.
        nd = dw[:, :, None] * n.to(s2.dtype)[:, None, None] if per_position else dw[:, :, None]
        value = -1 if per_position else -n
        # One pass over the scatter matrices (the only one that is not in cache).
        if fresh:
            m2 = s2.addcmul_(nd, dw[:, None, :], value=value)
        else:
            m2 = torch.addcmul(s2, nd, dw[:, None, :], value=value)
        terms = None
        if self.t is not None:
            fro2, dm2d = _norm_and_form(m2, dw, self.rows or c)
            dd = (d * d).sum(dim=1)
            tr = _trace(m2)
            # sum |y - d|^4 expanded about the sums about ref, with s2 written as
            # m2 + n d d^T.
            q = (
                self.q[idx] - 4 * (d * self.t[idx]).sum(dim=1) + 4 * dm2d
                + 2 * dd * tr + 3 * n * dd * dd
            )
            terms = (tr, fro2, q)
        return self.ref[idx].to(torch.float64) + d, m2, terms


def _move_to_kept_mean_(ref, T, weights, seen):
    """Set the reference of positions with no kept sample yet to the mean of their
    kept samples in this block of images, and count those, in place.

    ``ref`` (m, C), ``T`` the block's samples (k, m, C), ``weights`` 1 for a kept
    sample and 0 for a left-out one (m, k, 1), ``seen`` the kept samples counted
    so far (m,), float64.
    """
    kept = weights[:, :, 0].sum(dim=1, dtype=torch.float64)
    move = (seen == 0) & (kept > 0)
    if bool(move.any()):
        head = (T.transpose(0, 1) * weights.to(T.dtype)).sum(dim=1, dtype=torch.float64)
        mean = head / kept.clamp(min=1)[:, None]
        ref.copy_(torch.where(move[:, None], mean, ref.to(torch.float64)))
    seen += kept


def _tuned_for_cpu(device):
    """Whether work on ``device`` takes the CPU's paths (cache-sized chunks,
    blocked factorisations and solves) rather than the GPU's (chunks bounded
    by memory only, batched solvers on whole matrices). A function, so that the
    tests can run the GPU's paths on a CPU."""
    return device.type == "cpu"


def _to_device(tensor, device):
    """``tensor`` on ``device`` (one place, so that the tests can make it fail)."""
    return tensor.to(device)


def _free_memory(device):
    """Bytes free on a CUDA ``device``, or None where that is not known."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def _row_block(c):
    """Rows per block of the accumulated scatter matrices (``c``: all of them)."""
    return c if c <= 2 * _ROW_BLOCK else _ROW_BLOCK


def _norm_and_form(S, d, rows):
    """``|S|_F^2`` and ``d^T S d`` (float64) of symmetric matrices ``S`` (B, C, C).

    Only the lower block triangle of ``S`` is read (blocks of ``rows`` rows; all
    of ``S`` when ``rows >= C``): its strictly lower blocks count twice.
    """
    c = S.shape[-1]

    def norm2_form(V, e, f):  # |V|_F^2 and e^T V f
        # e^T V as a row vector: several times faster than V f as a column.
        # (vector_norm is fastest on whole matrices but slow on strided blocks.)
        norm2 = torch.linalg.vector_norm(V, dim=(1, 2)) ** 2 if V.is_contiguous() \
            else V.square().sum(dim=(1, 2))
        norm2 = norm2.to(torch.float64)
        # Squares of float32 entries overflow past 1.8e19 and underflow below
        # 1e-19: such matrices (embeddings far from unit scale) are redone in
        # float64, which costs the usual ones nothing.
        redo = ~torch.isfinite(norm2) | (norm2 < _TINY_NORM2)
        if V.dtype != torch.float64 and bool(redo.any()):
            norm2[redo] = V[redo].to(torch.float64).square().sum(dim=(1, 2))
        form = torch.bmm(e[:, None, :], V)[:, 0].mul_(f).sum(dim=1)
        return norm2, form.to(torch.float64)

    if rows >= c:
        return norm2_form(S, d, d)
    norm2, form = 0, 0
    for r0 in range(0, c, rows):
        r1 = min(r0 + rows, c)
        # Row block r0:r1 up to and with its diagonal block; the part left of the
        # diagonal block counts twice.
        n_all, f_all = norm2_form(S[:, r0:r1, :r1], d[:, r0:r1], d[:, :r1])
        n_diag, f_diag = norm2_form(S[:, r0:r1, r0:r1], d[:, r0:r1], d[:, r0:r1])
        norm2 = norm2 + 2 * n_all - n_diag
        form = form + 2 * f_all - f_diag
    return norm2, form


# Below this, a squared Frobenius norm summed in float32 may have lost its small
# squares to underflow (float32's smallest normal number is 1.2e-38).
_TINY_NORM2 = 1e-30


def _mirror_lower_blocks_(S, rows):
    """Fill the upper block triangle of ``S`` from its lower one, in place."""
    for r0 in range(rows, S.shape[-1], rows):
        S[:, :r0, r0 : r0 + rows] = S[:, r0 : r0 + rows, :r0].mT
    return S


def _trace(A):
    return torch.diagonal(A, dim1=1, dim2=2).sum(dim=1, dtype=torch.float64)


def ledoit_wolf_shrinkage_from_moments(n, m2, q):
    """Ledoit-Wolf shrinkage per position from centred moments.

    The same estimate as :func:`sklearn.covariance.ledoit_wolf_shrinkage` on the
    centred samples, written in terms of statistics that can be streamed.

    Parameters
    ----------
    n : int
        Number of samples, at least 1.
    m2 : torch.Tensor or ndarray of shape (P, C, C)
        Centred scatter matrices ``sum_k y_k y_k^T``.
    q : torch.Tensor or ndarray of shape (P,)
        ``sum_k |y_k|^4``.

    Returns
    -------
    shrinkage : torch.Tensor of shape (P,)
        Coefficient in [0, 1] of the convex combination
        ``(1 - s) * S + s * mu * I`` with ``S = m2 / n``, ``mu = trace(S) / C``.
        Computed in float64 whatever the precision of ``m2``.

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
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer (the number of samples); got {n!r}.")
    m2 = _as_float_tensor(m2, "m2")
    q = _as_float_tensor(q, "q")
    if m2.ndim != 3 or m2.shape[1] != m2.shape[2] or m2.shape[1] == 0:
        raise ValueError(f"m2 must have shape (P, C, C) with C >= 1; got {tuple(m2.shape)}.")
    if q.shape != m2.shape[:1]:
        raise ValueError(
            f"q must have shape (P,) = ({m2.shape[0]},), one value per matrix of m2; "
            f"got {tuple(q.shape)}."
        )
    if not (bool(torch.isfinite(m2).all()) and bool(torch.isfinite(q).all())):
        raise ValueError("m2 and q must be finite; they contain NaN or infinity.")
    if bool((q < 0).any()):
        raise ValueError("q must be non-negative: it is a sum of fourth powers of norms.")
    # In float64, as documented: squares of float32 (or float16) entries would
    # overflow or underflow in their own precision.
    m2, q = m2.to(torch.float64), q.to(torch.float64)
    n_features = m2.shape[-1]
    tr = _trace(m2)
    fro2 = torch.linalg.vector_norm(m2, dim=(1, 2)).square()
    return _ledoit_wolf_shrinkage(n, n_features, tr, fro2, q)


def _as_float_tensor(a, name):
    """``a`` (tensor or array-like of real numbers) as a floating-point tensor."""
    if not isinstance(a, torch.Tensor):
        arr = np.asarray(a)
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}.")
        a = torch.tensor(arr)  # a copy: read-only arrays are fine
    if a.is_complex() or a.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers; got dtype {a.dtype}.")
    return a if a.is_floating_point() else a.to(torch.float64)


def _ledoit_wolf_shrinkage(n, c, tr, fro2, q):
    """Ledoit-Wolf coefficient from the trace and squared Frobenius norm of the
    centred scatter matrices and ``q`` (see ledoit_wolf_shrinkage_from_moments)."""
    mu = tr / (n * c)
    fro2 = fro2 / (n * n)
    q = q.to(torch.float64)
    # beta: estimated variance of the sample covariance entries; delta: squared
    # distance of S to the scaled identity. Both as in Ledoit & Wolf (2004).
    beta = (q / n - fro2) / (c * n)
    delta = (fro2 - c * mu * mu) / c
    beta = torch.minimum(beta.clamp(min=0), delta)
    if c == 1:
        # S is its own target, delta is 0 but for rounding, which beta / delta
        # would turn into 1: scikit-learn's exact arithmetic gives 0.
        return torch.zeros_like(beta)
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    return torch.where(beta > 0, beta / safe_delta, torch.zeros_like(beta))


def _cholesky_lower(cov):
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


def _cholesky_blocked_(A, block=32, diag_inverses=None, zero_upper=True):
    """Lower Cholesky factors of a batch of SPD matrices ``A`` (B, C, C), in place.

    Reads only the lower triangle of ``A`` and, with ``zero_upper``, zeroes the
    strict upper one (else leaves it unspecified: a caller that copies the
    factors can zero it in the same pass, ``torch.tril(A, out=...)``). Returns
    a bool mask of the matrices that are not positive definite in ``A``'s
    precision (their factor is garbage). ``diag_inverses``, if given, a
    (B, n_blocks, block, block) tensor, receives the inverses of the factors'
    diagonal blocks, which the algorithm computes anyway (the last one, ragged,
    zero-padded), exactly as :func:`_inverse_diagonal_blocks` would.

    Left-looking blocked algorithm: each block column is updated by one batched
    product, its ``block``-wide diagonal block factorised by LAPACK, and the panel
    below multiplied by the inverse of that factor. On a CPU this is about twice
    as fast as ``torch.linalg.cholesky_ex`` on whole matrices, whose one LAPACK
    call per matrix is slow at the sizes of patch embeddings. The panel is not
    solved by LAPACK either: MKL threads each small triangular solve, and with
    several threads the synchronisation costs ten times the solve.
    """
    c = A.shape[-1]
    failed = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    eye = torch.eye(min(block, c), dtype=A.dtype, device=A.device)
    for k in range(0, c, block):
        e = min(k + block, c)
        col = A[:, k:, k:e]
        if k:
            col -= torch.bmm(A[:, k:, :k], A[:, k:e, :k].mT)
        diag, info = torch.linalg.cholesky_ex(col[:, : e - k])
        failed |= info > 0
        col[:, : e - k] = diag
        if e < c or diag_inverses is not None:
            inverse = _triangular_inverse(diag, eye)
        if diag_inverses is not None:
            diag_inverses[:, k // block, : e - k, : e - k] = inverse
        if e < c:
            col[:, e - k :] = torch.bmm(col[:, e - k :], inverse.mT)
    # The strict upper triangle is never read above; zeroed once here, in one
    # contiguous pass (block by block, the strided zeroing cost as much as the
    # factorisation for wide matrices).
    if zero_upper:
        A.tril_()
    return failed


def _invert_lower_blocked(L, out, block=16):
    """Inverses of a batch of lower-triangular matrices ``L`` (B, C, C), into ``out``.

    Block forward substitution: block row ``i`` of the inverse is ``D_i^-1``
    times minus the products of ``L``'s row ``i`` with the rows already found.
    Only the ``block``-wide diagonal blocks go to LAPACK; the rest is batched
    products. On a CPU this is about twice as fast as one triangular solve per
    matrix against the identity, for the reason given in
    :func:`_cholesky_blocked_`.
    """
    c = L.shape[-1]
    out.zero_()
    eye = torch.eye(min(block, c), dtype=L.dtype, device=L.device)
    for k in range(0, c, block):
        e = min(k + block, c)
        diag_inv = torch.linalg.solve_triangular(
            L[:, k:e, k:e], eye[: e - k, : e - k].expand(len(L), e - k, e - k), upper=False
        )
        if k:
            out[:, k:e, :k] = torch.bmm(diag_inv, torch.bmm(L[:, k:e, :k], out[:, :k, :k])).neg_()
        out[:, k:e, k:e] = diag_inv
    return out


def _check_float16_range(L):
    """Raise unless factors ``L`` (m, C, C) survive rounding to float16 (``compact``).

    Entries past float16's largest value would become infinite, and a diagonal
    too small loses its precision (down to zero, whose solves give NaN): either
    way the distances would be silently wrong. Subnormal diagonal entries down to
    ``2**-18`` still round by under 1% (64 steps of the smallest subnormal), and
    they are allowed: the jittered factor of a constant position (``1e-5 I``) is
    one. One reduction over a chunk still in cache.
    """
    largest, smallest_diagonal = torch.finfo(torch.float16).max, 2.0**-18
    lo, hi = (float(v) for v in torch.aminmax(L))
    smallest = float(torch.diagonal(L, dim1=1, dim2=2).min())
    if max(-lo, hi) > largest or smallest < smallest_diagonal:
        raise ValueError(
            f"compact=True cannot hold these Cholesky factors in float16: their entries span "
            f"[{lo:.3g}, {hi:.3g}] and their smallest diagonal entry is {smallest:.3g}, where "
            f"it needs magnitudes of at most {largest:.6g} and diagonal entries of at least "
            f"{smallest_diagonal:.3g}. Use compact=False, or rescale the embeddings (the "
            "factors scale with them)."
        )


def _check_patch_mask(mask, X):
    """A validated ``patch_mask`` for embeddings ``X``: None or bool (n, h * w)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    n, _, h, w = X.shape
    if mask.shape != (n, h, w):
        raise ValueError(
            f"patch_mask: expected shape (n_images, h, w) = ({n}, {h}, {w}) to match the "
            f"embeddings, got {mask.shape}."
        )
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number) or not np.isin(mask, (0, 1)).all():
            raise ValueError("patch_mask: expected booleans (or 0/1).")
        mask = mask.astype(bool)
    return torch.from_numpy(np.ascontiguousarray(mask).reshape(n, h * w))


def _triangular_inverse(D, eye):
    """Inverses of lower-triangular blocks ``D`` (B, b, b); ``eye`` at least b wide.

    Blocks wider than ``_TRSM_LEAF`` are inverted by halves, ``[[A, 0], [C, E]]^-1
    = [[A^-1, 0], [-E^-1 C A^-1, E^-1]]``: LAPACK solves one matrix per call, and
    from 32 rows on MKL spreads each solve over the threads, whose
    synchronisation then costs far more than the solve (20 times more for a
    batch of 32-wide blocks when idle threads sleep, ``OMP_WAIT_POLICY=PASSIVE``).
    """
    b = D.shape[-1]
    # Row-major whatever D's layout (cholesky_ex returns column-major factors):
    # LAPACK's result depends on the layout it is given, and the inverses found
    # during the Cholesky must equal, bit for bit, those recomputed from the
    # stored factors after loading.
    D = D.contiguous()
    if b <= _TRSM_LEAF:
        return torch.linalg.solve_triangular(D, eye[:b, :b].expand_as(D), upper=False)
    h = b // 2
    out = torch.zeros_like(D)
    out[:, :h, :h] = first = _triangular_inverse(D[:, :h, :h], eye)
    out[:, h:, h:] = last = _triangular_inverse(D[:, h:, h:], eye)
    out[:, h:, :h] = torch.bmm(last, torch.bmm(D[:, h:, :h], first)).neg_()
    return out


def _inverse_diagonal_blocks(L, block, halves=None, out=None):
    """Inverses of the ``block``-wide diagonal blocks of lower factors ``L`` (B, C, C).

    Returns a (B, n_blocks, block, block) tensor, ``out`` if given (every value
    of it is written); the last block, when ``C`` is not a multiple of
    ``block``, is zero-padded. Each is assembled from the
    inverses of its two ``block / 2``-wide diagonal blocks, ``[[A, 0], [B, D]]^-1
    = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]``: ``halves`` (B, n_halves, block / 2,
    block / 2) when a blocked Cholesky has them already
    (:func:`_cholesky_blocked_`), else found here the same way, so that both
    routes give the same bits.
    """
    m, c, _ = L.shape
    half = block // 2
    if halves is None:
        eye = torch.eye(half, dtype=L.dtype, device=L.device)
        halves = torch.zeros((m, -(-c // half), half, half), dtype=L.dtype, device=L.device)
        for i, k in enumerate(range(0, c, half)):
            e = min(k + half, c)
            halves[:, i, : e - k, : e - k] = _triangular_inverse(L[:, k:e, k:e], eye)
    if out is None:
        out = torch.empty((m, -(-c // block), block, block), dtype=L.dtype, device=L.device)
    for i, k in enumerate(range(0, c, block)):
        e = min(k + block, c)
        a = min(half, e - k)  # rows of the first half
        # Zeros where nothing is written below (above the diagonal, padding),
        # slice by slice: a zero-filled buffer would write every block twice.
        out[:, i, :half, a:].zero_()
        out[:, i, a:half, :a].zero_()
        out[:, i, e - k :].zero_()
        out[:, i, half:, half + max(e - k - half, 0) :].zero_()
        out[:, i, :a, :a] = halves[:, 2 * i, :a, :a]
        if e - k > half:
            d = e - k - half
            lower = L[:, k + half : e, k : k + half]
            inv_d = halves[:, 2 * i + 1, :d, :d]
            out[:, i, half : half + d, half : half + d] = inv_d
            out[:, i, half : half + d, :half] = torch.bmm(inv_d, torch.bmm(lower, halves[:, 2 * i])).neg_()
    return out


def _solve_lower_blocked(L, diag_inv, R):
    """``L^-1 R`` for lower factors ``L`` (B, C, C) and ``R`` (B, C, n).

    Block forward substitution: block row ``i`` of the solution is the inverse
    of ``L``'s diagonal block ``i`` (``diag_inv[:, i]``, from
    :func:`_inverse_diagonal_blocks`) times ``R``'s block row minus the products
    of ``L``'s row ``i`` with the rows already found.
    """
    c = L.shape[-1]
    block = diag_inv.shape[-1]
    out = torch.empty_like(R)
    for i, k in enumerate(range(0, c, block)):
        e = min(k + block, c)
        rhs = R[:, k:e]
        if k:
            rhs = torch.baddbmm(rhs, L[:, k:e, :k], out[:, :k], alpha=-1)
        out[:, k:e] = torch.bmm(diag_inv[:, i, : e - k, : e - k], rhs)
    return out


def _pack_lower_float16(L):
    """Lower triangles of factors (P, c, c) as float16 (P, c (c + 1) / 2): exact for
    compact factors, which are float16 values already."""
    rows, cols = np.tril_indices(L.shape[-1])
    return L[:, rows, cols].astype(np.float16)


def _unpack_lower(tril, c, dtype):
    """(P, c (c + 1) / 2) lower triangles -> (P, c, c) matrices, zeros above."""
    full = np.zeros((tril.shape[0], c, c), dtype=np.dtype(dtype))
    rows, cols = np.tril_indices(c)
    full[:, rows, cols] = tril
    return full


def _positions_gatherer(X, dtype):
    """For samples ``X`` (n, C, h, w): a function ``(start, stop) -> (m, C, n)``,
    positions ``start:stop`` with each position's samples as columns, in ``dtype``.

    The result is a view of a buffer on ``X``'s device, reused from one call to
    the next (valid until the next call). One copy fills it in the (C, m, n)
    layout: moving along a row there, the source moves from one row of ``X``'s
    positions to the next at the same place, whose cache lines the previous
    row of the buffer brought in. The caller's next pass, which writes a
    contiguous (m, C, n) result, then reads runs of ``n`` contiguous values.
    Writing the (m, C, n) layout straight from ``X`` moves to another channel
    at every ``n`` values and comes back to a row only after all ``C``: 3 to 7
    times slower for a batch of 32 images.
    """
    n, c, h, w = X.shape
    X3 = X.reshape(n, c, h * w)
    buffer = None

    def gather(start, stop):
        nonlocal buffer
        src = X3[:, :, start:stop]
        m = src.shape[-1]
        if buffer is None or buffer.numel() < src.numel():
            buffer = None
            buffer = torch.empty(src.numel(), dtype=dtype, device=X.device)
        t = buffer[: src.numel()].view(c, m, n)
        t.copy_(src.permute(1, 2, 0))
        return t.permute(1, 0, 2)

    return gather


def _chunk_size(n, c, bytes_per_value=8):
    """Positions per scoring chunk of ``n`` images: its temporaries are four
    ``n x C`` arrays per position (gathered samples, residuals, whitened
    residuals, their squares) and up to three ``C x C`` ones."""
    per_position = max(4 * n * c + 3 * c * c, 1) * bytes_per_value
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
        :class:`sklearn.covariance.LedoitWolf` fitted on that position alone,
        except at positions that barely vary in training: one whose average
        variance (the trace of its covariance over ``C``) is below 1% of the
        average over the grid gets a ridge that brings it to that 1%, so that a
        region constant in every training image (a black background) does not
        turn the slightest change there into an enormous distance (when no
        position varies at all, identical training images, there is no scale
        to take it from, and a tiny jitter keeps the factors finite). A
        float ``eps >= 0`` is the PaDiM paper's regularisation: the unbiased
        sample covariance plus ``eps * I`` (the paper uses 0.01).
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
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
        rounded factors, before and after a pickle round trip alike. Factors
        beyond float16's range (entries past 65504, or diagonal entries below
        about 4e-6) raise a ValueError rather than turn into infinities or zeros.

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
        "device": [str, torch.device],
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
            # The same rule as for arrays: real numbers, so no complex or bool.
            if X.is_complex() or X.dtype == torch.bool:
                raise TypeError(f"X: embeddings must be real numbers, got dtype {X.dtype}.")
        else:
            X = np.asarray(X)
            # (Kinds, not np.number: timedelta64 is a numpy integer.)
            if X.dtype.kind not in "iuf":
                raise TypeError(f"X: embeddings must be real numbers, got dtype {X.dtype}.")
            if X.dtype.kind == "f" and X.dtype.itemsize > 8:  # long double, which torch lacks
                X = X.astype(np.float64)
            X = torch.from_numpy(np.ascontiguousarray(X))
        if X.ndim != 4:
            raise ValueError(
                "X: expected patch embeddings of shape (n_images, n_channels, height, width), "
                f"got shape {tuple(X.shape)}."
            )
        if X.shape[0] == 0:
            raise ValueError("X: got 0 images; at least one is required.")
        if min(X.shape[1:]) == 0:
            raise ValueError(
                "X: embeddings need at least one channel and a non-empty grid, got "
                f"(n_channels, height, width) = {tuple(X.shape[1:])}."
            )
        if X.is_floating_point() and X.numel():
            # min and max propagate NaN: one pass without a temporary, where
            # isfinite().all() writes and reads a mask as large as X.
            lo, hi = torch.aminmax(X)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("X: embeddings contain NaN or infinite values.")
            largest = max(abs(float(lo)), abs(float(hi)))
            # The precision fitted (scoring), or about to be (fitting).
            factors = None if reset else getattr(self, "cholesky_", None)
            precision = self.dtype if factors is None else str(factors.dtype)
            if precision == "float32" and largest > torch.finfo(torch.float32).max:
                raise ValueError(
                    f"X: embeddings reach {largest:.3g}, beyond the range of float32, the "
                    "precision of this model; scale them down (PatchCovariance also takes "
                    "dtype='float64')."
                )
        if not reset:
            expected = (self.n_features_in_, *self.grid_shape_)
            if tuple(X.shape[1:]) != expected:
                raise ValueError(
                    f"X: embeddings have shape (n, C, h, w) = (n, {', '.join(map(str, X.shape[1:]))}) "
                    f"but this PatchCovariance was fitted on (n, {', '.join(map(str, expected))})."
                )
        return X

    # -- fitting ---------------------------------------------------------------
    def fit(self, X, y=None, patch_mask=None):
        """Fit the per-position Gaussians on embeddings of normal images.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_images, C, h, w)
            Patch embeddings of normal images.
        y : None
            Ignored.
        patch_mask : array-like of bool of shape (n_images, h, w), default=None
            Which patches enter the statistics: each position is then fitted on
            the images where its mask is True (a robust fit can leave out the
            patches it judges defective). None keeps every patch.

        Returns
        -------
        self : PatchCovariance
            The fitted estimator.
        """
        self._validate_params()
        self._release_device_memory()
        X = self._check_embeddings(X, reset=True)
        mask = _check_patch_mask(patch_mask, X)
        moments = self._accumulate(None, X, mask)
        self._finalize(moments, X.shape, consume=True)
        if hasattr(self, "_moments"):
            del self._moments
        return self

    def partial_fit(self, X, y=None, patch_mask=None):
        """Update the statistics with a batch of embeddings and refit.

        Successive calls give the same result as one :meth:`fit` on all batches
        together. Until the batches seen hold enough samples (2 images for a
        fixed shrinkage, and under ``patch_mask`` every position at least once,
        or twice for a fixed shrinkage), a call keeps them with a warning and
        the estimator cannot score yet. The running statistics (as large as the
        covariances) are kept
        in a private attribute, and pickled, so that more batches can follow;
        :meth:`fit` does not keep them, so a model fitted by :meth:`fit` cannot be
        continued (partial_fit then raises).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_images, C, h, w)
            Patch embeddings of normal images.
        y : None
            Ignored.
        patch_mask : array-like of bool of shape (n_images, h, w), default=None
            Which patches enter the statistics: each position is then fitted on
            the images where its mask is True (a robust fit can leave out the
            patches it judges defective). None keeps every patch.

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
        # Every call, as scikit-learn does: set_params may have come in between.
        self._validate_params()
        if not first and self._moments.s2.dtype != self._m2_dtype():
            raise ValueError(
                f"dtype={self.dtype!r} differs from the precision of the statistics "
                "gathered so far; set dtype before the first partial_fit."
            )
        self._release_device_memory()
        X = self._check_embeddings(X, reset=first)
        mask = _check_patch_mask(patch_mask, X)
        # Merge into a copy so that a failure part way leaves the statistics intact.
        moments = self._accumulate(None if first else self._moments.copy(), X, mask)
        shortfall = self._shortfall(moments)
        if shortfall is not None:
            # Too few samples so far (one image at a time, or a mask that leaves a
            # position empty): kept, so that the next batches complete them.
            moments.release()
            self._moments = moments
            # What later batches are checked against, as after a finalised call.
            self.grid_shape_, self.n_features_in_ = tuple(int(v) for v in X.shape[2:]), int(X.shape[1])
            warnings.warn(
                f"partial_fit kept the statistics, but the model cannot score yet: {shortfall}",
                UserWarning,
            )
            return self
        self._finalize(moments, X.shape, consume=False)
        self._moments = moments
        return self

    def _accumulate(self, moments, X, mask=None, defer=False):
        """Merge the statistics of batch X into ``moments`` (None to start afresh);
        ``mask``: None or a bool tensor (n, h * w) of the patches to keep.

        The batch is transposed to (images, positions, channels) into a bounded
        buffer, and the buffer's products added to the statistics a cache-sized
        chunk of positions at a time, in place. With ``defer``, a buffer that is
        not full waits for the next batch (:meth:`_finalize` adds it).
        """
        device = resolve_device(self.device)
        n, c, h, w = X.shape
        X = X.reshape(n, c, h * w)
        if moments is None:
            moments = _Moments.zeros(
                h * w, c, self._m2_dtype(), device, higher=self.shrinkage == "ledoit-wolf"
            )
        moments.add(X, mask, defer=defer)
        return moments

    def _m2_dtype(self):
        # The scatter matrices are the only large statistic; sums about a nearby
        # reference keep float32 accurate, and float64 is there for exact comparisons.
        return torch.float64 if self.dtype == "float64" else torch.float32

    def __sklearn_is_fitted__(self):
        # Not after a partial_fit whose samples do not suffice yet (which sets
        # n_features_in_ and grid_shape_ but cannot score).
        return hasattr(self, "cholesky_")

    def _shortfall(self, moments):
        """Why ``moments`` hold too few samples to finalise, or None."""
        n = moments.fewest()
        ledoit_wolf = self.shrinkage == "ledoit-wolf"
        if moments.counts is not None and n < (1 if ledoit_wolf else 2):
            return (
                f"patch_mask leaves a position with {n} training patches; every position "
                f"needs at least {1 if ledoit_wolf else 2}."
            )
        if not ledoit_wolf and n < 2:
            return (
                "A fixed shrinkage needs at least 2 training images to estimate a "
                f"covariance; got {n}. Use shrinkage='ledoit-wolf' or more images."
            )
        return None

    def _finalize(self, moments, shape, consume=False):
        """Shrunk covariances and their Cholesky factors from the moments.

        Done a cache-sized chunk of positions at a time, in the precision of the
        scatter matrices; positions whose covariance is not positive definite in
        that precision are redone in float64 (with a jitter if need be). With
        ``consume`` the factors are written over the scatter matrices, so that
        the peak memory of a fit is one set of matrices rather than three.
        """
        moments.release()
        shortfall = self._shortfall(moments)
        if shortfall is not None:
            raise ValueError(shortfall)
        n = moments.fewest()
        p, c = moments.s1.shape
        ledoit_wolf = self.shrinkage == "ledoit-wolf"
        if not ledoit_wolf:
            if n <= c and self.shrinkage < 1e-3:
                warnings.warn(
                    f"Only {n} training images for {c} channels: the sample covariance "
                    f"is singular and shrinkage={self.shrinkage} barely regularises it; "
                    "distances may be unreliable. Consider shrinkage='ledoit-wolf'.",
                    UserWarning,
                )
        elif moments.t is None:
            raise ValueError(
                "shrinkage='ledoit-wolf' needs moments that were not gathered for a fixed "
                "shrinkage; set shrinkage before the first partial_fit."
            )
        # The ridge of near-constant positions is raised to the floor (see
        # _VARIANCE_FLOOR); the others are exactly Ledoit-Wolf's.
        floor = _VARIANCE_FLOOR * moments.mean_variance() if ledoit_wolf else 0.0
        scatter = moments.s2
        device = scatter.device
        out_dtype = torch.float64 if self.dtype == "float64" else torch.float32
        # Consumed statistics of the output precision are overwritten by their
        # factors: whole matrices in place, block triangles once their chunk is
        # unpacked.
        in_place = consume and scatter.storage is not None and scatter.dtype == out_dtype
        chol = scatter.storage.view(p, c, c) if in_place else torch.empty(
            (p, c, c), dtype=out_dtype, device=device
        )
        cov_out = np.empty((p, c, c), dtype=self.dtype) if self.store_covariance else None
        shrink = torch.full((p,), float("nan"), dtype=torch.float64)
        location = torch.empty((p, c), dtype=torch.float64)
        if scatter.is_whole():
            budget = _FINALIZE_BYTES if _tuned_for_cpu(device) else _GPU_FINALIZE_BYTES
            step = max(1, budget // (c * c * scatter.element_size()))
        else:  # a chunk at a time, unpacked whole before its factors are written
            step = max(stop - start for start, stop in scatter.chunks())
        chol_block = 16 if c <= 128 else 32
        # Factors too large for whitening matrices are solved with by blocks at
        # scoring time; the inverses of their diagonal blocks are assembled here
        # from those the factorisation finds anyway, rather than later by a pass
        # of small triangular solves over all the factors (seconds for Rd550).
        block_inverses = halves = None
        if (_tuned_for_cpu(device) and not self.compact and 2 * chol_block == _SOLVE_BLOCK
                and p * c * c * torch.empty((), dtype=out_dtype).element_size() > _WHITENING_BYTES):
            n_blocks = -(-c // _SOLVE_BLOCK)
            block_inverses = torch.empty((p, n_blocks, _SOLVE_BLOCK, _SOLVE_BLOCK), dtype=out_dtype)
            # Zeros once: the same ragged corner is left unwritten every time.
            halves = torch.zeros((min(step, p), -(-c // chol_block), chol_block, chol_block),
                                 dtype=scatter.dtype)  # fmt: skip
        for sl in self._finalize_slices(scatter, step, consume):
            start = sl.start
            mean, cov, s = self._shrunk_covariance(moments, sl, floor, full=cov_out is not None)
            location[sl] = mean.cpu()
            if s is not None:
                shrink[sl] = s.cpu()
            if cov_out is not None:
                cov_out[sl] = cov.cpu().numpy()
            if _tuned_for_cpu(device):
                inverses = None if halves is None else halves[: len(cov)]
                failed = _cholesky_blocked_(cov, block=chol_block, diag_inverses=inverses,
                                            zero_upper=False)  # zeroed as it is copied below
            else:  # batched GPU solvers factorise whole matrices well
                cov, info = torch.linalg.cholesky_ex(cov)
                failed = info > 0
            idx = torch.nonzero(failed).flatten()
            if len(idx):
                # Singular in float32 (or at all): redo those in float64, with a
                # diagonal jitter where even that fails. Before the factors are
                # written: they may overwrite the scatter matrices.
                at = idx + start
                _, cov64, s64 = self._shrunk_covariance(moments, at, floor, torch.float64, full=True)
                if s64 is not None:
                    shrink[at.cpu()] = s64.cpu()
                if cov_out is not None:
                    cov_out[at.cpu().numpy()] = cov64.cpu().numpy()
                fixed = _cholesky_lower(cov64)
            factor = chol[sl]
            torch.tril(cov, out=factor)
            if len(idx):
                factor[idx] = fixed.to(factor.dtype)
            if self.compact:
                _check_float16_range(factor)
                factor.copy_(factor.to(torch.float16))
            if block_inverses is not None:
                _inverse_diagonal_blocks(factor, _SOLVE_BLOCK, halves=halves[: len(factor)].to(factor.dtype),
                                         out=block_inverses[sl])  # fmt: skip
                if len(idx):  # refactorised: their inverses were not the Cholesky's
                    block_inverses[at] = _inverse_diagonal_blocks(factor[idx], _SOLVE_BLOCK)
        # C order: a layout that changed after a pickle round trip would change the
        # floating-point results of the triangular solves.
        self.location_ = np.ascontiguousarray(location.numpy(), dtype=self.dtype)
        self.cholesky_ = np.ascontiguousarray(chol.cpu().numpy())
        # (The GPU copy, _resident, was freed before the fit began.)
        self.__dict__.pop("_block_inverses", None)
        if block_inverses is not None:
            self._block_inverses = (self.cholesky_, block_inverses)
        if cov_out is not None:
            self.covariance_ = cov_out
        elif hasattr(self, "covariance_"):
            del self.covariance_
        self.shrinkage_ = shrink.numpy()
        self._compacted_at_fit = bool(self.compact)
        self.grid_shape_ = (int(shape[2]), int(shape[3]))
        self.n_features_in_ = int(c)
        self.n_samples_seen_ = int(moments.n)

    @staticmethod
    def _finalize_slices(scatter, step, consume):
        """Slices of at most ``step`` positions, each within one chunk of the
        statistics; with ``consume``, a chunk is freed once its slices are done,
        and the chunks come last first (see :class:`_ScatterBlocks`)."""
        chunks = list(enumerate(scatter.chunks()))
        for j, (c0, c1) in reversed(chunks) if consume else chunks:
            for start in range(c0, c1, step):
                yield slice(start, min(start + step, c1))
            if consume:
                scatter.release(j)

    def _shrunk_covariance(self, moments, idx, floor=0.0, dtype=None, full=False):
        """``(location, covariance, shrinkage)`` of positions ``idx``.

        The covariance is a new tensor in ``dtype`` (default: that of the
        scatter matrices) of which only the lower triangle is meaningful unless
        ``full``; the shrinkage is None for a fixed ``eps``. With Ledoit-Wolf,
        the ridge of a position whose average variance ``mu`` is below
        ``floor`` makes up the difference, so that the covariance's average
        variance (its trace over C) is ``floor``.
        """
        n = moments.sample_counts(idx)
        mean, cov, terms = moments.centred(idx, dtype)
        c = cov.shape[-1]
        if self.shrinkage == "ledoit-wolf":
            tr, fro2, q = terms
            s = _ledoit_wolf_shrinkage(n, c, tr, fro2, q)
            # (1 - s) * m2 / n + s * mu * I with mu = tr / (n c), in place.
            cov.mul_(((1 - s) / n).to(cov.dtype)[:, None, None])
            mu = tr / (n * c)
            ridge = (s * mu + (floor - mu).clamp(min=0)).to(cov.dtype)[:, None]
        else:
            s = None
            cov.div_((n - 1).to(cov.dtype)[:, None, None] if isinstance(n, torch.Tensor) else n - 1)
            ridge = float(self.shrinkage)
        torch.diagonal(cov, dim1=1, dim2=2).add_(ridge)
        if full and (moments.rows or c) < c:
            _mirror_lower_blocks_(cov, moments.rows)
        return mean, cov, s

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
            Non-negative distances, in float32 (float64 with ``dtype="float64"``);
            larger means more anomalous.
        """
        return self._mahalanobis_tensor(X).cpu().numpy()

    def _mahalanobis_tensor(self, X):
        check_is_fitted(self, "cholesky_")
        X = self._check_embeddings(X, reset=False)
        device = resolve_device(self.device)
        n, c, h, w = X.shape
        # Whitening matrices make scoring several times faster but are as large as
        # the factors; past a size, solve with the factors chunk by chunk instead.
        whitening = self._whitening_matrices() if self.cholesky_.nbytes <= _WHITENING_BYTES else None
        dtype = torch.from_numpy(self.cholesky_[:0]).dtype
        blocked = whitening is None and _tuned_for_cpu(device)
        resident = self._resident_operands(device, whitening)
        # (The blocked solves' chunk holds four n x C arrays per position, as above.)
        step = max(1, _SOLVE_CHUNK_BYTES // (4 * n * c * 4)) if blocked else _chunk_size(n, c, 4)
        positions = _positions_gatherer(X, dtype)
        out = torch.empty((h * w, n), dtype=dtype, device=device)
        diff_buffer = None
        for start in range(0, h * w, step):
            stop = start + step
            if resident is None:
                loc = torch.from_numpy(self.location_[start:stop]).to(device)
            else:
                loc = resident[0][start:stop]
            rows = positions(start, stop).to(device)
            if diff_buffer is None:
                diff_buffer = torch.empty(rows.shape, dtype=dtype, device=device)
            # Contiguous (batched products are much slower on strided operands),
            # written in the same pass as the subtraction, into one reused buffer.
            diff = torch.sub(rows, loc[:, :, None], out=diff_buffer[: len(rows)])
            if resident is not None:
                matrices = resident[1][start:stop]
            elif whitening is not None:
                matrices = whitening[start:stop].to(device)
            else:
                matrices = torch.from_numpy(self.cholesky_[start:stop]).to(device)
            if whitening is not None:
                z = torch.bmm(matrices, diff)
            elif blocked:
                z = _solve_lower_blocked(matrices, self._diagonal_inverses()[start:stop], diff)
            else:  # batched GPU solvers handle whole matrices well
                z = torch.linalg.solve_triangular(matrices, diff, upper=False)
            out[start:stop] = (z * z).sum(dim=1).sqrt()
        return out.T.reshape(n, h, w)

    def _resident_operands(self, device, whitening):
        """``(location, matrices)``, the whitening matrices or else the factors, as
        tensors kept on ``device`` from one call to the next; None on a CPU.

        On a CPU the arrays are read in place, chunk by chunk. A GPU would
        otherwise receive the whole model again with every batch, which costs
        more than the distances: the first call moves it there and later ones
        reuse it. Derived, so not pickled. A model that does not fit in the GPU's
        free memory is still sent chunk by chunk.
        """
        if _tuned_for_cpu(device):
            return None
        cached = self.__dict__.get("_resident")
        if cached is not None and cached[0] is self.cholesky_ and cached[1] == device:
            return cached[2]  # None: it did not fit, and is not tried again
        self._release_device_memory()  # the previous copy goes first
        matrices = whitening if whitening is not None else torch.from_numpy(self.cholesky_)
        size = matrices.nbytes + self.location_.nbytes
        free = _free_memory(device)
        operands = None
        # Room is left for the scoring's own buffers (chunks of _CHUNK_BYTES).
        if free is None or free >= size + 4 * _CHUNK_BYTES:
            try:
                operands = (_to_device(torch.from_numpy(self.location_), device),
                            _to_device(matrices, device))  # fmt: skip
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5
                operands = None
        self._resident = (self.cholesky_, device, operands)
        return operands

    def _release_device_memory(self):
        """Free the copy of the model kept on a GPU for scoring (a later call
        moves it again). Fitting does it first, so that a refit's peak memory
        does not hold the previous model too."""
        self.__dict__.pop("_resident", None)

    def _diagonal_inverses(self):
        """Inverses of the ``_SOLVE_BLOCK``-wide diagonal blocks of the factors,
        (P, n_blocks, b, b), for :func:`_solve_lower_blocked`. Derived, so not
        pickled."""
        cached = self.__dict__.get("_block_inverses")
        if cached is not None and cached[0] is self.cholesky_:
            return cached[1]
        inverses = _inverse_diagonal_blocks(torch.from_numpy(self.cholesky_), _SOLVE_BLOCK)
        self._block_inverses = (self.cholesky_, inverses)
        return inverses

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
        step = _chunk_size(0, c, bytes_per_value=4)
        for start in range(0, len(chol), step):
            _invert_lower_blocked(chol[start : start + step], out=W[start : start + step])
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
        for derived in ("_whitening", "_block_inverses", "_resident"):
            state.pop(derived, None)
        moments = state.get("_moments")
        if moments is not None:
            state["_moments"] = moments.cpu()
        if self._fitted_compact() and "cholesky_" in state:
            # Only the lower triangle, in float16: what compact promises on disk.
            # (As fitted: compact set afterwards would round float32 factors.)
            factors = state["cholesky_"]
            state["cholesky_"] = (_pack_lower_float16(factors), factors.shape[-1], str(factors.dtype))
        return state

    def __setstate__(self, state):
        packed = state.get("cholesky_")
        if isinstance(packed, tuple):
            # Pickles of older releases hold no dtype: the parameter's, as it then was.
            dtype = packed[2] if len(packed) > 2 else state.get("dtype", "float32")
            state["cholesky_"] = _unpack_lower(packed[0], packed[1], dtype)
        self.__dict__.update(state)

    def _fitted_compact(self):
        """Whether the factors were rounded to float16 at fit (older models: the parameter)."""
        return self.__dict__.get("_compacted_at_fit", self.compact)

"""Statistics behind FID and k-NN precision/recall, in pure numpy (float64 throughout).

The feature extractor (Inception) lives elsewhere; everything here takes feature matrices
``(N, D)`` and works on the host:

- `feature_statistics`: mean ``(D,)`` and unbiased covariance ``(D, D)`` of the features.
- `frechet_distance`: ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`` with the trace of
  the square root computed by `sqrtm_psd_product`; `frechet_distance_of_features` takes two
  feature matrices instead of their statistics.
- `save_statistics` / `load_statistics`: the ``.npz`` format with keys ``'mu'`` and ``'sigma'``
  used by published FID reference statistics.
- `precision_recall`: improved precision and recall (Kynkaanniemi et al., 2019).

Typical use::

    mu, sigma = feature_statistics(sample_features)
    mu_ref, sigma_ref = load_statistics("cifar10_train_stats.npz")
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

_EPS = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------------------------
# Mean and covariance.
# --------------------------------------------------------------------------------------------


def _as_feature_matrix(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Returns ``features`` as a finite float64 array of shape (N, D) or raises ValueError."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature matrix, as in the standard FID code.

    Args:
      features: (N, D) features, N >= 2; any float dtype (computed in float64).

    Returns:
      mu: (D,) float64 mean.
      sigma: (D, D) float64 covariance with denominator N - 1 (``np.cov(rowvar=False)``).
    """
    x = _as_feature_matrix(features)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    sigma = np.atleast_2d(np.cov(x, rowvar=False))
    return mu, sigma


class RunningStatistics:
    """Mean and covariance of features that arrive in chunks, in float64, in O(D^2) memory.

    Holds the count, the mean and the scatter matrix ``sum_i (x_i - mean)(x_i - mean)^T``. A
    chunk is added through its own mean and scatter (centred in float64), and two sets of moments
    merge exactly (Chan, Golub and LeVeque's pairwise update):
    ``mean = m_a + delta n_b / n``, ``scatter = S_a + S_b + delta delta^T n_a n_b / n``.
    This is the running sum of x and x x^T made robust: no ``sum x x^T - n mu mu^T``
    cancellation, so features far from zero keep their digits. Merging is associative up to
    rounding, so the chunks (and the processes of a multi-host run) may be combined in any
    grouping; `statistics` equals `feature_statistics` of all rows to ~1e-12 relative.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.mean = np.zeros((self.dim,), np.float64)
        self.scatter = np.zeros((self.dim, self.dim), np.float64)
        self._work: np.ndarray | None = None  # (D, D) scratch: no D^2 allocation per chunk

    def _scratch(self) -> np.ndarray:
        if self._work is None:
            self._work = np.empty((self.dim, self.dim), np.float64)
        return self._work

    def add(self, features: np.ndarray) -> None:
        """Adds a chunk of features (n, D), n >= 0 (rows must be finite)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (n, {self.dim}), got {x.shape}")
        if not len(x):
            return
        mean = x.mean(axis=0)
        centred = x - mean
        self.merge_moments(len(x), mean, np.matmul(centred.T, centred, out=self._scratch()))

    def merge_moments(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        """Merges the moments (count, (D,) mean, (D, D) scatter) of another set into these."""
        count = int(count)
        if count == 0:
            return
        total = self.count + count
        delta = np.asarray(mean, np.float64) - self.mean
        self.scatter += np.asarray(scatter, np.float64)
        scaled = delta * np.sqrt(self.count * count / total)
        self.scatter += np.outer(scaled, scaled, out=self._scratch())
        self.mean += delta * (count / total)
        self.count = total

    def merge(self, other: RunningStatistics) -> None:
        """Merges another accumulator of the same dimension into this one."""
        if other.dim != self.dim:
            raise ValueError(f"feature dimensions differ: {self.dim} and {other.dim}")
        self.merge_moments(other.count, other.mean, other.scatter)

    def to_array(self) -> np.ndarray:
        """The moments packed as one float64 vector [count, mean, scatter] (for collectives)."""
        return np.concatenate([[float(self.count)], self.mean, self.scatter.ravel()])

    @classmethod
    def from_array(cls, packed: np.ndarray) -> RunningStatistics:
        """The accumulator `to_array` packed."""
        packed = np.asarray(packed, np.float64)
        dim = int(round((-1 + np.sqrt(1 + 4 * (len(packed) - 1))) / 2))
        if 1 + dim + dim * dim != len(packed):
            raise ValueError(f"{len(packed)} values are not [count, mean (D), scatter (D*D)]")
        result = cls(dim)
        result.count = int(packed[0])
        result.mean = packed[1 : 1 + dim].copy()
        result.scatter = packed[1 + dim :].reshape(dim, dim).copy()
        return result

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) with denominator N - 1, as `feature_statistics` gives them."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.scatter))):
            raise ValueError("features contain NaN or infinite values")
        scatter = (self.scatter + self.scatter.T) / 2
        return self.mean.copy(), scatter / (self.count - 1)


# --------------------------------------------------------------------------------------------
# Frechet distance.
# --------------------------------------------------------------------------------------------


def _psd_sqrt(sigma: np.ndarray, rtol: float) -> tuple[np.ndarray, float]:
    """Symmetric PSD square root with a rank cut-off.

    Returns ``(sqrt_sigma (D, D), largest eigenvalue)``; eigenvalues at or below
    ``rtol * largest`` (rounding noise, including small negative ones) are set to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    largest = max(float(eigenvalues[-1]), 0.0)
    kept = np.where(eigenvalues > rtol * largest, eigenvalues, 0.0)
    return (eigenvectors * np.sqrt(kept)) @ eigenvectors.T, largest


def sqrtm_psd_product(sigma1: np.ndarray, sigma2: np.ndarray, rtol: float | None = None) -> float:
    """Trace of the matrix square root of a product of two covariances: tr(sqrt(S1 S2)).

    S1 S2 is similar to the symmetric PSD matrix ``M = sqrt(S1) S2 sqrt(S1)``, so both have the
    same (real, non-negative) eigenvalues and ``tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i(M))``. The
    computation is:

    1. ``sqrt(S1)`` from the symmetric eigendecomposition (``eigh``) of S1;
    2. the eigenvalues of M by ``eigh`` (M is symmetrised first);
    3. the sum of their square roots.

    Why this is stabler than ``scipy.linalg.sqrtm(S1 @ S2)`` (the reference FID code):

    - S1 S2 is not symmetric, so ``sqrtm`` runs a general Schur decomposition whose eigenvalues
      are only guaranteed to be accurate relative to ||S1|| ||S2|| times the eigenvector
      condition number; for near-singular covariances it returns complex values with spurious
      imaginary parts, NaNs, or warns "matrix is singular", which the reference code papers over
      by dropping ``.imag`` and adding ``eps * I``. Here every decomposition is of a symmetric
      matrix, where ``eigh`` is backward stable with eigenvalue errors of order
      ``D * eps * ||matrix||`` and the result is real by construction.
    - The square root is not Lipschitz at 0: an eigenvalue that should be 0 but comes out as
      ``eps * ||S||`` from rounding contributes ``sqrt(eps * ||S||)``, about ``1e-8 * sqrt(||S||)``
      per null direction. This is what limits any method on rank-deficient covariances (fewer
      samples than dimensions), including clipping only the negative eigenvalues to 0. We
      therefore treat eigenvalues at or below ``rtol`` times the largest one (of S1 in step 1, of
      M relative to ``||S1|| ||S2||`` in step 2) as exact zeros, like a rank cut-off in
      ``np.linalg.matrix_rank``. Those eigenvalues are indistinguishable from rounding noise in
      float64; dropping them makes the exact null space of a rank-deficient S1 exact in sqrt(S1)
      and keeps the relative error of the trace near ``1e-12`` instead of ``1e-8``.

    Args:
      sigma1: (D, D) symmetric positive semi-definite matrix (symmetrised internally).
      sigma2: (D, D) symmetric positive semi-definite matrix (symmetrised internally).
      rtol: relative eigenvalue cut-off; default ``D * float64 eps``.

    Returns:
      tr(sqrt(sigma1 @ sigma2)) as a Python float (>= 0).
    """
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    if s1.ndim != 2 or s1.shape[0] != s1.shape[1] or s1.shape != s2.shape:
        raise ValueError(f"need two square matrices of one shape, got {s1.shape} and {s2.shape}")
    if rtol is None:
        rtol = s1.shape[0] * _EPS
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    root1, largest1 = _psd_sqrt(s1, rtol)
    largest2 = max(float(np.linalg.eigvalsh(s2)[-1]), 0.0)
    m = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    kept = np.where(eigenvalues > rtol * largest1 * largest2, eigenvalues, 0.0)
    return float(np.sqrt(kept).sum())


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, ...]:
    """Returns (mu, sigma) as finite float64 arrays of shapes (D,), (D, D) or raises."""
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: mu must have shape (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{name}: statistics contain NaN or infinite values")
    return mu, sigma


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on Inception features).

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))``, with the
    trace term from `sqrtm_psd_product`. Like the reference implementation, if that computation
    fails (``eigh`` not converging, or a non-finite result) it is retried once with ``eps * I``
    added to both covariances and a warning; with the eigenvalue cut-off of `sqrtm_psd_product`
    this is not needed for near-singular covariances, so normally it never triggers.

    Args:
      mu1: (D,) mean of the first set.
      sigma1: (D, D) covariance of the first set.
      mu2: (D,) mean of the second set.
      sigma2: (D, D) covariance of the second set.
      eps: diagonal offset for the fallback.

    Returns:
      The squared Frechet distance as a Python float, clamped at 0 (tiny negative values are
      rounding; the exact value is never negative).
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}")
    try:
        trace_sqrt = sqrtm_psd_product(sigma1, sigma2)
        failed = not np.isfinite(trace_sqrt)
    except np.linalg.LinAlgError:
        failed = True
    if failed:
        warnings.warn(
            f"tr(sqrt(sigma1 sigma2)) failed; retrying with {eps} * I added to both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = eps * np.eye(mu1.shape[0])
        trace_sqrt = sqrtm_psd_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def frechet_distance_of_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """`frechet_distance` between the statistics of two feature matrices (N_a, D) and (N_b, D)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# --------------------------------------------------------------------------------------------
# Reference statistics files.
# --------------------------------------------------------------------------------------------


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes ``mu`` and ``sigma`` (float64) to an uncompressed ``.npz`` at exactly ``path``.

    The file appears whole or not at all (`atomic_files`); parent directories are created.

    Args:
      path: destination file, local or a bucket path (no ``.npz`` suffix is appended).
      mu: (D,) mean.
      sigma: (D, D) covariance.
    """
    from shortcut_jax import atomic_files

    mu, sigma = _check_statistics(mu, sigma, "statistics to save")
    atomic_files.write_npz(path, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads FID statistics from an ``.npz`` with keys ``'mu'`` and ``'sigma'``.

    This is the format of published FID reference statistics (extra keys are ignored): ADM's
    reference batches, and the official shortcut-models code's ``*_fidstats_ours.npz`` files
    (which its ``train.py`` reads as ``np.load(path)['mu']`` and ``['sigma']``).

    Args:
      path: the ``.npz`` file.

    Returns:
      mu: (D,) float64 mean.
      sigma: (D, D) float64 covariance.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not an ``.npz`` archive, lacks a key, or the shapes disagree;
        the message names the file.
    """
    from etils import epath

    path = os.fspath(path)
    file = epath.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"FID statistics file not found: {path!r}")
    try:  # ADM's reference batches also hold the images (arr_0): only mu and sigma are read
        archive = np.load(
            io.BytesIO(file.read_bytes()) if "://" in path else path, allow_pickle=False
        )
    except Exception as error:
        raise ValueError(f"cannot read FID statistics from {path!r}: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is not an .npz archive with keys 'mu' and 'sigma'")
    with archive:
        missing = [key for key in ("mu", "sigma") if key not in archive.files]
        if missing:
            raise ValueError(
                f"FID statistics file {path!r} lacks key(s) {missing}; it has {archive.files}"
            )
        mu = np.asarray(archive["mu"], dtype=np.float64)
        sigma = np.asarray(archive["sigma"], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"FID statistics file {path!r}: expected mu of shape (D,) and sigma of shape (D, D), "
            f"got {mu.shape} and {sigma.shape}"
        )
    return mu, sigma


# --------------------------------------------------------------------------------------------
# Precision and recall.
# --------------------------------------------------------------------------------------------


def _squared_distances(
    a: np.ndarray, a_norms: np.ndarray, b: np.ndarray, b_norms: np.ndarray
) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, clipped at 0."""
    d2 = a_norms[:, None] + b_norms[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def _knn_radii_squared(x: np.ndarray, norms: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """(N,) squared distance from each row of x to its k-th nearest other row.

    Works on (batch_size, batch_size) blocks, keeping the k + 1 smallest distances per row (the
    row itself, set to -inf, and its k nearest neighbours), so memory is O(batch_size^2).
    """
    n = x.shape[0]
    radii = np.empty(n, dtype=np.float64)
    for i0 in range(0, n, batch_size):
        i1 = min(i0 + batch_size, n)
        best = np.empty((i1 - i0, 0), dtype=np.float64)
        for j0 in range(0, n, batch_size):
            j1 = min(j0 + batch_size, n)
            d2 = _squared_distances(x[i0:i1], norms[i0:i1], x[j0:j1], norms[j0:j1])
            if j0 == i0:  # the diagonal block: exclude each row itself exactly once
                np.fill_diagonal(d2, -np.inf)
            candidates = np.concatenate([best, d2], axis=1)
            if candidates.shape[1] > k + 1:
                candidates = np.partition(candidates, k, axis=1)[:, : k + 1]
            best = candidates
        radii[i0:i1] = best.max(axis=1)
    return radii


def _fraction_inside(
    queries: np.ndarray,
    query_norms: np.ndarray,
    centres: np.ndarray,
    centre_norms: np.ndarray,
    radii_squared: np.ndarray,
    batch_size: int,
) -> float:
    """Share of queries within distance radius_j of at least one centre j (boundary included).

    A distance within rounding error of the radius counts as inside: the comparison has a slack
    of ``4 * D * eps * (|q|^2 + |c|^2)``, the error bound of the expanded squared distance.
    """
    n_queries = queries.shape[0]
    slack_factor = 4.0 * queries.shape[1] * _EPS
    inside = np.zeros(n_queries, dtype=bool)
    for i0 in range(0, n_queries, batch_size):
        i1 = min(i0 + batch_size, n_queries)
        hit = np.zeros(i1 - i0, dtype=bool)
        for j0 in range(0, centres.shape[0], batch_size):
            j1 = min(j0 + batch_size, centres.shape[0])
            d2 = _squared_distances(
                queries[i0:i1], query_norms[i0:i1], centres[j0:j1], centre_norms[j0:j1]
            )
            slack = slack_factor * (query_norms[i0:i1, None] + centre_norms[None, j0:j1])
            hit |= np.any(d2 <= radii_squared[None, j0:j1] + slack, axis=1)
            if hit.all():
                break
        inside[i0:i1] = hit
    return float(inside.mean())


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Improved precision and recall of Kynkaanniemi et al. (2019) from k-NN manifolds.

    Each set's manifold is the union of balls around its samples whose radius is the distance
    to the k-th nearest other sample of the same set. Precision is the share of fake samples
    inside the real manifold (fidelity); recall is the share of real samples inside the fake
    manifold (coverage). Distances are computed in float64 on (batch_size, batch_size) blocks, so
    memory stays at a few times ``8 * batch_size^2`` bytes plus the inputs (10k x 10k in 2048-D
    fits easily); both sets are first shifted by the real mean, which leaves distances unchanged
    and reduces rounding.

    Args:
      real_features: (N_real, D) features of real samples, N_real > k.
      fake_features: (N_fake, D) features of generated samples, N_fake > k.
      k: neighbour index for the radii (the paper uses 3).
      batch_size: block size of the pairwise distance computation.

    Returns:
      (precision, recall), each a Python float in [0, 1].
    """
    real = _as_feature_matrix(real_features, "real_features")
    fake = _as_feature_matrix(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} and {fake.shape[1]}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    k, batch_size = int(k), int(batch_size)
    for name, x in (("real_features", real), ("fake_features", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} samples, got {x.shape[0]}")
    centre = real.mean(axis=0)
    real = real - centre
    fake = fake - centre
    real_norms = np.einsum("ij,ij->i", real, real)
    fake_norms = np.einsum("ij,ij->i", fake, fake)
    real_radii = _knn_radii_squared(real, real_norms, k, batch_size)
    fake_radii = _knn_radii_squared(fake, fake_norms, k, batch_size)
    precision = _fraction_inside(fake, fake_norms, real, real_norms, real_radii, batch_size)
    recall = _fraction_inside(real, real_norms, fake, fake_norms, fake_radii, batch_size)
    return precision, recall

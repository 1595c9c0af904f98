"""Statistics behind FID and precision/recall: shortcut_jax.evaluators.fid (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from shortcut_jax.evaluators import fid


def _random_spd(rng: np.random.Generator, dim: int, condition: float = 10.0) -> np.ndarray:
    """A random SPD matrix with eigenvalues spread over [1, condition]."""
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigenvalues = np.geomspace(1.0, condition, dim)
    return (q * eigenvalues) @ q.T


def _reference_fid_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """The standard FID formula with scipy.linalg.sqrtm of the non-symmetric product."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real)


def _trace_sqrt_from_factors(centred1: np.ndarray, centred2: np.ndarray) -> float:
    """tr(sqrt(S1 S2)) for S1 = A A^T, S2 = B B^T as the nuclear norm of A^T B.

    A = centred1.T / sqrt(n1 - 1) (D, n1), B likewise. The nonzero eigenvalues of A A^T B B^T
    equal those of (A^T B)(A^T B)^T, i.e. the squared singular values of A^T B, so the trace is
    the sum of those singular values. This never forms the (rank-deficient) covariances: A^T B is
    a small product of the data and its SVD is backward stable, so the singular values carry
    absolute errors of order eps * ||A^T B||, i.e. a relative error of about n * eps for the sum.
    It is thus a high-precision reference for the exact rank-deficient problem.
    """
    a = centred1.T / np.sqrt(centred1.shape[0] - 1)
    b = centred2.T / np.sqrt(centred2.shape[0] - 1)
    return float(np.linalg.svd(a.T @ b, compute_uv=False).sum())


# --------------------------------------------------------------------------------------------
# Frechet distance.
# --------------------------------------------------------------------------------------------


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=16)
    sigma = _random_spd(rng, 16, condition=1e3)
    # Rounding in tr(S) + tr(S) - 2 tr(sqrt(S S)) is of order eps * tr(S) (~1e-13 here).
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm_on_well_conditioned_spd(seed):
    rng = np.random.default_rng(seed)
    dim = 32
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1 = _random_spd(rng, dim, condition=100.0)
    sigma2 = _random_spd(rng, dim, condition=100.0)
    expected = _reference_fid_scipy(mu1, sigma1, mu2, sigma2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert fid.sqrtm_psd_product(sigma1, sigma2) == pytest.approx(
        np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real, rel=1e-9
    )


@pytest.mark.parametrize("n1,n2", [(50, 50), (50, 80), (10, 30), (2, 50)])
def test_frechet_distance_on_rank_deficient_covariances_matches_factor_reference(n1, n2):
    """Fewer samples than dimensions (64-D): covariances of rank n - 1.

    The reference is the same FID with the trace term from the data factors (see
    `_trace_sqrt_from_factors`), accurate to ~n * eps relatively. The limit for any method that
    starts from the rounded covariances is sqrt(eps * ||S1|| ||S2||) ~ 1e-8 * scale per null
    direction (the square root is not Lipschitz at 0); with its rank cut-off
    `sqrtm_psd_product` does much better (measured ~1e-14 relative), and we require 1e-10
    relative to the trace term, still ~100x below that generic sqrt(eps) level.
    """
    rng = np.random.default_rng(n1 * 1000 + n2)
    dim = 64
    x = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim)) * 0.5 + 3.0
    y = rng.normal(size=(n2, dim)) * rng.uniform(0.1, 2.0, size=dim) + 1.0
    mu1, sigma1 = fid.feature_statistics(x)
    mu2, sigma2 = fid.feature_statistics(y)
    assert np.linalg.matrix_rank(sigma1) == n1 - 1

    trace_ref = _trace_sqrt_from_factors(x - mu1, y - mu2)
    for s_a, s_b in ((sigma1, sigma2), (sigma2, sigma1)):
        got = fid.sqrtm_psd_product(s_a, s_b)
        assert np.isfinite(got)
        assert got == pytest.approx(trace_ref, rel=1e-10)

    diff = mu1 - mu2
    fid_ref = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_ref
    got_fid = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(got_fid)
    # The trace terms are of the size of FID itself here, so the same relative accuracy holds.
    assert got_fid == pytest.approx(fid_ref, rel=1e-9)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(3)
    dim = 24
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1 = _random_spd(rng, dim, condition=1e4)
    sigma2 = fid.feature_statistics(rng.normal(size=(12, dim)))[1]  # rank 11
    forward = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    backward = fid.frechet_distance(mu2, sigma2, mu1, sigma1)
    assert forward == pytest.approx(backward, rel=1e-10)


def test_frechet_distance_of_zero_covariance_is_mean_distance_plus_trace():
    mu1, mu2 = np.zeros(4), np.ones(4)
    sigma2 = np.diag([1.0, 2.0, 3.0, 4.0])
    assert fid.frechet_distance(mu1, np.zeros((4, 4)), mu2, sigma2) == pytest.approx(14.0)


def test_frechet_distance_falls_back_to_eps_offset_when_sqrt_fails(monkeypatch):
    rng = np.random.default_rng(4)
    sigma1, sigma2 = _random_spd(rng, 6), _random_spd(rng, 6)
    mu = np.zeros(6)
    real_sqrt = fid.sqrtm_psd_product
    calls = []

    def failing_once(s1, s2):
        calls.append(np.diag(s1).copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real_sqrt(s1, s2)

    monkeypatch.setattr(fid, "sqrtm_psd_product", failing_once)
    with pytest.warns(RuntimeWarning, match="retrying"):
        got = fid.frechet_distance(mu, sigma1, mu, sigma2, eps=1e-6)
    np.testing.assert_allclose(calls[1] - calls[0], 1e-6)
    expected = _reference_fid_scipy(mu, sigma1, mu, sigma2)
    assert got == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="dimensions differ"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma"):
        fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.zeros(2), np.array([[1.0, np.nan], [0, 1]]), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------
# Mean and covariance.
# --------------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy_mean_and_unbiased_cov():
    x = np.random.default_rng(5).normal(size=(40, 7)).astype(np.float32)
    mu, sigma = fid.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_streamed_statistics_over_uneven_chunks_equal_the_all_at_once_ones():
    # Features far from zero (mean 1e3, spread 1): a plain sum of x x^T would lose ~6 digits.
    rng = np.random.default_rng(3)
    x = 1e3 + rng.normal(size=(503, 7)) @ rng.normal(size=(7, 7))
    mu, sigma = fid.feature_statistics(x)
    running = fid.RunningStatistics(7)
    for start, stop in ((0, 1), (1, 64), (64, 64), (64, 300), (300, 503)):
        running.add(x[start:stop])
    got_mu, got_sigma = running.statistics()
    assert running.count == 503
    np.testing.assert_allclose(got_mu, mu, rtol=1e-13)
    np.testing.assert_allclose(got_sigma, sigma, rtol=1e-9, atol=1e-12)
    # Two accumulators (two processes' shares) merged through the packed form: the same.
    first, second = fid.RunningStatistics(7), fid.RunningStatistics(7)
    first.add(x[::2])
    second.add(x[1::2])
    first.merge(fid.RunningStatistics.from_array(second.to_array()))
    np.testing.assert_allclose(first.statistics()[1], sigma, rtol=1e-9, atol=1e-12)
    assert fid.frechet_distance(*first.statistics(), mu, sigma) < 1e-9


def test_streamed_statistics_refuse_wrong_dimensions_and_too_few_rows():
    running = fid.RunningStatistics(3)
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        running.add(np.zeros((4, 2)))
    running.add(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        running.statistics()
    with pytest.raises(ValueError, match="feature dimensions differ"):
        running.merge(fid.RunningStatistics(4))


def test_frechet_distance_of_features_of_a_shifted_copy_is_the_squared_shift():
    # Same covariance, means apart by `shift`: the distance is |shift|^2 and nothing else.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 6)) * rng.uniform(0.5, 2.0, 6) + 50.0
    shift = rng.normal(size=6)
    got = fid.frechet_distance_of_features(x, x + shift)
    assert got == pytest.approx(float(shift @ shift), rel=1e-8)
    assert fid.frechet_distance_of_features(x + shift, x) == pytest.approx(got, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Statistics files.
# --------------------------------------------------------------------------------------------


def test_save_load_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = rng.normal(size=5), _random_spd(rng, 5)
    path = tmp_path / "stats.npz"
    fid.save_statistics(path, mu, sigma)
    with np.load(path) as archive:  # the published reference-statistics layout
        assert sorted(archive.files) == ["mu", "sigma"]
    loaded_mu, loaded_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)


def test_load_statistics_reads_float32_files_with_extra_keys(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32), n=np.int64(7))
    mu, sigma = fid.load_statistics(path)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)


def test_load_statistics_reads_an_adm_reference_batch_as_it_is(tmp_path):
    """ADM's VIRTUAL_imagenet256_labeled.npz layout: images, pool and spatial statistics."""
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    rng = np.random.default_rng(0)
    features = rng.standard_normal((64, 8))
    np.savez(
        path,
        arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
        mu=features.mean(0),
        sigma=np.cov(features, rowvar=False),
        mu_s=np.zeros(5),
        sigma_s=np.eye(5),
    )
    mu, sigma = fid.load_statistics(str(path))
    np.testing.assert_allclose(mu, features.mean(0))
    assert sigma.shape == (8, 8)


def test_load_statistics_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fid.load_statistics(missing)

    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(3), cov=np.eye(3))
    with pytest.raises(ValueError, match=r"no_sigma\.npz.*sigma"):
        fid.load_statistics(no_sigma)

    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"bad_shape\.npz.*shape"):
        fid.load_statistics(bad_shape)

    not_npz = tmp_path / "plain.npy"
    np.save(not_npz, np.zeros(3))
    with pytest.raises(ValueError, match="plain.npy"):
        fid.load_statistics(not_npz)


# --------------------------------------------------------------------------------------------
# Precision and recall.
# --------------------------------------------------------------------------------------------


def _clusters(rng: np.random.Generator, centres: np.ndarray, per_cluster: int) -> np.ndarray:
    """Gaussian blobs (std 1) around each row of centres."""
    return np.concatenate([c + rng.normal(size=(per_cluster, centres.shape[1])) for c in centres])


def test_precision_recall_identical_sets_give_one_and_one():
    x = np.random.default_rng(9).normal(size=(150, 16))
    # batch_size 32 exercises the blocked k-NN search and the partial last block.
    assert fid.precision_recall(x, x.copy(), k=3, batch_size=32) == (1.0, 1.0)


def test_precision_recall_disjoint_far_apart_clusters_give_zero_and_zero():
    rng = np.random.default_rng(10)
    real = rng.normal(size=(100, 8))
    fake = rng.normal(size=(120, 8)) + 1000.0
    assert fid.precision_recall(real, fake, k=3, batch_size=40) == (0.0, 0.0)


def test_precision_recall_fake_covering_half_the_real_modes():
    rng = np.random.default_rng(11)
    centres = 100.0 * np.eye(4)  # four modes, 100 apart, std 1
    real = _clusters(rng, centres, per_cluster=200)

    # Fake = copies of the real samples of two modes: exactly precision 1, recall 1/2.
    copies = real[:400]
    assert fid.precision_recall(real, copies, k=3, batch_size=64) == (1.0, 0.5)

    # Fresh samples of the same two modes: every fake sample lies near real data (precision ~1)
    # and about half of the real samples are covered (recall ~0.5, a bit less at the fringes).
    fresh = _clusters(rng, centres[:2], per_cluster=200)
    precision, recall = fid.precision_recall(real, fresh, k=3, batch_size=64)
    assert precision >= 0.9
    assert 0.4 <= recall <= 0.5


def test_precision_recall_does_not_depend_on_batch_size():
    rng = np.random.default_rng(12)
    real, fake = rng.normal(size=(90, 5)), rng.normal(size=(70, 5)) * 1.3 + 0.2
    results = {fid.precision_recall(real, fake, k=3, batch_size=b) for b in (1, 7, 64, 1000)}
    assert len(results) == 1


def test_precision_recall_rejects_too_few_samples():
    with pytest.raises(ValueError, match="more than k"):
        fid.precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)

"""data/shard_cache.ShardCache: LRU within a byte budget, pins, prefetch ahead, whole files.

The "remote" directory is a local one here (epath reads both alike), so these run without the
GCS emulator; tests/test_latents_gcs.py runs the cache against a bucket.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from shortcut_jax.data import shard_cache

SIZE = 100


@pytest.fixture
def remote(tmp_path) -> tuple[str, list[str]]:
    """Six files of SIZE bytes, each filled with its own byte."""
    directory = tmp_path / "remote"
    directory.mkdir()
    names = [f"part-{index}" for index in range(6)]
    for index, name in enumerate(names):
        (directory / name).write_bytes(bytes([index]) * SIZE)
    return str(directory), names


def make_cache(remote, tmp_path: Path, files: int) -> shard_cache.ShardCache:
    return shard_cache.ShardCache(remote[0], remote[1], files * SIZE, str(tmp_path / "cache"))


def cached(cache: shard_cache.ShardCache) -> list[str]:
    return sorted(os.listdir(cache.directory))


def read(cache: shard_cache.ShardCache, shard: int, step: int | None = None) -> bytes:
    path = cache.acquire([shard], step)[shard]
    try:
        return Path(path).read_bytes()
    finally:
        cache.release([shard])


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_least_recently_used_unpinned_file_is_evicted_within_the_budget(remote, tmp_path):
    cache = make_cache(remote, tmp_path, files=2)
    try:
        assert read(cache, 0) == bytes([0]) * SIZE
        assert read(cache, 1) == bytes([1]) * SIZE
        read(cache, 0)  # 0 is now the most recently used
        assert read(cache, 2) == bytes([2]) * SIZE
        assert cached(cache) == ["part-0", "part-2"]
        paths = cache.acquire([2])  # pinned: never evicted
        read(cache, 3)
        assert cached(cache) == ["part-2", "part-3"]
        assert Path(paths[2]).read_bytes() == bytes([2]) * SIZE
        cache.release([2])
        assert cache.downloads == 4 and cache.peak_bytes == 2 * SIZE
    finally:
        cache.close()
    assert not os.path.exists(cache.directory)


def test_pinning_more_than_the_budget_is_refused_naming_the_field(remote, tmp_path):
    cache = make_cache(remote, tmp_path, files=2)
    try:
        with pytest.raises(shard_cache.CacheBudgetError, match=r"config\.data\.latent_cache_bytes"):
            cache.acquire([0, 1, 2])
        assert cache.acquire([0, 1])  # the failed acquire pinned nothing
    finally:
        cache.close()
    with pytest.raises(shard_cache.CacheBudgetError, match=r"latent_cache_bytes=250 .* 3 shards"):
        shard_cache.check_budget(250, 3, SIZE, "config.data.latent_cache_bytes", "gs://b/x")
    shard_cache.check_budget(300, 3, SIZE, "config.data.latent_cache_bytes", "gs://b/x")


def test_prefetch_fetches_the_next_steps_and_never_exceeds_the_budget(remote, tmp_path):
    def shards_of_step(step: int) -> list[int]:
        return [step % 6, (step + 1) % 6]

    cache = make_cache(remote, tmp_path, files=4)
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cache.bytes_on_disk())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        cache.start_prefetch(shards_of_step, 0, lookahead=3)
        for step in range(12):
            shards = shards_of_step(step)
            # Ahead of the reader: the shard first needed by the next step arrives unasked.
            assert wait_until(lambda shards=shards: all(os.path.exists(cache.local_path(s))
                                                        for s in shards))  # fmt: skip
            paths = cache.acquire(shards, step)
            for shard in shards:
                assert Path(paths[shard]).read_bytes() == bytes([shard]) * SIZE
            cache.release(shards)
    finally:
        stop.set()
        watcher.join()
        cache.close()
    assert 0 < peak[0] <= 4 * SIZE and cache.peak_bytes <= 4 * SIZE
    # Each step brings one new shard (plus the first, plus up to 3 steps fetched past the last
    # read); evicting what a coming step needs would take two per step.
    assert cache.downloads <= 1 + 12 + 3


def test_a_failed_download_leaves_no_file_and_reaches_the_reader(remote, tmp_path):
    cache = shard_cache.ShardCache(remote[0], [*remote[1], "missing"], 3 * SIZE, str(tmp_path))
    cache._sizes[6] = SIZE  # its size is known (say, listed) but the download fails
    try:
        with pytest.raises(FileNotFoundError):
            cache.acquire([6])
        assert cached(cache) == []
        assert read(cache, 1) == bytes([1]) * SIZE  # the budget reserved for it was returned
        assert cache.peak_bytes == SIZE
    finally:
        cache.close()


def test_caches_of_processes_that_are_gone_are_removed(remote, tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    abandoned = tmp_path / f"shards-{int(gone.stdout)}-abc"
    abandoned.mkdir()
    (abandoned / "part-0").write_bytes(b"x")
    alive = tmp_path / f"shards-{os.getpid()}-def"
    alive.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    cache = shard_cache.ShardCache(remote[0], remote[1], SIZE, str(tmp_path))
    try:
        assert not abandoned.exists() and alive.exists() and other.exists()
        assert os.path.basename(cache.directory).startswith(f"shards-{os.getpid()}-")
    finally:
        cache.close()

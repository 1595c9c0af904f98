"""A bounded local cache of remote shard files (gs://, s3://, ...), fetched ahead of the reader.

Readers that only open local files (ArrayRecord's `ArrayRecordReader` hangs on a gs:// name) read
bucket shards through a `ShardCache`: the consumer `acquire`s the shards a batch needs (pinned,
downloaded now if missing) and `release`s them after reading; a background thread downloads the
shards of the next steps (`start_prefetch(shards_of_step, first_step)`) while the budget allows,
never evicting a pinned shard or one that an earlier upcoming step needs. Eviction is LRU among
the rest. Bytes on disk (finished files plus downloads in flight) never exceed `budget_bytes`.
Each file appears whole or not at all: it is downloaded to a temporary name and renamed.

Uploads go through `atomic_files.upload_file`: fsspec's put_file sends a local file as one object
(a simple upload, or a resumable one finalized by its last chunk), so an interrupted upload leaves
no object.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence

from etils import epath

from shortcut_jax import atomic_files

_COPY_CHUNK = 8 << 20
_PREFETCH_WORKERS = 4


class CacheBudgetError(ValueError):
    """The cache budget cannot hold the shards one batch needs."""


def list_names(directory: str) -> set[str]:
    """Names of the entries of `directory` (local or bucket), listed now: a bucket listing cached
    by this process would miss what other processes (other hosts of an encode) wrote since."""
    if "://" in str(directory):
        fs, path = atomic_files.bucket_filesystem(str(directory))
        fs.invalidate_cache(path)
    return {entry.name for entry in epath.Path(directory).iterdir()}


def download_file(remote: str, local: str) -> None:
    """Copies `remote` to `local` through a temporary sibling, so `local` appears whole."""
    temporary = f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with epath.Path(remote).open("rb") as source, open(temporary, "wb") as sink:
            shutil.copyfileobj(source, sink, _COPY_CHUNK)
        os.replace(temporary, local)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_budget(
    budget_bytes: int, shards_per_batch: int, shard_bytes: int, field: str, where: str
) -> None:
    """Raises CacheBudgetError unless `budget_bytes` holds `shards_per_batch` shards.

    Args:
      budget_bytes: The cache budget (the value of `field`).
      shards_per_batch: Most distinct shards one batch reads.
      shard_bytes: Bytes of the largest shard.
      field: The config field of the budget, e.g. 'config.data.latent_cache_bytes'.
      where: The remote directory (for the message).
    """
    needed = shards_per_batch * shard_bytes
    if not isinstance(budget_bytes, int) or needed > budget_bytes:
        raise CacheBudgetError(
            f"{field}={budget_bytes!r} cannot hold the shards of one batch of {where}: a batch "
            f"reads up to {shards_per_batch} shards of {shard_bytes} bytes = {needed} bytes. Set "
            f"{field}>={needed} (more lets the cache fetch ahead), or re-encode with a smaller "
            "--shard_size."
        )


def default_cache_root() -> str:
    """Where caches go when config.data.latent_cache_dir is '': the system temporary directory."""
    return os.path.join(tempfile.gettempdir(), "shortcut_jax_latent_cache")


def remove_abandoned(root: str, prefix: str = "shards") -> list[str]:
    """Deletes the directories `prefix`-PID-* under `root` whose process PID is gone (killed).

    Returns:
      The deleted directories.
    """
    removed = []
    for entry in os.scandir(root):
        parts = entry.name.split("-")
        if len(parts) < 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        except PermissionError:  # alive, another user's
            pass
    return removed


class ShardCache:
    """Local copies of the files `names` of `remote_dir`, at most `budget_bytes` on disk.

    Thread-safe. Each instance owns a fresh directory under `cache_root`, removed by `close`.

    Attributes:
      directory: The local directory holding the cached files.
      peak_bytes: The most bytes held (finished plus in flight) so far.
      downloads: Number of files downloaded so far.
      downloaded_bytes: Bytes downloaded so far.
    """

    def __init__(
        self,
        remote_dir: str,
        names: Sequence[str],
        budget_bytes: int,
        cache_root: str = "",
        field: str = "config.data.latent_cache_bytes",
        on_evict: Callable[[int], None] | None = None,
    ):
        """Makes the (empty) cache directory; downloads nothing yet.

        Args:
          remote_dir: The bucket directory holding the files.
          names: File names in `remote_dir`; shards are addressed by position in this list.
          budget_bytes: Most bytes on local disk.
          cache_root: Parent of the cache directory ('' = `default_cache_root()`).
          field: The config field that sets the budget (named in errors).
          on_evict: Called with a shard just before its file is deleted (close open handles:
            a deleted file that is still open keeps its disk space).
        """
        if budget_bytes <= 0:
            raise CacheBudgetError(f"{field}={budget_bytes} must be > 0.")
        self.remote_dir = remote_dir.rstrip("/")
        self.names = list(names)
        self.budget_bytes = int(budget_bytes)
        self.field = field
        self._on_evict = on_evict
        root = cache_root or default_cache_root()
        os.makedirs(root, exist_ok=True)
        remove_abandoned(root)
        self.directory = tempfile.mkdtemp(prefix=f"shards-{os.getpid()}-", dir=root)
        # Removed by close(), else when the cache is collected or the interpreter exits.
        self._remove_directory = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.peak_bytes = 0
        self.downloads = 0
        self.downloaded_bytes = 0
        self._sizes: dict[int, int] = {}
        self._resident: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU
        self._loading: set[int] = set()
        self._pins: collections.Counter[int] = collections.Counter()
        self._used = 0
        self._consumer_step = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a download landed, or pins dropped
        self._advanced = threading.Condition(self._lock)  # the consumer reached a later step
        self._starved = False  # the prefetcher waits for pins to drop
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------- sizes

    def size(self, shard: int) -> int:
        """Bytes of file `shard` (one metadata request, then remembered)."""
        size = self._sizes.get(shard)
        if size is None:
            size = int(epath.Path(self.remote_path(shard)).stat().length)
            self._sizes[shard] = size
        return size

    def remote_path(self, shard: int) -> str:
        """The bucket path of file `shard`."""
        return f"{self.remote_dir}/{self.names[shard]}"

    def local_path(self, shard: int) -> str:
        """Where file `shard` lives in the cache (valid while it is acquired)."""
        return os.path.join(self.directory, self.names[shard])

    # -------------------------------------------------------------------------------- consumer

    def acquire(
        self, shards: Iterable[int], step: int | None = None, keep: Iterable[int] = ()
    ) -> dict[int, str]:
        """Pins `shards`, downloading the missing ones now; returns {shard: local path}.

        Args:
          shards: Distinct shard positions to read now.
          step: The training step being read (lets the prefetcher move its window on).
          keep: Shards the same read needs next: evicted to make room only as a last resort.

        Raises:
          CacheBudgetError: If the pinned shards alone exceed the budget.
        """
        shards = sorted(set(int(shard) for shard in shards))
        with self._lock:
            self._raise_if_failed()
            if step is not None and step > self._consumer_step:
                self._consumer_step = step
                self._advanced.notify_all()
                if self._starved:  # its window shrank: room may have freed
                    self._changed.notify_all()
            for shard in shards:
                self._pins[shard] += 1
        try:
            for shard in shards:
                self._ensure(shard, protected=set(shards) | set(keep), consumer=True)
        except BaseException:
            self.release(shards)
            raise
        with self._lock:
            for shard in shards:
                self._resident.move_to_end(shard)
        return {shard: self.local_path(shard) for shard in shards}

    def release(self, shards: Iterable[int]) -> None:
        """Unpins shards pinned by `acquire` (they stay cached until evicted)."""
        with self._lock:
            for shard in set(int(shard) for shard in shards):
                self._pins[shard] -= 1
                if self._pins[shard] <= 0:
                    del self._pins[shard]
            if self._starved:
                self._changed.notify_all()

    # -------------------------------------------------------------------------------- fetching

    def _ensure(self, shard: int, protected: set[int], consumer: bool) -> bool:
        """Makes `shard` resident; returns False if the prefetcher found no room (it waits then).

        The consumer may evict any unpinned shard; the prefetcher only shards not in `protected`.
        """
        size = self.size(shard)
        with self._lock:
            while True:
                self._raise_if_failed()
                if shard in self._resident:
                    return True
                if shard in self._loading:
                    self._changed.wait(0.1)
                    continue
                if self._make_room(size, protected):
                    break
                if not consumer:
                    return False
                if self._make_room(size, set()):  # last resort: what this read needs later
                    break
                if not self._loading:
                    pinned = sum(self._resident.get(s, 0) for s in self._pins)
                    raise CacheBudgetError(
                        f"{self.field}={self.budget_bytes} cannot hold the shards one read needs "
                        f"({pinned} bytes pinned, {size} more for {self.names[shard]}): raise it."
                    )
                self._changed.wait(0.1)  # in-flight downloads will land (and become evictable)
            self._loading.add(shard)
            self._used += size
            self.peak_bytes = max(self.peak_bytes, self._used)
        try:
            download_file(self.remote_path(shard), self.local_path(shard))
        except BaseException:
            with self._lock:
                self._used -= size
                self._loading.discard(shard)
                self._changed.notify_all()
            raise
        with self._lock:
            self._loading.discard(shard)
            self._resident[shard] = size
            self.downloads += 1
            self.downloaded_bytes += size
            self._changed.notify_all()
        return True

    def _make_room(self, size: int, protected: set[int]) -> bool:
        """Evicts LRU shards (unpinned, unprotected) until `size` more bytes fit (lock held)."""
        if self._used + size <= self.budget_bytes:
            return True
        victims, freed = [], 0
        for shard, shard_size in self._resident.items():
            if shard in self._pins or shard in protected:
                continue
            victims.append(shard)
            freed += shard_size
            if self._used - freed + size <= self.budget_bytes:
                break
        if self._used - freed + size > self.budget_bytes:
            return False
        for shard in victims:
            if self._on_evict is not None:
                self._on_evict(shard)
            os.remove(self.local_path(shard))
            self._used -= self._resident.pop(shard)
        return True

    def start_prefetch(
        self, shards_of_step: Callable[[int], Iterable[int]], first_step: int, lookahead: int = 8
    ) -> None:
        """Downloads, in a background thread, the shards of steps first_step, first_step + 1, ...

        It keeps to at most `lookahead` steps past the consumer's step (`acquire(step=...)`),
        fetches shards in the order the steps need them, and waits when the budget is full of
        shards that are pinned or needed sooner.
        """
        if self._thread is not None:
            raise RuntimeError("start_prefetch was already called on this cache.")
        self._thread = threading.Thread(
            target=self._prefetch, args=(shards_of_step, first_step, lookahead), daemon=True,
            name="shard-prefetch",
        )  # fmt: skip
        self._thread.start()

    def _prefetch(
        self, shards_of_step: Callable[[int], Iterable[int]], first_step: int, lookahead: int
    ) -> None:
        import concurrent.futures

        window: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        step = first_step
        pool = concurrent.futures.ThreadPoolExecutor(_PREFETCH_WORKERS)
        try:
            while not self._closed:
                with self._lock:
                    consumer = self._consumer_step
                    while window and next(iter(window)) < consumer:
                        window.popitem(last=False)
                    if step < consumer:
                        step = consumer
                    if step > consumer + lookahead:
                        self._advanced.wait(0.5)
                        continue
                if step not in window:
                    window[step] = sorted(set(int(s) for s in shards_of_step(step)))
                protected = set().union(*window.values())
                futures = [
                    pool.submit(self._ensure, shard, protected, False)
                    for shard in window[step]
                    if shard not in self._resident
                ]
                if all(future.result() for future in futures):
                    step += 1
                else:
                    with self._lock:  # no room until the consumer moves on or unpins
                        self._starved = True
                        self._changed.wait(0.1)
                        self._starved = False
        except BaseException as error:  # reported to the consumer
            with self._lock:
                if not self._closed:
                    self._error = error
                self._changed.notify_all()
        finally:
            pool.shutdown(wait=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"Prefetching shards of {self.remote_dir} failed.") from self._error
        if self._closed:
            raise RuntimeError("The shard cache is closed.")

    def bytes_on_disk(self) -> int:
        """Bytes of every file in the cache directory now (finished and partial)."""
        total = 0
        for entry in os.scandir(self.directory):
            with contextlib.suppress(FileNotFoundError):  # renamed or evicted meanwhile
                total += entry.stat().st_size
        return total

    def close(self) -> None:
        """Stops prefetching and deletes the cache directory."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            self._advanced.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._remove_directory()

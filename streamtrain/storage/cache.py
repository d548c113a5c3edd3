"""The node-local cache of a remote dataset: a local dataset folder (index.json, the lengths file, the shards
the plan needs now) under `cache_dir`, shared by every process on the node that names the same folder.

- One download per node: a shard is fetched under its own file lock; a process that finds the lock taken
  waits for it and then maps the file the first one wrote. Every download is checked against index.json's
  size and sha256 before it is renamed into place (and recorded as verified, so mapping it hashes nothing).
- Bounded: with a limit, room is made before a download, under the cache's lock, and the bytes of
  downloads in flight count (a reservation per download). Only shards no live process still needs this
  epoch are evicted for a prefetch; a download a reader waits for may also evict the shard needed furthest
  ahead, never one in a window being read. When nothing can go, it waits (bounded), then ends naming the
  limit. Each process publishes what it needs (`publish`): the shards of the windows it reads now (never
  evicted) and the rest of its epoch in order.
- Prefetch: background threads per process (`prefetch_threads`, see `default_prefetch_threads`) fetch the
  shards its stream needs next, in plan order and several at once, as far as the limit allows without
  evicting anything still needed.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from streamtrain.dataset import Index, ShardInfo, atomic_write_bytes, atomic_write_json, parse_index
from streamtrain.dataset.checksums import ExpectedFile, record_written, verify_files
from streamtrain.dataset.io import map_file
from streamtrain.dataset.schema import INDEX_FILE
from streamtrain.errors import DataError, UserError
from streamtrain.storage.location import Location
from streamtrain.storage.objects import get_bytes, get_file

__all__ = ["ShardCache", "parse_bytes", "default_cache_dir", "default_prefetch_threads"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
FETCH_LOG = ".fetches.log"


def default_prefetch_threads() -> int:
    """Downloads in flight per process by default: one per two cores this process may use, 1 to 4.

    One GET stream is bound by request latency, not bandwidth (object stores scale with connections). But
    each download also costs CPU (hashing, the cache's bookkeeping), taken from the loader and from a server
    on the same machine, so on few cores more threads read no faster: `benchmarks/bench_loader.py --remote`
    measures both sides (its figures on a 2-core machine are in the README's object storage section)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def parse_bytes(spec, flag: str = "--cache-limit") -> int:
    """'20GB', '512MiB', '1e9' or an int -> bytes."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        value = spec
    else:
        text = str(spec).strip().upper().replace(" ", "")
        num = text.rstrip("KMGTIB")
        unit = text[len(num):]
        try:
            if unit not in _UNITS:
                raise ValueError
            value = int(float(num) * _UNITS[unit])
        except ValueError:
            raise UserError(f"{flag} expects a size such as 20GB, 512MiB or 1000000 (bytes), got {spec!r}") from None
    if value <= 0:
        raise UserError(f"{flag} must be > 0 bytes, got {spec!r}")
    return value


def default_cache_dir() -> Path:
    from streamtrain.user_cache import cache_dir

    root = cache_dir()
    if root is None:
        raise UserError("no cache folder for remote data: give --cache-dir DIR (or set STREAMTRAIN_CACHE_DIR)")
    return root / "remote"


@contextmanager
def _flock(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _cached(path: Path, sha256: str) -> bool:
    """Whether the file at `path` has `sha256`: one stat for a version recorded before (every download is),
    a hash otherwise (`checksums.verify_files`)."""
    try:
        verify_files([ExpectedFile(path, sha256, None, "lengths")])
    except DataError:
        return False
    return True


def _test_delay() -> None:
    """Test hook: STREAMTRAIN_TEST_FETCH_DELAY_S=S makes every download start S seconds late, as over a slow
    network, so a test can stop the server while a run still has shards to fetch."""
    delay = os.environ.get("STREAMTRAIN_TEST_FETCH_DELAY_S")
    if delay:
        time.sleep(float(delay))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    """The cache folder of one remote dataset (`where`) under `cache_dir`; `limit_bytes` None: unbounded."""

    def __init__(self, where: Location, cache_dir: str | os.PathLike | None = None, limit_bytes: int | None = None,
                 wait_s: float = 120.0, prefetch_threads: int | None = None):
        if prefetch_threads is None:
            prefetch_threads = default_prefetch_threads()
        if prefetch_threads < 1:
            raise ValueError(f"prefetch_threads must be >= 1, got {prefetch_threads}")
        self.where = where
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.root = base / "datasets" / hashlib.sha256(where.url.encode()).hexdigest()[:16]
        self.limit_bytes = None if limit_bytes is None else int(limit_bytes)
        self.wait_s = float(wait_s)
        # bytes a reader needs at once (set by the stream from its plan): prefetching leaves that much of the
        # limit free, so the next window's downloads find room among shards no one needs any more and never
        # have to evict a prefetched one (which would then be fetched twice)
        self.working_bytes = 0
        self.index: Index | None = None
        self._epoch = -1
        self._order: list[str] = []
        self._hard: set[str] = set()
        # prefetch: threads of this process, the rest of the published order, and whether they wait for the
        # next publish (no room); `_generation` counts publishes
        self.prefetch_threads = int(prefetch_threads)
        self._threads: list[threading.Thread] = []
        self._threads_pid: int | None = None
        self._work: threading.Condition | None = None
        self._pending: collections.deque[str] = collections.deque()
        self._generation = 0
        self._blocked = False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_threads=[], _threads_pid=None, _work=None, _pending=collections.deque(), _blocked=False)
        return state

    # -- metadata -------------------------------------------------------------------------------------

    def sync(self) -> Index:
        """Fetch index.json (always: it is the commit point) and the lengths file it names (when not cached
        already); the local index.json is written last, so the folder is a dataset only once complete."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".needs").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cache folder {self.root}: cannot create ({e.strerror})") from None
        url = self.where.child(INDEX_FILE).url
        data = get_bytes(self.where, INDEX_FILE)
        index = parse_index(data, self.root, url)  # every name checked before anything is written through it
        with _flock(self.root / ".meta.lock"):
            lengths = self.root / index.lengths_file
            lengths.parent.mkdir(parents=True, exist_ok=True)
            sha = index.lengths_sha256 or None
            if not (sha is not None and _cached(lengths, sha)):
                get_file(self.where, index.lengths_file, lengths, sha256=sha)
                if sha:
                    record_written(lengths, sha)
            local = self.root / INDEX_FILE
            if not (local.is_file() and local.read_bytes() == data):
                atomic_write_bytes(local, data)
        self.index = index  # parsed with this folder as its root
        return self.index

    # -- what this process needs -----------------------------------------------------------------------

    def publish(self, epoch: int, order: list[str], hard: set[str]) -> None:
        """What this process needs: `hard`, the shards it reads now (never evicted), and `order`, the rest
        of its epoch in the order it will need them. Wakes the prefetcher."""
        self._epoch, self._order, self._hard = int(epoch), list(order), set(hard)
        try:
            atomic_write_json(self._needs_file(), {"epoch": self._epoch, "order": self._order,
                                                   "hard": sorted(self._hard)})
        except OSError as e:
            raise UserError(f"cache folder {self.root}: cannot write ({e.strerror})") from None
        self._start_prefetch()

    def _needs_file(self) -> Path:
        return self.root / ".needs" / f"{os.getpid()}.json"

    def _needs(self) -> tuple[dict[str, int], set[str]]:
        """Over every live process of this node: each shard's nearest position of need, and the hard set."""
        nearest: dict[str, int] = {}
        hard: set[str] = set()
        for path in (self.root / ".needs").glob("*.json"):
            try:
                pid = int(path.stem)
            except ValueError:
                continue
            if not _alive(pid):
                try:
                    path.unlink()
                except OSError:
                    pass
                continue
            try:
                obj = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            hard.update(obj.get("hard", []))
            for k, name in enumerate(obj.get("order", [])):
                if k < nearest.get(name, 1 << 62):
                    nearest[name] = k
        return nearest, hard

    # -- shards ---------------------------------------------------------------------------------------

    def path(self, info: ShardInfo) -> Path:
        return self.root / info.file

    def _present(self, info: ShardInfo) -> bool:
        try:
            return self.path(info).stat().st_size == info.bytes
        except OSError:
            return False

    def fetch(self, shard: int):
        """Shard `shard` of the index, downloaded once per node and memory-mapped: (buffer, stat) as
        `map_file` gives them. Blocks until it is there. Mapped under the cache's lock, so no eviction falls
        between the download and the map (a mapped file may be evicted: the map keeps its bytes)."""
        info = self.index.shards[shard]
        for _ in range(8):
            self._get(info, hard=True)
            with _flock(self.root / ".cache.lock"):
                if self._present(info):
                    return map_file(self.path(info))
        raise DataError(f"{self.where.child(info.file).url}: evicted from the cache ({self.root}) again and again "
                        "before it could be read; raise --cache-limit")

    def _get(self, info: ShardInfo, hard: bool) -> bool:
        if self._present(info):
            return True
        path = self.path(info)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _flock(path.with_name(f".{path.name}.lock")):
            if self._present(info):
                return True  # another process fetched it while this one waited
            if not self._reserve(info, hard):
                return False
            _test_delay()
            try:
                get_file(self.where, info.file, path, size=info.bytes, sha256=info.sha256)
            finally:
                self._reservation(info).unlink(missing_ok=True)
            record_written(path, info.sha256)
            with open(self.root / FETCH_LOG, "a") as log:
                log.write(f"{self._epoch} {info.file} {os.getpid()}\n")
        return True

    def _reservation(self, info: ShardInfo) -> Path:
        return self.root / ".needs" / f"{os.getpid()}.{hashlib.sha1(info.file.encode()).hexdigest()[:12]}.reserve"

    def _used_bytes(self) -> tuple[int, dict[str, int]]:
        """(bytes of present shards and of live reservations, {shard file: size} of the present shards)."""
        sizes = {}
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root)
            # the cache's own files (.needs/, locks, downloads in flight) start with a dot; index.json and the
            # lengths file are never evicted
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            name = rel.as_posix()
            if name in (INDEX_FILE, self.index.lengths_file):
                continue
            try:
                sizes[name] = path.stat().st_size
            except FileNotFoundError:
                pass
        reserved = 0
        for path in (self.root / ".needs").glob("*.reserve"):
            pid = int(path.name.split(".", 1)[0])
            if _alive(pid):
                try:
                    reserved += int(path.read_text() or 0)
                except (OSError, ValueError):
                    pass
            else:
                path.unlink(missing_ok=True)
        return sum(sizes.values()) + reserved, sizes

    def _reserve(self, info: ShardInfo, hard: bool) -> bool:
        """Make room for `info` under the limit and reserve it. A prefetch (not hard) evicts only shards no
        live process needs this epoch and gives up when that is not enough; a fetch a reader waits for may
        evict the shard needed furthest ahead, and waits for room (bounded) when every shard is in use."""
        if self.limit_bytes is None:
            self._reservation(info).write_text(str(info.bytes))
            return True
        if info.bytes > self.limit_bytes:
            raise UserError(f"--cache-limit {self.limit_bytes} bytes is smaller than shard {info.file} "
                            f"({info.bytes} bytes); raise it")
        deadline = time.monotonic() + self.wait_s
        room = self.limit_bytes if hard else self.limit_bytes - self.working_bytes
        while True:
            with _flock(self.root / ".cache.lock"):
                used, present = self._used_bytes()
                if used + info.bytes <= room:
                    self._reservation(info).write_text(str(info.bytes))
                    return True
                nearest, hard_set = self._needs()
                candidates = [n for n in present if n not in hard_set and n != info.file]
                unneeded = [n for n in candidates if n not in nearest]
                victims = unneeded if not hard else unneeded + sorted(
                    (n for n in candidates if n in nearest), key=lambda n: -nearest[n])
                for name in victims:
                    (self.root / name).unlink(missing_ok=True)
                    used -= present[name]
                    if used + info.bytes <= room:
                        self._reservation(info).write_text(str(info.bytes))
                        return True
            if not hard:
                return False
            if time.monotonic() > deadline:
                raise DataError(f"{self.where.child(info.file).url}: no room in the cache ({self.root}, limit "
                                f"{self.limit_bytes} bytes) for {self.wait_s:g} s: the shards in use fill it; "
                                "raise --cache-limit")
            time.sleep(0.05)

    # -- prefetch -------------------------------------------------------------------------------------

    def _start_prefetch(self) -> None:
        """Hand the published order to the prefetch threads (started in this process on first use)."""
        if self._threads_pid != os.getpid():  # none yet, or inherited by fork (threads do not survive it)
            self._work = threading.Condition()
            self._threads = []
            self._threads_pid = os.getpid()
        with self._work:
            self._pending = collections.deque(self._order)
            self._generation += 1
            self._blocked = False
            self._work.notify_all()
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self.prefetch_threads:
            t = threading.Thread(target=self._prefetch_loop, name=f"streamtrain-prefetch-{len(self._threads)}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _prefetch_loop(self) -> None:
        """One prefetch thread: take the next shard of the published order and fetch it, until the order is
        done or one of them finds no room without evicting what is still needed (then they all wait for the
        reader's next publish). Downloads of different shards overlap; the per-shard lock keeps each one
        to one download per node, and reservations under the cache lock keep the limit."""
        by_name = {s.file: s for s in self.index.shards}
        while True:
            with self._work:
                while self._blocked or not self._pending:
                    self._work.wait()
                name, generation = self._pending.popleft(), self._generation
            info = by_name.get(name)
            try:
                ok = info is not None and self._get(info, hard=False)
            except Exception:
                ok = False  # the reader's own fetch reports it, naming the object
            if not ok:
                with self._work:
                    if generation == self._generation:
                        self._blocked = True

"""DatasetWriter: sequences in, a dataset folder out, by the commit protocol (`dataset.commit`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from streamtrain.dataset.commit import (
    DatasetLock,
    collect_leftovers,
    install_shards,
    new_token,
    staging_folder,
)
from streamtrain.dataset.index import (
    Index,
    ShardInfo,
    is_dataset,
    read_index,
    write_index,
)
from streamtrain.dataset.io import (
    DiskFullError,
    atomic_write_bytes,
    naming_full_disk,
    npy_bytes,
)
from streamtrain.dataset.schema import (
    INDEX_FILE,
    LENGTHS_FILE,
    SHARD_DIR,
    sequences_to_table,
    shard_name,
)
from streamtrain.dataset.shard import write_shard
from streamtrain.dataset.stats import RunningStats, length_histogram_json
from streamtrain.errors import DataError

__all__ = ["DatasetWriter"]


def _current_index(root: Path) -> Index | None:
    try:
        return read_index(root) if is_dataset(root) else None
    except DataError:
        return None


class DatasetWriter:
    """Write sequences into a dataset folder, new or holding a dataset to replace, by the commit protocol
    above: the previous dataset stays usable until index.json is replaced, after a crash at any moment and
    after an exception inside the `with` block (then nothing of the new one is kept).

    >>> with DatasetWriter("shards", dim=28) as w:
    ...     w.add(np.zeros((5, 28), np.float32), path="a.jsonl", line=1)

    In a folder without a dataset the files get the plain names (`shards/shard-000000.arrow`,
    `lengths.npy`); replacing a dataset, they carry a fresh token (`shards/shard-<token>-000000.arrow`,
    `lengths-<token>.npy`), and the old files are deleted once the new index.json is in place.
    """

    def __init__(self, root: str | os.PathLike, dim: int, shard_bytes: int = 64 << 20, extra: dict | None = None):
        self.root = Path(root)
        self.dim = dim
        self.shard_bytes = shard_bytes
        self.extra = dict(extra or {})
        self.stats = RunningStats(dim)
        self.shards: list[ShardInfo] = []
        self.lengths: list[int] = []
        self._pending: list[tuple[np.ndarray, str, int]] = []
        self._pending_bytes = 0
        self._lock: DatasetLock | None = None
        self._staging: contextlib.ExitStack | None = None
        self._staging_dir: Path | None = None
        self._token = ""
        self._plain_names = False
        self._staged: list[tuple[Path, str]] = []  # (staged path, final name) of every shard written
        self._closed = False
        self._index: Index | None = None

    def __enter__(self) -> "DatasetWriter":
        self._begin()
        return self

    @contextlib.contextmanager
    def _keeping_previous(self) -> Iterator[None]:
        try:
            yield
        except DiskFullError as e:
            raise DiskFullError(f"{e}; nothing was written to {self.root}, its previous content is intact") from None

    def _begin(self) -> None:
        if self._lock is not None:
            return
        if self._closed:
            raise ValueError("this DatasetWriter is closed")
        with self._keeping_previous(), naming_full_disk(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        lock = DatasetLock(self.root)
        with self._keeping_previous():
            lock.__enter__()
        try:
            collect_leftovers(self.root, _current_index(self.root))
            self._token = new_token()
            # Plain names only where nothing can name them: no index.json, and no file of those names.
            self._plain_names = not (self.root / INDEX_FILE).exists() and not (self.root / LENGTHS_FILE).exists() \
                and not any((self.root / SHARD_DIR).glob("shard-[0-9]*.arrow"))
            stack = contextlib.ExitStack()
            with self._keeping_previous():
                self._staging_dir = stack.enter_context(staging_folder(self.root, self._token))
            self._staging = stack
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        self._lock = lock

    def add(self, sequence: np.ndarray, path: str = "", line: int = 0) -> None:
        seq = np.asarray(sequence, dtype=np.float32)
        if seq.ndim != 2 or seq.shape[1] != self.dim:
            raise ValueError(f"expected a (T, {self.dim}) array, got shape {seq.shape}")
        self._begin()
        self._pending.append((seq, path, line))
        self._pending_bytes += seq.nbytes
        if self._pending_bytes >= self.shard_bytes:
            with self._keeping_previous():
                self._flush()

    def _shard_name(self, number: int) -> str:
        return shard_name(number) if self._plain_names else f"{SHARD_DIR}/shard-{self._token}-{number:06d}.arrow"

    def _flush(self) -> None:
        if not self._pending:
            return
        seqs = [s for s, _, _ in self._pending]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        values = np.concatenate(seqs) if seqs else np.zeros((0, self.dim), np.float32)
        table = sequences_to_table(values, lengths, [p for _, p, _ in self._pending],
                                   np.array([ln for _, _, ln in self._pending]), self.dim)
        name = self._shard_name(len(self.shards))
        staged = self._staging_dir / Path(name).name
        size, digest = write_shard(staged, table)
        self._staged.append((staged, name))
        first_id = len(self.lengths)
        self.shards.append(ShardInfo(name, len(seqs), int(lengths.sum()), size, digest, first_id))
        self.lengths.extend(lengths.tolist())
        self.stats.add_values(values)
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> Index:
        """Commit: move the shards in, write the lengths file, then index.json; return the new Index."""
        self._begin()
        written: list[Path] = []  # files of the new dataset outside the staging folder, until it is committed
        try:
            with self._keeping_previous():
                self._commit(written)
        finally:
            for p in written:  # not committed: nothing names them
                p.unlink(missing_ok=True)
            self._end()
        return self._index

    def _commit(self, written: list[Path]) -> None:
        """Steps 3 to 6 of the protocol; `written` lists the new files outside the staging folder until
        index.json names them."""
        self._flush()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        buf = npy_bytes(lengths)
        written.extend(self.root / name for _, name in self._staged)
        install_shards(self.root, self._staged)
        lengths_file = LENGTHS_FILE if self._plain_names else f"lengths-{self._token}.npy"
        written.append(self.root / lengths_file)
        with naming_full_disk(self.root / lengths_file):
            atomic_write_bytes(self.root / lengths_file, buf)
        index = Index(
            root=self.root,
            dim=self.dim,
            num_sequences=len(lengths),
            num_tokens=int(lengths.sum(dtype=np.int64)),
            shards=self.shards,
            mean=self.stats.mean,
            std=self.stats.std,
            lengths_file=lengths_file,
            lengths_sha256=hashlib.sha256(buf).hexdigest(),
            extra={"stats": self.stats.to_json(), "length_histogram": length_histogram_json(lengths), **self.extra},
        )
        with naming_full_disk(self.root / INDEX_FILE):
            write_index(index)
        written.clear()
        self._index = index
        collect_leftovers(self.root, index)

    def _end(self) -> None:
        self._closed = True
        self._pending.clear()
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._end()  # the previous dataset, if any, is left as it was
        elif not self._closed:
            self.close()

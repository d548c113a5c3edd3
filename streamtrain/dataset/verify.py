"""The full audit of a dataset (`inspect --verify`): every byte of every file hashed and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamtrain.dataset.index import Index, load_lengths
from streamtrain.dataset.io import file_sha256
from streamtrain.dataset.schema import INDEX_FILE
from streamtrain.dataset.shard import open_shard
from streamtrain.errors import DataError

__all__ = ["verify_dataset"]


def verify_dataset(index: Index) -> list[str]:
    """Re-read and hash every byte of every file the index names, whatever was verified before; return one
    line per problem (empty: the dataset is intact)."""
    import pyarrow.compute as pc  # here, not at import: 0.1 s of every process start, needed only to verify

    problems = []
    root = Path(index.root)
    try:
        lengths = load_lengths(index)  # its own problems are listed below
    except DataError:
        lengths = None
    for s in index.shards:
        path = root / s.file
        if not path.is_file():
            problems.append(f"{path}: shard file is missing")
            continue
        size = path.stat().st_size
        if size != s.bytes:
            problems.append(f"{path}: {size} bytes, index.json says {s.bytes}")
            continue
        if file_sha256(path) != s.sha256:
            problems.append(f"{path}: checksum mismatch (sha256 differs from index.json)")
            continue
        try:
            table = open_shard(path)
        except DataError as e:
            problems.append(str(e))
            continue
        tokens = int(pc.sum(table.column("length")).as_py() or 0)
        if table.num_rows != s.num_sequences or tokens != s.num_tokens:
            problems.append(
                f"{path}: {table.num_rows} sequences / {tokens} tokens, "
                f"index.json says {s.num_sequences} / {s.num_tokens}"
            )
        elif lengths is not None and s.num_sequences:
            stored = pc.list_value_length(table.column("sequence")).to_numpy()
            if not np.array_equal(stored, lengths[s.first_id : s.first_id + s.num_sequences]):
                problems.append(f"{path}: sequence lengths differ from {index.lengths_file}")
    lengths_path = root / index.lengths_file
    if not lengths_path.is_file():
        problems.append(f"{lengths_path}: lengths file is missing")
    elif index.lengths_sha256 and file_sha256(lengths_path) != index.lengths_sha256:
        problems.append(f"{lengths_path}: checksum mismatch (sha256 differs from index.json)")
    total = sum(s.num_sequences for s in index.shards)
    if total != index.num_sequences:
        problems.append(f"{root / INDEX_FILE}: shards hold {total} sequences, num_sequences says {index.num_sequences}")
    return problems

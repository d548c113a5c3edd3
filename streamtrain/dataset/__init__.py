"""The on-disk dataset: shard schema and names, index.json and the lengths file, atomic I/O and checksums,
statistics, the commit protocol and DatasetWriter, verification, and the summary `inspect` prints.

Imports pyarrow and numpy only, never torch. Modules, each importing only those above it:
  schema  io  index  shard  stats  verify  commit  writer  checksums  summary  synthetic
"""

from streamtrain.dataset.commit import (
    LOCK_FILE,
    STAGING_PREFIX,
    DatasetLock,
    collect_leftovers,
    install_shards,
    is_dataset_file,
    new_token,
    referenced_files,
    staging_folder,
)
from streamtrain.dataset.index import (
    Index,
    ShardInfo,
    index_json,
    is_dataset,
    load_lengths,
    member_name,
    parse_index,
    parse_lengths,
    read_index,
    write_index,
)
from streamtrain.dataset.io import (
    DiskFullError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    file_sha256,
    fsync_dir,
    map_file,
    naming_full_disk,
    npy_bytes,
)
from streamtrain.dataset.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    LENGTHS_FILE,
    REJECTS_FILE,
    SHARD_DIR,
    sequences_to_table,
    shard_name,
    shard_schema,
)
from streamtrain.dataset.shard import open_shard, read_shard, write_shard
from streamtrain.dataset.stats import RunningStats, length_histogram, length_histogram_json
from streamtrain.dataset.verify import verify_dataset
from streamtrain.dataset.writer import DatasetWriter

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "INDEX_FILE", "LENGTHS_FILE", "REJECTS_FILE", "SHARD_DIR",
    "shard_schema", "shard_name", "sequences_to_table",
    "atomic_write_bytes", "atomic_write_with", "atomic_write_json", "fsync_dir", "file_sha256", "map_file",
    "npy_bytes", "DiskFullError", "naming_full_disk",
    "ShardInfo", "Index", "is_dataset", "read_index", "parse_index", "member_name", "index_json", "write_index", "parse_lengths", "load_lengths",
    "read_shard", "open_shard", "write_shard",
    "RunningStats", "length_histogram", "length_histogram_json", "verify_dataset",
    "LOCK_FILE", "STAGING_PREFIX", "DatasetLock", "new_token", "staging_folder", "install_shards",
    "referenced_files", "is_dataset_file", "collect_leftovers",
    "DatasetWriter",
]

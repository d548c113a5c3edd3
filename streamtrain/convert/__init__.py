"""JSON/JSONL files → validated, checksummed Arrow shard dataset (the `streamtrain convert` engine).

Owns: finding input files, splitting records, validating them (with one precise reason per rejected record),
parsing values to float32, parallel conversion, per-dimension statistics, rejects, incremental reuse and the
crash-safe commit of a dataset folder. Imports format, numpy, pyarrow, orjson (and pysimdjson when installed);
never torch.

Modules, in the order data flows through them (each imports only those above it):
  records   one record: decoding, validation with a reason (the precise path), splitting text into records
  blocks    blocks of records: the fast path and its parser backends (simdjson, orjson)
  sources   input discovery, reading input files, detecting the vector width
  plan      groups (one shard each, the unit of reuse), partials, and the reuse manifest of a previous run
  tasks     one task in a worker process: convert segments, statistics per partial, write a shard or piece
  report    ConvertProgress (events while running) and ConvertResult
  pool      the worker processes: forked up front, one task each at a time, a death seen at once
  workers   running the tasks (inline or on the pool), merging pieces, per-group results
  commit    the dataset folder: leftovers and the crash-safe commit (the protocol and its lock are
            format's, shared with DatasetWriter; index.json last)
  pipeline  convert(): arguments, then sources → plan → workers → commit
"""

# LOCK_FILE, STAGING_PREFIX and MANIFEST_* stay reachable here (outside `__all__`), as before the split.
from streamtrain.convert.blocks import parser_backend
from streamtrain.convert.commit import LOCK_FILE as LOCK_FILE
from streamtrain.convert.commit import STAGING_PREFIX as STAGING_PREFIX
from streamtrain.convert.pipeline import ON_ERROR_CHOICES, convert
from streamtrain.convert.plan import MANIFEST_FORMAT as MANIFEST_FORMAT
from streamtrain.convert.plan import MANIFEST_VERSION as MANIFEST_VERSION
from streamtrain.convert.records import F32_MAX, F32_OVERFLOW, RecordError, parse_record
from streamtrain.convert.report import ConvertProgress, ConvertResult
from streamtrain.convert.sources import list_sources
from streamtrain.convert.workers import default_workers

__all__ = [
    "ON_ERROR_CHOICES",
    "F32_MAX",
    "F32_OVERFLOW",
    "RecordError",
    "parse_record",
    "ConvertProgress",
    "ConvertResult",
    "convert",
    "default_workers",
    "list_sources",
    "parser_backend",
]

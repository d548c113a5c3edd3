"""JSON/JSONL files → validated, checksummed Arrow shard dataset (the `streamtrain convert` engine).

Finds the input files, splits and validates records (one precise reason per rejected record), parses values
to float32, converts in parallel, computes statistics, reuses unchanged work and commits the dataset folder
crash-safely through `streamtrain.dataset`'s protocol. Never imports torch. Modules, in the order data
flows through them (each imports only those before it): records (one record: the precise path), blocks
(the fast path and its parser backends), sources, plan (groups, partials, the reuse manifest), tasks (one
task in a worker), report, pool (the worker processes), workers, commit, pipeline (`convert()`).
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

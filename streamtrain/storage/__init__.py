"""Datasets in object storage: locations and settings (`location`), object operations with bounded retries
(`objects`), the node-local shard cache a remote ShardStream reads through (`cache`), publishing a dataset to
and mirroring JSON from a prefix (`transfer`), and the commands' entry points (`remote`). Imports no torch;
names load lazily, so `streamtrain --help` imports no pyarrow.
"""

from importlib import import_module

_NAMES = {
    "Location": "location", "STORAGE_KEYS": "location", "is_remote": "location", "redact": "location",
    "parse_storage_options": "location", "set_default_options": "location",
    "ShardCache": "cache", "default_cache_dir": "cache", "parse_bytes": "cache",
    "publish": "transfer", "mirror": "transfer", "content_key": "transfer", "read_remote_index": "transfer",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(import_module(f"streamtrain.storage.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'streamtrain.storage' has no attribute {name!r}")

"""Where a dataset lives: a local folder or an object-store URL (`s3://bucket/prefix`, `gs://...`), and the
`pyarrow.fs` filesystem that reaches it.

S3 settings come the usual way: credentials from the AWS SDK's chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, ~/.aws profiles, instance metadata); the endpoint from
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (the AWS SDKs' variables, which pyarrow's S3FileSystem does not read
by itself); the region from AWS_REGION / AWS_DEFAULT_REGION. `--storage-option KEY=VALUE` overrides any of
them (`STORAGE_KEYS`). Other schemes go through fsspec when it is installed. Secrets never leave this
module: `Location` pickles its options but prints none, and `redact` scrubs them from error texts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from streamtrain.errors import UserError

__all__ = ["Location", "STORAGE_KEYS", "is_remote", "parse_storage_options", "set_default_options", "redact", "join"]

# --storage-option keys: S3FileSystem's settings by their AWS names, and the retry budget of this package
STORAGE_KEYS = {
    "endpoint_url": "S3/GCS endpoint, e.g. http://127.0.0.1:8333 (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)",
    "region": "S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)",
    "anonymous": "true: no credentials (public buckets)",
    "access_key": "S3 access key id (default: the AWS credential chain)",
    "secret_key": "S3 secret access key",
    "session_token": "S3 session token",
    "connect_timeout": "seconds to connect (default 5)",
    "request_timeout": "seconds per request (default 30)",
    "retry_seconds": "how long transient errors are retried before the run ends (default 60)",
}
_SECRET_KEYS = ("access_key", "secret_key", "session_token")
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def is_remote(path) -> bool:
    """True for a URL with a scheme other than file:// (a Windows drive letter is not a scheme)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    scheme = path.split("://", 1)[0].lower()
    return len(scheme) > 1 and scheme != "file"


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def parse_storage_options(pairs: list[str] | None) -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: VALUE}, keys checked against STORAGE_KEYS."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--storage-option expects KEY=VALUE, got {pair.split('=')[0]!r}...")
        if key not in STORAGE_KEYS:
            raise UserError(f"--storage-option {key}: unknown key (known: {', '.join(STORAGE_KEYS)})")
        out[key] = value.strip()
    for key in ("connect_timeout", "request_timeout", "retry_seconds"):
        if key in out:
            try:
                if not float(out[key]) > 0:
                    raise ValueError
            except ValueError:
                raise UserError(f"--storage-option {key} must be a number of seconds > 0, got {out[key]!r}") from None
    if "anonymous" in out and out["anonymous"].lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise UserError(f"--storage-option anonymous must be true or false, got {out['anonymous']!r}")
    return out


def redact(text: str, options: dict[str, str] | None = None) -> str:
    """`text` with every credential this process knows of replaced by ***."""
    secrets = [v for k, v in (options or {}).items() if k in _SECRET_KEYS and v]
    secrets += [os.environ[k] for k in _ENV_SECRETS if os.environ.get(k)]
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# (pid, scheme, options) -> filesystem. Per process: the AWS SDK's connections and threads do not survive a
# fork, so a forked DataLoader worker makes its own instead of using the copy of its parent's
_FILESYSTEMS: dict = {}
_DEFAULT_OPTIONS: dict[str, str] = {}  # --storage-option of this process's command


def set_default_options(options: dict[str, str]) -> None:
    """The storage options a Location made without explicit ones gets (the command's --storage-option)."""
    _DEFAULT_OPTIONS.clear()
    _DEFAULT_OPTIONS.update(options)


@dataclass(frozen=True)
class Location:
    """An object-store prefix: `url` (scheme://bucket/prefix, no trailing slash) and the storage options that
    reach it. Picklable (the filesystem is made again in each process)."""

    url: str
    options: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, url: str, options: dict[str, str] | None = None) -> "Location":
        parts = urlsplit(url)
        if not parts.netloc:
            raise UserError(f"{url}: expected scheme://bucket/prefix")
        if parts.query or parts.fragment:
            raise UserError(f"{url}: a dataset URL takes no ?query or #fragment")
        options = dict(_DEFAULT_OPTIONS) if options is None else options
        return cls(f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}", tuple(sorted(options.items())))

    def __str__(self) -> str:
        return self.url

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def fs_path(self) -> str:
        """The prefix as the filesystem names it: bucket/prefix."""
        return self.url.split("://", 1)[1]

    def child(self, name: str) -> "Location":
        return Location(join(self.url, name), self.options)

    def key(self, name: str) -> str:
        """Filesystem path of `name` under the prefix."""
        return join(self.fs_path, name)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    @property
    def retry_seconds(self) -> float:
        return float(self.option("retry_seconds", 60.0))

    def redact(self, text: str) -> str:
        return redact(text, dict(self.options))

    def filesystem(self):
        key = (os.getpid(), self.scheme, self.options)
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = _make_filesystem(self.scheme, dict(self.options))
        return fs


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def _make_filesystem(scheme: str, options: dict[str, str]):
    import pyarrow.fs as pafs

    connect = float(options.get("connect_timeout", 5))
    request = float(options.get("request_timeout", 30))
    if scheme == "s3":
        endpoint = options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs = {"connect_timeout": connect, "request_timeout": request,
                  # the SDK's own retries stay short: `retry` owns the time budget, with backoff and jitter
                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
        if region:
            kwargs["region"] = region
        if _truthy(options.get("anonymous", "false")):
            kwargs["anonymous"] = True
        for key in _SECRET_KEYS:
            if options.get(key):
                kwargs[key] = options[key]
        return pafs.S3FileSystem(**kwargs)
    if scheme in ("gs", "gcs"):
        kwargs = {"retry_time_limit": request}
        if options.get("endpoint_url"):
            kwargs["endpoint_override"] = options["endpoint_url"]
        if _truthy(options.get("anonymous", "false")):
            kwargs["anonymous"] = True
        return pafs.GcsFileSystem(**kwargs)
    try:
        import fsspec
    except ImportError:
        raise UserError(f"{scheme}:// needs fsspec (pip install 'streamtrain[fsspec]'); s3:// and gs:// work without it") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))

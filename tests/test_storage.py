"""Object storage without a server: URLs and settings, retries with a bounded budget, sizes, object keys."""

import pytest

from streamtrain.errors import DataError, UserError
from streamtrain.storage import Location, content_key, is_remote, parse_bytes, parse_storage_options, redact
from streamtrain.storage.objects import is_permanent, retrying


@pytest.mark.parametrize("path, remote", [("s3://b/p", True), ("gs://b/p", True), ("file:///tmp/x", False),
                                          ("/tmp/x", False), ("C://x", False), ("rel/dir", False)])
def test_is_remote(path, remote):
    assert is_remote(path) is remote


def test_location_normalizes_and_keeps_its_options_out_of_its_repr():
    loc = Location.of("S3://bucket/a/b/", {"secret_key": "hunter2-secret"})
    assert loc.url == "s3://bucket/a/b" and loc.fs_path == "bucket/a/b" and loc.key("x.arrow") == "bucket/a/b/x.arrow"
    assert "hunter2" not in repr(loc) and "hunter2" not in str(loc)
    assert loc.redact("denied for hunter2-secret") == "denied for ***"
    with pytest.raises(UserError, match="bucket"):
        Location.of("s3://")
    with pytest.raises(UserError, match="query"):
        Location.of("s3://b/p?versionId=3")


def test_environment_settings_reach_the_s3_filesystem(monkeypatch):
    from streamtrain.storage import location

    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    location._FILESYSTEMS.clear()
    fs = Location.of("s3://bucket/p", {}).filesystem()
    assert fs.region == "eu-north-1"
    fs = Location.of("s3://bucket/p", {"region": "us-west-2"}).filesystem()
    assert fs.region == "us-west-2"  # a --storage-option wins over the environment
    location._FILESYSTEMS.clear()


def test_storage_options_are_checked():
    assert parse_storage_options(["endpoint-url=http://h:1", "anonymous=true"]) == {
        "endpoint_url": "http://h:1", "anonymous": "true"}
    for bad, fragment in [(["nope=1"], "unknown key"), (["endpoint_url"], "KEY=VALUE"),
                          (["retry_seconds=-1"], "seconds"), (["anonymous=maybe"], "true or false")]:
        with pytest.raises(UserError, match=fragment):
            parse_storage_options(bad)


def test_redact_removes_environment_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abcd1234secret")
    assert "abcd1234secret" not in redact("url?sig=abcd1234secret failed")


@pytest.mark.parametrize("spec, value", [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("1e6", 10**6), (4096, 4096),
                                         ("3 kb", 3000)])
def test_parse_bytes(spec, value):
    assert parse_bytes(spec) == value


@pytest.mark.parametrize("spec", ["", "ten", "-5GB", "5XB", 0])
def test_parse_bytes_rejects(spec):
    with pytest.raises(UserError, match="cache-limit"):
        parse_bytes(spec)


def test_content_key_carries_the_sha_and_is_stable():
    sha = "0123456789abcdef" + "0" * 48
    assert content_key("shards/shard-000003.arrow", sha) == "shards/shard-000003-0123456789abcdef.arrow"
    assert content_key(content_key("lengths.npy", sha), sha) == "lengths-0123456789abcdef.npy"


class _Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s

    def __call__(self):
        return self.now


def test_transient_errors_are_retried_with_backoff_then_succeed():
    clock = _Clock()
    loc = Location.of("s3://b/p", {"retry_seconds": "30"})
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")
        return "ok"

    assert retrying("s3://b/p/x", loc, flaky, sleep=clock.sleep, clock=clock) == "ok"
    assert len(calls) == 4 and len(clock.sleeps) == 3 and all(0 <= s <= 8 for s in clock.sleeps)


def test_a_server_gone_past_the_budget_ends_naming_the_object():
    clock = _Clock()
    loc = Location.of("s3://b/p", {"retry_seconds": "5"})

    def down():
        clock.now += 0.5
        raise OSError("AWS Error NETWORK_CONNECTION: Could not connect to server")

    with pytest.raises(DataError, match=r"s3://b/p/x: storage unreachable for 5 s"):
        retrying("s3://b/p/x", loc, down, sleep=clock.sleep, clock=clock)
    assert clock.now <= 5.5 + 1e-9


@pytest.mark.parametrize("error", [FileNotFoundError("Path does not exist"), OSError("AWS Error ACCESS_DENIED during HeadObject"),
                                   PermissionError("denied")])
def test_permanent_errors_end_at_once(error):
    clock = _Clock()
    calls = []

    def fail():
        calls.append(1)
        raise error

    assert is_permanent(error)
    with pytest.raises(DataError, match="s3://b/p/x"):
        retrying("s3://b/p/x", Location.of("s3://b/p", {}), fail, sleep=clock.sleep, clock=clock)
    assert len(calls) == 1 and not clock.sleeps

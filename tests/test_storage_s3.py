"""Datasets in object storage, against a real S3 server (SeaweedFS): convert to and from s3://, inspect and
verify, fit and eval from s3:// equal to local, the bounded shared cache, faults (server gone, corrupted
objects), and untrusted metadata."""

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset

from streamtrain.cli import main

TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--ff", "32", "--num-workers", "0", "--batch-tokens", "256"]
DIM = 6


def _seqs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [np.cumsum(rng.normal(size=(int(rng.integers(2, 40)), DIM)), axis=0).astype(np.float32) for _ in range(n)]


def _write_jsonl(folder: Path, seqs, per_file=50):
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(0, len(seqs), per_file):
        with open(folder / f"part-{f // per_file:03d}.jsonl", "w") as out:
            for s in seqs[f : f + per_file]:
                out.write(json.dumps(s.tolist()) + "\n")


def _upload_folder(server, folder: Path, url: str):
    fs = server.filesystem()
    base = url.split("://", 1)[1]
    for path in folder.rglob("*"):
        if path.is_file():
            with fs.open_output_stream(f"{base}/{path.relative_to(folder).as_posix()}") as out:
                out.write(path.read_bytes())


def _one_line_error(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _model_state(run: Path):
    from streamtrain.train.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _cache_files(cache: Path):
    return [p for p in cache.rglob("*.arrow") if not p.name.startswith(".")]


@pytest.fixture
def local_ds(tmp_path):
    seqs = _seqs()
    write_dataset(tmp_path / "local", seqs, shard_bytes=1500)
    return tmp_path / "local", seqs


def test_convert_local_json_to_s3_then_inspect_verify_and_rerun_reuses(s3, tmp_path, capsys):
    server, bucket = s3
    seqs = _seqs(120)
    _write_jsonl(tmp_path / "json", seqs)
    url = f"{bucket}/ds"
    args = ["convert", str(tmp_path / "json"), "--out", url, "--cache-dir", str(tmp_path / "c"), "--shard-mb", "0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "index.json written last" in out and url in out
    assert main(["inspect", url, "--verify", "--json", "--cache-dir", str(tmp_path / "c2")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_sequences"] == len(seqs) and report["problems"] == []
    # the same input again: nothing uploaded
    assert main(args) == 0
    assert "uploaded 0 shards" in capsys.readouterr().out
    # a changed file: only its shard goes up again, and objects no index names are removed after two versions
    _write_jsonl(tmp_path / "json", seqs[:50] + _seqs(70, seed=9))
    assert main(args) == 0
    line = capsys.readouterr().out
    assert "uploaded 0 shards" not in line


def test_convert_s3_json_to_s3_names_rejects_and_equals_a_local_convert(s3, tmp_path, capsys):
    server, bucket = s3
    seqs = _seqs(80)
    _write_jsonl(tmp_path / "json", seqs)
    with open(tmp_path / "json" / "part-999.jsonl", "w") as f:
        f.write(json.dumps(seqs[0].tolist()) + "\n[[1, 2]]\n")  # a record of the wrong width
    _upload_folder(server, tmp_path / "json", f"{bucket}/raw")
    code = main(["convert", f"{bucket}/raw", "--out", f"{bucket}/ds", "--on-error", "skip",
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "json"), "--out", str(tmp_path / "local"), "--on-error", "skip"]) == 0
    capsys.readouterr()
    assert main(["inspect", f"{bucket}/ds", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(tmp_path / "local"), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert remote["num_sequences"] == local["num_sequences"] == len(seqs) + 1
    assert remote["num_rejected"] == local["num_rejected"] == 1
    for key in ("num_tokens", "mean", "std", "lengths"):
        assert remote[key] == local[key], key
    fs = server.filesystem()
    rejects = fs.open_input_stream(f"{bucket.split('://')[1]}/ds/rejects.jsonl").read().decode()
    assert "part-999.jsonl" in rejects and ":2" in rejects or '"line": 2' in rejects


def test_a_fit_from_s3_equals_the_same_fit_from_local_bitwise_and_eval_agrees(s3, local_ds, tmp_path, capsys):
    import torch

    from streamtrain.storage import Location, publish

    server, bucket = s3
    root, _ = local_ds
    url = f"{bucket}/ds"
    publish(root, Location.of(url))
    common = [*TINY, "--max-steps", "20", "--seed", "3", "--quiet"]
    assert main(["fit", *common, "--data", str(root), "--out", str(tmp_path / "a")]) == 0
    assert main(["fit", *common, "--data", url, "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c")]) == 0
    a, b = _model_state(tmp_path / "a"), _model_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    ck = str(tmp_path / "b" / "checkpoints" / "last.pt")
    assert main(["eval", "--checkpoint", ck, "--data", str(root), "--json"]) == 0
    local_report = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", ck, "--data", url, "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out) == local_report


def test_a_cache_at_30_percent_of_the_data_never_exceeds_it_and_fetches_each_shard_once_per_epoch(s3, local_ds, tmp_path):
    from streamtrain.data import ShardStream
    from streamtrain.storage import Location, publish
    from streamtrain.storage.cache import FETCH_LOG

    server, bucket = s3
    root, seqs = local_ds
    url = f"{bucket}/ds"
    publish(root, Location.of(url))
    total = sum(p.stat().st_size for p in (root / "shards").iterdir())
    limit = int(0.3 * total)
    cache = tmp_path / "cache"
    stream = ShardStream(url, max_tokens=256, seed=1, window=2, cache_dir=cache, cache_limit=limit)
    samples, pinned_samples, stop = [], [], threading.Event()
    sizes = {Path(info.file).name: info.bytes for info in stream.indexes[0].shards}  # the remote names

    def evicted_but_mapped() -> int:
        # an evicted shard this process still maps keeps its disk space: it counts against the limit too
        names = set()
        for line in Path("/proc/self/maps").read_text().splitlines():
            if line.endswith(" (deleted)") and str(cache) in line:
                names.add(Path(line.split()[5]).name)
        return sum(sizes.get(n, 0) for n in names)

    def sample():
        # under the cache's lock, which every eviction takes: a scan without it could count a shard just
        # evicted and the one downloaded in its place
        import fcntl

        while not stop.is_set():
            locks = list(cache.rglob(".cache.lock"))
            if locks:
                with open(locks[0]) as f:
                    fcntl.flock(f, fcntl.LOCK_EX)
                    pinned = evicted_but_mapped()
                    pinned_samples.append(pinned)
                    samples.append(sum(p.stat().st_size for p in _cache_files(cache) if p.exists()) + pinned)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    seen = []
    try:
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            for batch in stream:
                for j, i in enumerate(batch.ids.tolist()):
                    n, o = int(batch.lengths[j]), int(batch.offsets[j])
                    np.testing.assert_array_equal(batch.x[j, :n].numpy(), seqs[i][o : o + n])
                seen.extend(batch.ids.tolist())
    finally:
        stop.set()
        sampler.join()
    assert sorted(seen) == sorted(list(range(len(seqs))) * 2)  # both epochs complete, every id once each
    assert len(samples) > 10 and max(samples) <= limit, (max(samples), limit, max(pinned_samples))
    log = [line.split() for line in (next(cache.rglob(FETCH_LOG))).read_text().splitlines()]
    per_epoch = Counter((e, name) for e, name, _ in log)
    assert per_epoch and max(per_epoch.values()) == 1  # no shard fetched twice in an epoch
    num_shards = len(list((root / "shards").iterdir()))
    assert {e for e, _ in per_epoch} == {"0", "1"} and sum(1 for e, _ in per_epoch if e == "0") == num_shards


def test_a_cache_limit_below_what_a_rank_reads_at_once_is_an_error_at_start(s3, local_ds, tmp_path):
    from streamtrain.data import ShardStream
    from streamtrain.errors import UserError
    from streamtrain.storage import Location, publish

    server, bucket = s3
    root, _ = local_ds
    publish(root, Location.of(f"{bucket}/ds"))
    with pytest.raises(UserError, match="cache-limit"):
        ShardStream(f"{bucket}/ds", max_tokens=256, window=4, cache_dir=tmp_path / "c", cache_limit="2KB")


def test_two_ranks_sharing_one_cache_download_each_shard_once(s3, local_ds, tmp_path):
    from streamtrain.storage import Location, publish
    from streamtrain.storage.cache import FETCH_LOG

    server, bucket = s3
    root, _ = local_ds
    url = f"{bucket}/ds"
    publish(root, Location.of(url))
    cache = tmp_path / "cache"
    env = {**os.environ, **server.env, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "streamtrain",
           "fit", *TINY, "--data", url, "--epochs", "1", "--out", str(tmp_path / "run"), "--cache-dir", str(cache),
           "--quiet", "--device", "cpu"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    log = [line.split() for line in next(cache.rglob(FETCH_LOG)).read_text().splitlines()]
    fetched = Counter(name for _, name, _ in log)
    assert len(fetched) == len(list((root / "shards").iterdir())) and set(fetched.values()) == {1}
    assert len({pid for _, _, pid in log}) == 2  # both ranks fetched (what the other had not yet)


def _fit_cmd(url, out, cache, extra=()):
    return [sys.executable, "-m", "streamtrain", "fit", *TINY, "--data", url, "--out", str(out), "--cache-dir", str(cache),
            "--cache-limit", "30KB", "--window", "2", "--max-steps", "40", "--save-every", "5", "--seed", "2", "--quiet",
            "--storage-option", "retry_seconds=4", "--storage-option", "connect_timeout=1",
            "--storage-option", "request_timeout=2", *extra]


@pytest.mark.slow
def test_the_server_killed_mid_epoch_ends_the_run_naming_the_object_and_resume_continues_exactly(
        s3, local_ds, tmp_path):
    import torch

    from streamtrain.storage import Location, publish

    server, bucket = s3
    root, _ = local_ds
    url = f"{bucket}/ds"
    publish(root, Location.of(url))
    env = {**server.env, **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}}
    env["STREAMTRAIN_TEST_FETCH_DELAY_S"] = "0.04"  # downloads take a while, as over a real network
    ref = subprocess.run(_fit_cmd(str(root), tmp_path / "ref", tmp_path / "c0"), env=env, capture_output=True,
                         text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.Popen(_fit_cmd(url, run, cache), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.stop()
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=120)
        ended_after_s = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
        server.start()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "unreachable" in lines[0], err
    assert ended_after_s < 60
    resumed = subprocess.run(_fit_cmd(url, run, cache, ["--resume"]), env=env, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _model_state(tmp_path / "ref"), _model_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupted_object_ends_fit_and_verify_naming_it(s3, local_ds, tmp_path, capsys):
    from streamtrain.storage import Location, publish, read_remote_index

    server, bucket = s3
    root, _ = local_ds
    url = f"{bucket}/ds"
    publish(root, Location.of(url))
    victim = read_remote_index(Location.of(url)).shards[3].file
    key = f"{bucket.split('://')[1]}/ds/{victim}"
    fs = server.filesystem()
    data = bytearray(fs.open_input_stream(key).read())
    data[len(data) // 2] ^= 0xFF
    with fs.open_output_stream(key) as out:
        out.write(bytes(data))
    code = main(["fit", *TINY, "--data", url, "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--cache-dir", str(tmp_path / "c")])
    _one_line_error(code, capsys.readouterr().err, f"{url}/{victim}", "checksum mismatch")
    code = main(["inspect", url, "--verify", "--cache-dir", str(tmp_path / "c")])
    captured = capsys.readouterr()
    _one_line_error(code, captured.err, victim)


def test_wrong_credentials_are_one_line_without_the_secret(s3, local_ds, tmp_path, capsys):
    from streamtrain.storage import Location, publish

    server, bucket = s3
    root, _ = local_ds
    publish(root, Location.of(f"{bucket}/ds"))
    secret = "not-the-secret-key-4f9c2a"
    code = main(["inspect", f"{bucket}/ds", "--cache-dir", str(tmp_path / "c"),
                 "--storage-option", f"access_key={server.env['AWS_ACCESS_KEY_ID']}",
                 "--storage-option", f"secret_key={secret}"])
    err = capsys.readouterr().err
    _one_line_error(code, err, f"{bucket}/ds/index.json")
    assert secret not in err


def test_credentials_never_reach_the_run_folder(s3, local_ds, tmp_path, capsys):
    from streamtrain.storage import Location, publish

    server, bucket = s3
    root, _ = local_ds
    publish(root, Location.of(f"{bucket}/ds"))
    secret = server.env["AWS_SECRET_ACCESS_KEY"]
    code = main(["fit", *TINY, "--data", f"{bucket}/ds", "--max-steps", "2", "--out", str(tmp_path / "r"),
                 "--cache-dir", str(tmp_path / "c"), "--storage-option", f"secret_key={secret}",
                 "--storage-option", f"access_key={server.env['AWS_ACCESS_KEY_ID']}"])
    assert code == 0, capsys.readouterr().err
    for path in (tmp_path / "r").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("name", ["../x.arrow", "/etc/passwd", "shards/../../x", "s3://other/x", "a\\b", ""])
def test_an_index_naming_a_file_outside_the_dataset_is_refused_before_any_read(local_ds, tmp_path, capsys, name):
    root, _ = local_ds
    index = json.loads((root / "index.json").read_text())
    index["shards"][0]["file"] = name
    (root / "index.json").write_text(json.dumps(index))
    code = main(["inspect", str(root)])
    _one_line_error(code, capsys.readouterr().err, "shards[0].file", "not a plain relative path")


def test_a_remote_index_naming_a_file_outside_the_dataset_writes_nothing_outside_the_cache(s3, local_ds, tmp_path, capsys):
    server, bucket = s3
    root, _ = local_ds
    index = json.loads((root / "index.json").read_text())
    index["lengths_file"] = "../../../escaped.npy"
    (root / "index.json").write_text(json.dumps(index))
    _upload_folder(server, root, f"{bucket}/ds")
    cache = tmp_path / "deep" / "cache"
    code = main(["inspect", f"{bucket}/ds", "--cache-dir", str(cache)])
    _one_line_error(code, capsys.readouterr().err, "lengths_file", "not a plain relative path")
    assert not list(tmp_path.rglob("escaped.npy"))


def test_a_publish_cut_short_leaves_the_previous_dataset_readable(s3, tmp_path, monkeypatch):
    from streamtrain.data import ShardStream
    from streamtrain.storage import Location, publish
    from streamtrain.storage import transfer

    server, bucket = s3
    url = f"{bucket}/ds"
    old, new = _seqs(200, seed=1), _seqs(200, seed=2)
    write_dataset(tmp_path / "old", old, shard_bytes=1500)
    write_dataset(tmp_path / "new", new, shard_bytes=1500)
    publish(tmp_path / "old", Location.of(url))
    sent = []
    real_put = transfer.put_file

    def failing_put(where, name, src):
        if len(sent) == 5:
            raise OSError("connection reset while uploading")
        sent.append(name)
        real_put(where, name, src)

    monkeypatch.setattr(transfer, "put_file", failing_put)
    with pytest.raises(OSError):
        publish(tmp_path / "new", Location.of(url))
    monkeypatch.setattr(transfer, "put_file", real_put)
    stream = ShardStream(url, max_tokens=256, cache_dir=tmp_path / "c")
    rows = {}
    for batch in stream:
        for j, i in enumerate(batch.ids.tolist()):
            rows[i] = batch.x[j, : int(batch.lengths[j])].numpy()
    assert len(rows) == len(old) and all(np.array_equal(rows[i], old[i]) for i in rows)  # the old data, whole
    publish(tmp_path / "new", Location.of(url))  # the rerun completes and then serves the new data
    stream = ShardStream(url, max_tokens=256, cache_dir=tmp_path / "c")
    first = next(iter(stream))
    i = int(first.ids[0])
    np.testing.assert_array_equal(first.x[0, : int(first.lengths[0])].numpy(), new[i][: int(first.lengths[0])])


def test_loader_workers_read_a_remote_dataset_exactly_once(s3, local_ds, tmp_path):
    from streamtrain.data import ShardStream, make_loader
    from streamtrain.storage import Location, publish

    server, bucket = s3
    root, seqs = local_ds
    publish(root, Location.of(f"{bucket}/ds"))
    stream = ShardStream(f"{bucket}/ds", max_tokens=256, window=2, cache_dir=tmp_path / "c", cache_limit="80KB")
    ids = [i for batch in make_loader(stream, num_workers=2) for i in batch.ids.tolist()]
    assert sorted(ids) == list(range(len(seqs)))


@pytest.mark.parametrize("threads", [1, 4])
def test_prefetch_overlaps_downloads_in_plan_order_and_fetches_each_shard_once(s3, local_ds, tmp_path, monkeypatch,
                                                                               threads):
    import streamtrain.storage.cache as cache_module
    from streamtrain.storage import Location, publish
    from streamtrain.storage.cache import ShardCache

    server, bucket = s3
    root, _ = local_ds
    where = Location.of(f"{bucket}/ds")
    publish(root, where)
    lock = threading.Lock()
    in_flight, most, started = [0], [0], []
    real_get_file = cache_module.get_file

    def get_file(where, name, *args, **kwargs):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            started.append(name)
        try:
            time.sleep(0.05)  # as over a network: long enough for the other threads to start theirs
            return real_get_file(where, name, *args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(cache_module, "get_file", get_file)
    cache = ShardCache(where, tmp_path / "c", prefetch_threads=threads)
    index = cache.sync()
    started.clear()  # the lengths file
    order = [s.file for s in index.shards][::-1]
    assert len(order) >= 8
    cache.publish(0, order, set())
    deadline = time.monotonic() + 60
    while not all(cache.path(s).is_file() for s in index.shards) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(cache.path(s).is_file() for s in index.shards)
    time.sleep(0.1)  # nothing more may start
    assert sorted(started) == sorted(order)  # each shard once
    assert most[0] == threads  # `threads` downloads at once, never more
    # taken in plan order: each download starts no earlier than `threads` - 1 places before its turn
    assert all(abs(order.index(name) - k) < threads for k, name in enumerate(started))

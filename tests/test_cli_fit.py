"""`streamtrain fit` and `streamtrain eval` from the command line: runs, run-folder contents, user errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_dataset

from streamtrain.cli import main

TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--ff", "64", "--num-workers", "0"]


def _fit(capsys, *argv):
    code = main(["fit", *TINY, *argv])
    return code, capsys.readouterr()


def _assert_one_line_error(code, captured, *fragments):
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("streamtrain ") and "error:" in lines[0]
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0]


def _sequences(n, dim=6, seed=0, max_len=30):
    rng = np.random.default_rng(seed)
    return [np.cumsum(rng.normal(size=(int(rng.integers(2, max_len)), dim)), axis=0).astype(np.float32) for _ in range(n)]


def _reference_eval(checkpoint_path, seqs, context):
    """MSE of the checkpoint's model and of the persistence and mean predictors over every target of `seqs`,
    in float64 numpy. The model runs on one window at a time: `context` vectors overlapping the previous
    window by one (window k starts at k * (context - 1)), encoded at their positions in the sequence."""
    import torch

    from streamtrain.model import ModelConfig
    from streamtrain.model.transformer import CausalTransformer
    from streamtrain.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint_path)
    model = CausalTransformer(ModelConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    mean = np.asarray(ckpt["stats"]["mean"], np.float64)
    std = np.asarray(ckpt["stats"]["std"], np.float64)
    std = np.where(std > 0, std, 1.0)
    data_mean = np.concatenate(seqs).astype(np.float64).mean(axis=0)
    sq = {"mse": [], "persistence_mse": [], "mean_mse": []}
    for s in seqs:
        s = s.astype(np.float64)
        sq["persistence_mse"].append((s[1:] - s[:-1]) ** 2)
        sq["mean_mse"].append((s[1:] - data_mean) ** 2)
        for start in range(0, len(s) - 1, context - 1):
            w = s[start : start + context]
            x = torch.from_numpy(((w - mean) / std).astype(np.float32))[None]
            with torch.no_grad():
                pred = model(x, torch.tensor([start]))[0].double().numpy()
            sq["mse"].append((pred[:-1] * std + mean - w[1:]) ** 2)
    ref = {key: float(np.concatenate(parts).mean()) for key, parts in sq.items()}
    ref["num_targets"] = len(np.concatenate(sq["mse"]))
    return ref


def test_synthetic_fit_writes_the_run_folder_then_eval_reports(tmp_path, capsys):
    run = tmp_path / "run"
    code, captured = _fit(capsys, "--synthetic", "41,24", "--out", str(run), "--max-steps", "12",
                          "--log-every", "4", "--val-fraction", "0.2", "--batch-tokens", "256")
    assert code == 0, captured.err
    assert "done: 12 steps" in captured.out and "run folder" in captured.out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["dim"] == 28 and config["data"]["synthetic"] == "41,24"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "real_tokens_per_s", "padded_tokens_per_s",
                "pad_fraction", "data_wait_fraction", "mfu", "elapsed_s", "peak_mem_mb"):
        assert key in records[0], key
    assert records[-1]["val_mse"] > 0
    assert (run / "checkpoints/last.pt").is_file() and (run / "checkpoints/best.pt").is_file()
    assert (run / "loss.png").is_file()

    code = main(["eval", "--checkpoint", str(run / "checkpoints/best.pt"), "--data", str(run / "synthetic"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"mse", "persistence_mse", "mean_mse", "skill_vs_persistence", "skill_vs_mean", "per_dim_mse",
            "num_sequences", "num_tokens", "num_targets"} <= set(report)
    assert report["num_sequences"] == 41 and report["num_tokens"] == 41 * 24 and report["num_targets"] == 41 * 23
    assert len(report["per_dim_mse"]) == 28
    from streamtrain.dataset.synthetic import synthetic_sequences

    ref = _reference_eval(run / "checkpoints/best.pt", list(synthetic_sequences(41, 24, dim=28, seed=0)), context=256)
    for key in ("mse", "persistence_mse", "mean_mse"):
        assert report[key] == pytest.approx(ref[key], rel=1e-5), key
    assert report["skill_vs_persistence"] == pytest.approx(1 - ref["mse"] / ref["persistence_mse"], rel=1e-5)
    assert report["skill_vs_mean"] == pytest.approx(1 - ref["mse"] / ref["mean_mse"], rel=1e-5)


def test_eval_baselines_match_a_numpy_reference(tmp_path, capsys):
    seqs = _sequences(23)
    seqs.append(np.zeros((1, 6), np.float32))  # a single vector has no target
    data = tmp_path / "data"
    index = write_dataset(data, seqs)
    run = tmp_path / "run"
    # a short training context windows the longest sequences at eval: every target must still count once
    assert _fit(capsys, "--data", str(data), "--out", str(run), "--max-steps", "2", "--batch-tokens", "64",
                "--max-len", "8")[0] == 0
    assert main(["eval", "--checkpoint", str(run / "checkpoints/last.pt"), "--data", str(data), "--json",
                 "--batch-tokens", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_len"] == 8
    persistence = np.concatenate([(s[1:].astype(np.float64) - s[:-1]) ** 2 for s in seqs])
    mean = np.concatenate([(s[1:].astype(np.float64) - index.mean) ** 2 for s in seqs])
    assert report["num_targets"] == len(persistence)
    assert report["num_sequences"] == 24 and report["num_tokens"] == sum(len(s) for s in seqs)
    assert report["persistence_mse"] == pytest.approx(persistence.mean(), rel=1e-9)
    assert report["mean_mse"] == pytest.approx(mean.mean(), rel=1e-9)
    assert report["mse"] == pytest.approx(_reference_eval(run / "checkpoints/last.pt", seqs, context=8)["mse"], rel=1e-7)


@pytest.mark.parametrize("train_flags, context", [(("--batch-tokens", "64", "--max-len", "20"), 20),
                                                   (("--batch-tokens", "32"), 32)], ids=["max-len", "batch-tokens"])
def test_eval_windows_at_the_training_context(tmp_path, capsys, train_flags, context):
    """A model trained on windows of `context` vectors is evaluated on windows of `context` vectors, whatever
    eval's --batch-tokens (raised, with a note, when one window does not fit), and agrees with the final
    validation of fit on the same data."""
    seqs = _sequences(19, max_len=80)
    data = tmp_path / "data"
    write_dataset(data, seqs)
    run = tmp_path / "run"
    code, captured = _fit(capsys, "--data", str(data), "--val-data", str(data), "--out", str(run),
                          "--max-steps", "3", *train_flags)
    assert code == 0, captured.err
    val_mse = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_mse"]
    ref = _reference_eval(run / "checkpoints/last.pt", seqs, context)
    assert max(len(s) for s in seqs) > 2 * context  # several windows per long sequence
    for batch_tokens in ("16", "4096"):
        code = main(["eval", "--checkpoint", str(run / "checkpoints/last.pt"), "--data", str(data), "--json",
                     "--batch-tokens", batch_tokens])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        report = json.loads(captured.out)
        assert report["max_len"] == context and report["num_targets"] == ref["num_targets"]
        assert report["mse"] == pytest.approx(ref["mse"], rel=1e-7)
        assert report["mse"] == pytest.approx(val_mse, rel=1e-7)
        raised = -(-context // 8) * 8
        if batch_tokens == "16":
            assert report["batch_tokens"] == raised
            assert f"--batch-tokens 16 raised to {raised}" in captured.err
        else:
            assert report["batch_tokens"] == 4096 and captured.err == ""


def test_eval_onehot_accuracy_matches_a_reference(tmp_path, capsys):
    import torch

    from streamtrain.data.batch import standardization
    from streamtrain.model import ModelConfig
    from streamtrain.model.transformer import CausalTransformer
    from streamtrain.train.checkpoint import load_checkpoint

    rng = np.random.default_rng(5)
    seqs = []
    for _ in range(29):
        T = int(rng.integers(2, 40))
        cls = rng.choice(3, size=T, p=[0.6, 0.3, 0.1])
        seq = np.zeros((T, 4), np.float32)
        seq[np.arange(T), cls] = 1.0  # fields 0:3 one-hot encode a class
        seq[:, 3] = rng.normal(size=T)
        seqs.append(seq)
    data = tmp_path / "data"
    write_dataset(data, seqs)
    run = tmp_path / "run"
    assert _fit(capsys, "--data", str(data), "--out", str(run), "--max-steps", "3")[0] == 0
    ckpt_path = run / "checkpoints/last.pt"
    assert main(["eval", "--checkpoint", str(ckpt_path), "--data", str(data), "--json", "--onehot", "0:3"]) == 0
    oh = json.loads(capsys.readouterr().out)["onehot"]

    ckpt = load_checkpoint(ckpt_path)
    model = CausalTransformer(ModelConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    mean, std = standardization(ckpt["stats"]["mean"], ckpt["stats"]["std"])
    frequent = int(np.argmax(mean[:3]))
    hits = np.zeros(3)
    targets = 0
    for s in seqs:  # one unpadded sequence at a time
        with torch.no_grad():
            pred = model(torch.from_numpy(((s - mean) / std).astype(np.float32))[None])[0].double().numpy()
        pred = pred * std + mean
        truth = s[1:, :3].argmax(1)
        hits += [(pred[:-1, :3].argmax(1) == truth).sum(), (s[:-1, :3].argmax(1) == truth).sum(), (truth == frequent).sum()]
        targets += len(truth)
    assert oh["fields"] == [0, 3]
    assert oh["accuracy"] == pytest.approx(hits[0] / targets)
    assert oh["previous_accuracy"] == pytest.approx(hits[1] / targets)
    assert oh["most_frequent_accuracy"] == pytest.approx(hits[2] / targets)
    assert frequent == 0 and 0.5 < oh["most_frequent_accuracy"] < 0.7

    code = main(["eval", "--checkpoint", str(ckpt_path), "--data", str(data), "--onehot", "2:9"])
    _assert_one_line_error(code, capsys.readouterr(), "--onehot 2:9")


def test_missing_data_is_one_line(tmp_path, capsys):
    _assert_one_line_error(*_fit(capsys, "--out", str(tmp_path / "r")), "--data")


def test_bad_synthetic_spec_is_one_line(tmp_path, capsys):
    _assert_one_line_error(*_fit(capsys, "--synthetic", "ten,5", "--out", str(tmp_path / "r")), "--synthetic")


def test_resume_without_checkpoint_is_one_line(tmp_path, capsys):
    _assert_one_line_error(*_fit(capsys, "--synthetic", "5,5", "--out", str(tmp_path / "r"), "--resume"), "--resume")


def test_bad_config_key_is_one_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[optim]\nlearning_rate = 0.1\n")
    code, captured = _fit(capsys, "--synthetic", "5,5", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "c.toml"))
    _assert_one_line_error(code, captured, "learning_rate")


def test_truncated_shard_is_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "data"
    index = write_dataset(data, _sequences(17), shard_bytes=1000)
    shard = data / index.shards[1].file
    shard.write_bytes(shard.read_bytes()[:-100])
    _assert_one_line_error(*_fit(capsys, "--data", str(data), "--out", str(tmp_path / "r")), shard.name)


def test_checksum_mismatch_with_verify_is_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "data"
    index = write_dataset(data, _sequences(17), shard_bytes=1000)
    shard = data / index.shards[0].file
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    _assert_one_line_error(*_fit(capsys, "--data", str(data), "--out", str(tmp_path / "r"), "--verify"), shard.name, "checksum")


def _flip_middle_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(raw)


def test_fit_refuses_flipped_bytes_by_default_and_no_verify_trains_on_them(tmp_path, capsys):
    data = tmp_path / "data"
    index = write_dataset(data, _sequences(17), shard_bytes=1000)
    shard = data / index.shards[1].file
    _flip_middle_byte(shard)
    code, captured = _fit(capsys, "--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "2")
    _assert_one_line_error(code, captured, str(shard), "checksum mismatch")
    assert not (tmp_path / "r" / "checkpoints").exists()
    code, captured = _fit(capsys, "--data", str(data), "--out", str(tmp_path / "r2"), "--max-steps", "2", "--no-verify")
    assert code == 0, captured.err


def test_fit_refuses_a_shard_changed_after_a_verified_run(tmp_path, capsys):
    data = tmp_path / "data"
    index = write_dataset(data, _sequences(17), shard_bytes=1000)
    assert _fit(capsys, "--data", str(data), "--out", str(tmp_path / "r1"), "--max-steps", "2")[0] == 0
    shard = data / index.shards[0].file
    _flip_middle_byte(shard)
    code, captured = _fit(capsys, "--data", str(data), "--out", str(tmp_path / "r2"), "--max-steps", "2",
                          "--num-workers", "2")
    _assert_one_line_error(code, captured, str(shard), "checksum mismatch")


def test_eval_refuses_flipped_bytes_by_default_and_no_verify_evaluates(tmp_path, capsys):
    data = tmp_path / "data"
    index = write_dataset(data, _sequences(17), shard_bytes=1000)
    run = tmp_path / "run"
    assert _fit(capsys, "--data", str(data), "--out", str(run), "--max-steps", "2")[0] == 0
    shard = data / index.shards[2].file
    _flip_middle_byte(shard)
    argv = ["eval", "--checkpoint", str(run / "checkpoints/last.pt"), "--data", str(data), "--json"]
    for workers in ("0", "2"):
        code = main([*argv, "--num-workers", workers])
        _assert_one_line_error(code, capsys.readouterr(), str(shard), "checksum mismatch")
    assert main([*argv, "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["num_sequences"] == 17


def test_max_len_over_the_batch_budget_is_one_line_naming_the_flags(tmp_path, capsys):
    code, captured = _fit(capsys, "--synthetic", "9,8", "--out", str(tmp_path / "r"), "--max-len", "9000")
    _assert_one_line_error(code, captured, "--max-len 9000", "--batch-tokens 4096")
    assert "max_len=" not in captured.err and "pad_multiple" not in captured.err


def test_an_existing_run_needs_resume(tmp_path, capsys):
    run = tmp_path / "r"
    assert _fit(capsys, "--synthetic", "9,8", "--out", str(run), "--max-steps", "1")[0] == 0
    _assert_one_line_error(*_fit(capsys, "--synthetic", "9,8", "--out", str(run)), "--resume")


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code = main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)])
    _assert_one_line_error(code, capsys.readouterr())


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtrain", "fit", *TINY, "--synthetic", "50,64", "--out", str(run),
         "--max-steps", "100000", "--log-every", "1", "--save-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "--resume" in err
    from streamtrain.train.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoints/last.pt")["step"] >= 1


def test_fit_on_a_raw_json_folder_converts_once_into_a_cache(tmp_path, capsys):
    from streamtrain.dataset import read_index

    raw = tmp_path / "raw"
    raw.mkdir()
    seqs = _sequences(15)
    (raw / "a.jsonl").write_text("".join(json.dumps(s.tolist()) + "\n" for s in seqs[:10]))
    (raw / "b.json").write_text(json.dumps({"sequence": seqs[10].tolist()}))
    code, captured = _fit(capsys, "--data", str(raw), "--out", str(tmp_path / "r1"), "--max-steps", "2")
    assert code == 0, captured.err
    caches = list((tmp_path / ".streamtrain-cache").iterdir())
    assert len(caches) == 1 and read_index(caches[0]).num_sequences == 11
    shards = lambda: {p.name: p.stat().st_mtime_ns for p in (caches[0] / "shards").iterdir()}  # noqa: E731
    before = shards()

    # unchanged inputs: the same cache, its shards reused as they are (nothing parsed again)
    assert _fit(capsys, "--data", str(raw), "--out", str(tmp_path / "r2"), "--max-steps", "2")[0] == 0
    assert shards() == before

    # a new file: converted into the same cache
    (raw / "c.jsonl").write_text("".join(json.dumps(s.tolist()) + "\n" for s in seqs[11:]))
    assert _fit(capsys, "--data", str(raw), "--out", str(tmp_path / "r3"), "--max-steps", "2")[0] == 0
    assert list((tmp_path / ".streamtrain-cache").iterdir()) == caches
    assert read_index(caches[0]).num_sequences == 15

    # a bad record: one line naming --data, the file and the line
    (raw / "d.jsonl").write_text("[[1, 2]]\n")
    code, captured = _fit(capsys, "--data", str(raw), "--out", str(tmp_path / "r4"), "--max-steps", "2")
    _assert_one_line_error(code, captured, f"--data {raw}", "d.jsonl:1")


def _float_flags():
    from test_train_config import FLOAT_FIELDS

    return ["--" + name.replace("_", "-") for _, name in FLOAT_FIELDS]


@pytest.mark.parametrize("flag", _float_flags())
def test_a_nan_float_flag_is_one_line_naming_it(tmp_path, capsys, flag):
    code, captured = _fit(capsys, "--synthetic", "5,5", "--out", str(tmp_path / "r"), flag, "nan")
    _assert_one_line_error(code, captured, flag, "finite")
    assert not (tmp_path / "r").exists()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """make(size_bytes) -> (folder, how): a real tmpfs of that size (needs root, as CI runs), unmounted after
    the test; where mounting is refused, a plain folder where every checkpoint save after the first fails
    with ENOSPC half-way through (how says which; the fallback also warns, so it never passes silently)."""
    import errno
    import shutil
    import warnings

    mounted = []

    def make(size_bytes):
        folder = tmp_path / "disk"
        folder.mkdir()
        mount = shutil.which("mount")
        result = None
        if mount is not None:
            result = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                                    capture_output=True, text=True)
        if result is not None and result.returncode == 0:
            mounted.append(folder)
            print(f"full disk: a {size_bytes}-byte tmpfs at {folder}")
            return folder, "tmpfs"
        reason = "no mount command" if result is None else (result.stderr.strip() or f"exit {result.returncode}")
        warnings.warn(f"cannot mount a tmpfs ({reason}): ENOSPC is injected into checkpoint saves instead")
        import torch

        real_save, calls = torch.save, []

        def save_on_a_full_disk(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                return real_save(obj, f, *args, **kwargs)
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", save_on_a_full_disk)
        return folder, "injected ENOSPC"

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, small_disk):
    from streamtrain.train.checkpoint import load_checkpoint

    data = tmp_path / "data"
    write_dataset(data, _sequences(23))
    common = ["--data", str(data), "--batch-tokens", "64", "--save-every", "2", "--quiet"]
    # a run folder on a disk that holds one checkpoint and a half (a save writes the new one next to the old)
    assert _fit(capsys, *common, "--out", str(tmp_path / "probe"), "--max-steps", "1")[0] == 0
    checkpoint_bytes = (tmp_path / "probe/checkpoints/last.pt").stat().st_size
    folder, how = small_disk(int(1.5 * checkpoint_bytes) + 64 * 1024)
    run = folder / "run"
    code, captured = _fit(capsys, *common, "--out", str(run), "--max-steps", "6")
    print(f"full disk simulated by: {how}")
    last = run / "checkpoints/last.pt"
    _assert_one_line_error(code, captured, str(last), "the disk is full", "the previous last.pt is intact", "--resume")
    assert load_checkpoint(last)["step"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]  # the cut save left nothing

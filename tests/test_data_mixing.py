"""Several sources mixed by weight: each epoch's token shares, up- and down-sampling, resume, ranks, and
`fit --data A --data B --weights`."""

import json

import numpy as np
import pytest
from conftest import write_dataset

from streamtrain.data import ShardStream, make_loader
from streamtrain.errors import UserError

DIM = 4


def _seqs(n, low, high, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(low, high)), DIM)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A: 600 short sequences in many shards; B: 150 longer ones. Each sequence's first vector, to find
    where a row came from."""
    base = tmp_path_factory.mktemp("mix")
    a, b = _seqs(600, 2, 20, seed=1), _seqs(150, 10, 60, seed=2)
    write_dataset(base / "a", a, shard_bytes=2000)
    write_dataset(base / "b", b, shard_bytes=3000)
    return base / "a", base / "b", a, b


def _epoch_rows(stream, epoch=0):
    """(global ids, real tokens) of every row of one epoch of `stream`, in order."""
    stream.set_epoch(epoch)
    ids, tokens = [], []
    for batch in stream:
        ids.extend(batch.ids.tolist())
        tokens.extend(batch.lengths.tolist())
    return np.asarray(ids), np.asarray(tokens)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.2, 0.8), (0.5, 0.5)])
def test_token_shares_per_source_are_within_one_percent_of_the_weights(sources, weights):
    a, b, seqs_a, _ = sources
    stream = ShardStream([(a, weights[0]), (b, weights[1])], max_tokens=256, seed=3)
    for epoch in (0, 1):
        ids, tokens = _epoch_rows(stream, epoch)
        from_a = ids < len(seqs_a)
        share_a = tokens[from_a].sum() / tokens.sum()
        assert abs(share_a - weights[0] / sum(weights)) < 0.01, (epoch, share_a)


def test_an_up_sampled_source_repeats_whole_passes_and_a_down_sampled_one_is_subsampled(sources):
    a, b, seqs_a, seqs_b = sources
    tokens_a = sum(len(s) for s in seqs_a)
    tokens_b = sum(len(s) for s in seqs_b)
    # B weighted to 3x its own tokens' share: each epoch holds B twice (at least) and A in part
    total = tokens_a + tokens_b
    w_b = min(0.9, 2.5 * tokens_b / total)
    stream = ShardStream([(a, 1 - w_b), (b, w_b)], max_tokens=256, seed=4)
    ids, tokens = _epoch_rows(stream)
    n_a = len(seqs_a)
    b_counts = np.bincount(ids[ids >= n_a] - n_a, minlength=len(seqs_b))
    a_counts = np.bincount(ids[ids < n_a], minlength=n_a)
    assert b_counts.min() >= 2  # two whole passes, then a part of a third
    assert b_counts.max() <= 3
    assert a_counts.max() == 1 and (a_counts == 0).any()  # down-sampled: some left out, none repeated
    assert abs(tokens.sum() - total) / total < 0.01  # an epoch holds as many tokens as both sources


def test_mixed_rows_are_the_sources_rows_bit_exact(sources):
    a, b, seqs_a, seqs_b = sources
    stream = ShardStream([(a, 1.0), (b, 1.0)], max_tokens=256, seed=5)
    stream.set_epoch(0)
    seen = 0
    for batch in stream:
        for j, i in enumerate(batch.ids.tolist()):
            ref = seqs_a[i] if i < len(seqs_a) else seqs_b[i - len(seqs_a)]
            n = int(batch.lengths[j])
            o = int(batch.offsets[j])
            np.testing.assert_array_equal(batch.x[j, :n].numpy(), ref[o : o + n])
            assert not batch.x[j, n:].any()
            seen += 1
    assert seen > 0


def test_mixing_resumes_exactly_and_deals_equal_batches_to_ranks(sources):
    a, b, _, _ = sources
    spec = [(a, 0.6), (b, 0.4)]
    full = [tuple(x.ids.tolist()) for x in make_loader(ShardStream(spec, max_tokens=256, seed=6), num_workers=0)]
    loader = make_loader(ShardStream(spec, max_tokens=256, seed=6), num_workers=0)
    head = []
    for batch in loader:
        head.append(tuple(batch.ids.tolist()))
        if len(head) == 7:
            break
    resumed = make_loader(ShardStream(spec, max_tokens=256, seed=6), num_workers=2)
    resumed.load_state_dict(loader.state_dict())
    assert head + [tuple(x.ids.tolist()) for x in resumed] == full
    counts = {len(ShardStream(spec, max_tokens=256, seed=6, rank=r, world_size=3)) for r in range(3)}
    assert len(counts) == 1


def test_a_stream_of_one_source_in_a_list_is_the_folder_stream(sources):
    a, _, _, _ = sources
    one = [tuple(x.ids.tolist()) for x in ShardStream(a, max_tokens=256, seed=7)]
    listed = [tuple(x.ids.tolist()) for x in ShardStream([(a, 2.0)], max_tokens=256, seed=7)]
    assert one == listed


def test_bad_mixes_are_user_errors(sources, tmp_path):
    a, b, _, _ = sources
    with pytest.raises(UserError, match="weight"):
        ShardStream([(a, 1.0), (b, 0.0)], max_tokens=256)
    write_dataset(tmp_path / "wide", [np.zeros((3, DIM + 1), np.float32)])
    with pytest.raises(UserError, match="one width"):
        ShardStream([(a, 1.0), (tmp_path / "wide", 1.0)], max_tokens=256)
    with pytest.raises(UserError, match="one dataset"):
        ShardStream([(a, 1.0), (b, 1.0)], max_tokens=256, ids=np.arange(3))


def test_fit_mixes_two_data_flags_by_weights_and_records_them(sources, tmp_path, capsys):
    from streamtrain.cli import main

    a, b, seqs_a, seqs_b = sources
    tiny = ["--d-model", "16", "--layers", "1", "--heads", "2", "--ff", "32", "--num-workers", "0"]
    code = main(["fit", *tiny, "--data", str(a), "--data", str(b), "--weights", "0.7,0.3", "--max-steps", "3",
                 "--batch-tokens", "256", "--out", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert code == 0, out.err
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["data"] == [str(a), str(b)] and cfg["data"]["weights"] == "0.7,0.3"
    # the standardization is the mix's: token-weighted moments of the two sources
    from streamtrain.train.checkpoint import load_checkpoint

    stats = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["stats"]
    va, vb = np.concatenate(seqs_a).astype(np.float64), np.concatenate(seqs_b).astype(np.float64)
    mean = 0.7 * va.mean(0) + 0.3 * vb.mean(0)
    second = 0.7 * (va ** 2).mean(0) + 0.3 * (vb ** 2).mean(0)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], np.sqrt(second - mean ** 2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra, fragment", [
    (["--weights", "0.7"], "1 weights for 2"),
    (["--weights", "0.7,x"], "comma-separated"),
    (["--weights", "0.7,-1"], "> 0"),
    (["--val-fraction", "0.1"], "--val-data"),
])
def test_bad_mixing_flags_are_one_line(sources, tmp_path, capsys, extra, fragment):
    from streamtrain.cli import main

    a, b, _, _ = sources
    code = main(["fit", "--data", str(a), "--data", str(b), *extra, "--max-steps", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err

"""tools/asm_corpus/split.py and --test-split: whole binaries to train / val / test, seeded, disjoint."""

from __future__ import annotations

import json

import pytest
from asm_corpus_support import (
    SMALL_BINARIES,
    ac,
    digest,
    needs_corpus,
    read_records,
    tree_bytes,
)

from tools.asm_corpus.split import SplitAssigner, holdout_targets


@pytest.mark.parametrize(
    "n_binaries,val_fraction,test_fraction,expected",
    [
        (1, 0.2, 0.2, (0, 0)),  # a lone binary trains
        (2, 0.2, 0.2, (0, 1)),  # room for one held-out binary: test first
        (3, 0.2, 0.2, (1, 1)),
        (8, 0.2, 0.2, (2, 2)),  # round(1.6)
        (7, 0.2, 0.2, (1, 1)),  # round(1.4)
        (10, 0.1, 0.3, (1, 3)),
        (4, 0.5, 0.0, (2, 0)),  # no test split: val as before, round(2.0)
        (3, 0.5, 0.0, (2, 0)),  # round(1.5) = 2, leaving one for train
        (5, 0.0, 0.0, (0, 0)),
    ],
)
def test_holdout_targets_hand_computed(n_binaries, val_fraction, test_fraction, expected):
    assert holdout_targets(n_binaries, val_fraction, test_fraction) == expected


def test_assigner_follows_the_targets_one_binary_at_a_time():
    assigner = SplitAssigner(0.2, 0.2)
    got = [assigner.next() for _ in range(10)]
    # Worked out from the targets: test at n = 2 and 8, val at n = 3 and 9.
    assert got == ["train", "test", "val", "train", "train", "train", "train", "test", "val", "train"]
    assert assigner.counts == {"train": 6, "val": 2, "test": 2}


def test_assigner_without_test_split_keeps_the_val_only_assignment():
    # The rule corpora were built with before --test-split: val gets round(n * F) of the first n, >= 1 from n = 2.
    assigner = SplitAssigner(0.5, 0.0)
    assert [assigner.next() for _ in range(6)] == ["train", "val", "val", "train", "val", "train"]


@pytest.mark.parametrize("val_fraction,test_fraction", [(0.1, 0.1), (0.3, 0.2), (0.0, 0.4), (0.45, 0.45)])
def test_assigner_counts_stay_near_their_fractions(val_fraction, test_fraction):
    assigner = SplitAssigner(val_fraction, test_fraction)
    for n in range(1, 501):
        assigner.next()
        counts = assigner.counts
        assert counts["train"] >= 1
        assert abs(counts["val"] - n * val_fraction) <= 1.5
        assert abs(counts["test"] - n * test_fraction) <= 1.5
        if n >= 3:
            assert (counts["val"] > 0) == (val_fraction > 0) and (counts["test"] > 0) == (test_fraction > 0)


def _split_digests(root) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for key, sequences in read_records(root).items():
        result[key.split("/")[0]].update(digest(s) for s in sequences)
    return result


@needs_corpus
def test_test_split_holds_out_whole_binaries_disjoint_from_train_and_val(tmp_path):
    manifest = ac.build_corpus(
        tmp_path / "c", max_mb=5, seed=3, binaries=SMALL_BINARIES, split=0.25, test_split=0.25, jobs=1
    )
    folders = {name: {p.name for p in (tmp_path / "c" / name).iterdir()} for name in ("train", "val", "test")}
    assert all(folders.values()), folders
    assert not folders["train"] & folders["val"] and not folders["train"] & folders["test"]
    assert not folders["val"] & folders["test"]
    for name, binaries in folders.items():
        assert binaries == set(manifest["split"][name])
        assert all(b["split"] == name for b in manifest["binaries"] if b["name"] in binaries)
    n_binaries = manifest["totals"]["binaries"]
    assert sum(len(b) for b in folders.values()) == n_binaries >= 4
    assert abs(len(folders["test"]) - 0.25 * n_binaries) <= 1
    assert abs(len(folders["val"]) - 0.25 * n_binaries) <= 1
    assert manifest["split"]["val_fraction"] == 0.25 and manifest["split"]["test_fraction"] == 0.25
    assert json.loads((tmp_path / "c" / ".manifest.json").read_text())["split"] == manifest["split"]
    # No function in two splits (de-duplication is corpus-wide).
    digests = _split_digests(tmp_path / "c")
    assert all(digests.values())
    assert not digests["train"] & digests["test"] and not digests["val"] & digests["test"]
    assert not digests["train"] & digests["val"]


@needs_corpus
def test_test_split_is_deterministic(tmp_path):
    binaries = SMALL_BINARIES[2:]
    kwargs = dict(max_mb=5, seed=4, split=0.2, test_split=0.3)
    first = ac.build_corpus(tmp_path / "a", binaries=binaries, jobs=1, **kwargs)
    second = ac.build_corpus(tmp_path / "b", binaries=list(reversed(binaries)), jobs=2, **kwargs)
    assert first["split"] == second["split"] and first["split"]["test"]
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


@needs_corpus
def test_rebuilding_removes_a_previous_test_split(tmp_path):
    ac.build_corpus(tmp_path / "c", max_mb=5, seed=0, binaries=SMALL_BINARIES[2:], split=0.2, test_split=0.3, jobs=1)
    assert (tmp_path / "c" / "test").is_dir()
    manifest = ac.build_corpus(tmp_path / "c", max_mb=5, seed=0, binaries=SMALL_BINARIES[2:], split=0.2, jobs=1)
    assert not (tmp_path / "c" / "test").exists() and manifest["split"]["test"] == []

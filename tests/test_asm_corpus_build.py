"""tools/asm_corpus/build.py and write.py: corpus layout, formats, determinism, de-duplication, split, budget.

The corpora are tiny and built from small coreutils binaries, so the file runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from asm_corpus_support import (
    SMALL_BINARIES,
    ac,
    digest,
    needs_corpus,
    needs_objdump,
    read_records,
    tree_bytes,
)

from tools.asm_corpus.build import length_quantiles


@needs_corpus
@pytest.mark.parametrize("fmt", ac.FORMATS)
def test_every_format_parses(tmp_path, fmt):
    manifest = ac.build_corpus(tmp_path / "c", max_mb=0.3, seed=1, fmt=fmt, binaries=SMALL_BINARIES[:3], jobs=1)
    records = read_records(tmp_path / "c")
    assert records and all(key.startswith("train/") for key in records)
    assert sum(len(v) for v in records.values()) == manifest["totals"]["functions"]
    suffixes = {p.suffix for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != ".manifest.json"}
    assert suffixes == {"json": {".json"}, "object": {".json"}, "jsonl": {".jsonl"}, "mixed": {".json", ".jsonl"}}[fmt]
    stored = json.loads((tmp_path / "c" / ".manifest.json").read_text())
    assert stored == manifest
    assert stored["field_names"] == list(ac.FIELD_NAMES)
    # Compact numbers: one-hot zeros/ones are written as ints.
    sample = next(p for p in (tmp_path / "c").rglob("*.json*") if p.name != ".manifest.json").read_text()
    assert "0.0," not in sample and "1.0," not in sample


@needs_corpus
def test_manifest_is_hidden_beside_record_folders_only(tmp_path):
    # `streamtrain convert DIR` skips hidden files: everything else it sees must be a record file.
    manifest = ac.build_corpus(tmp_path / "c", max_mb=5, seed=0, binaries=SMALL_BINARIES[2:4], split=0.5, jobs=1)
    top = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert top == [".manifest.json", "train", "val"]
    assert json.loads((tmp_path / "c" / ".manifest.json").read_text()) == manifest
    visible = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert visible and all(p.suffix in (".json", ".jsonl") for p in visible)
    assert sum(len(v) for v in read_records(tmp_path / "c").values()) == manifest["totals"]["functions"]


@needs_corpus
def test_replaces_a_corpus_with_the_old_manifest_name(tmp_path):
    # Corpora written before the manifest was hidden have DIR/manifest.json.
    out = tmp_path / "c"
    (out / "train" / "old").mkdir(parents=True)
    (out / "train" / "old" / "part-00000.jsonl").write_text("[[0],[1]]\n")
    (out / "manifest.json").write_text('{"tool": "tools/asm_corpus.py"}\n')
    ac.build_corpus(out, max_mb=0.2, seed=0, binaries=SMALL_BINARIES[:2], jobs=1)
    assert not (out / "manifest.json").exists() and not (out / "train" / "old").exists()
    assert json.loads((out / ".manifest.json").read_text())["tool"] == "tools/asm_corpus"
    assert read_records(out)


@needs_corpus
def test_whole_corpus_folder_converts_with_default_flags(tmp_path, capsys):
    from streamtrain.cli import main as streamtrain_main

    manifest = ac.build_corpus(tmp_path / "c", max_mb=5, seed=0, binaries=SMALL_BINARIES[2:4], split=0.5, jobs=1)
    assert streamtrain_main(["convert", str(tmp_path / "c"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    capsys.readouterr()
    assert streamtrain_main(["inspect", str(tmp_path / "ds"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_sequences"] == manifest["totals"]["functions"]
    assert summary["num_tokens"] == manifest["totals"]["instructions"]


@needs_corpus
def test_mixed_format_mixes_record_kinds(tmp_path):
    ac.build_corpus(tmp_path / "c", max_mb=1, seed=0, fmt="mixed", binaries=SMALL_BINARIES, jobs=1)
    kinds = set()
    for path in (tmp_path / "c").rglob("*.json*"):
        if path.name == ".manifest.json":
            continue
        for line in path.read_text().splitlines():
            kinds.add((path.suffix, line.startswith("{")))
    assert (".jsonl", True) in kinds and (".jsonl", False) in kinds


@needs_corpus
def test_build_is_deterministic(tmp_path):
    binaries = SMALL_BINARIES[:2]
    first = ac.build_corpus(tmp_path / "a", max_mb=0.2, seed=7, binaries=binaries, jobs=1)
    ac.build_corpus(tmp_path / "b", max_mb=0.2, seed=7, binaries=list(reversed(binaries)), jobs=2)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert first["totals"]["functions"] > 10
    # Rebuilding into an existing corpus folder replaces it, same bytes again.
    ac.build_corpus(tmp_path / "a", max_mb=0.2, seed=7, binaries=binaries, jobs=1)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    # Another seed may choose differently, but the result is still well formed.
    other = ac.build_corpus(tmp_path / "c", max_mb=0.2, seed=8, binaries=binaries, jobs=1)
    assert other["seed"] == 8 and read_records(tmp_path / "c")


@needs_corpus
def test_functions_are_deduplicated(tmp_path):
    # A byte-for-byte copy of a binary shares all its functions (true and false, if present, share most).
    copy = tmp_path / "copy_of_first"
    shutil.copyfile(SMALL_BINARIES[0], copy)
    binaries = [*SMALL_BINARIES, str(copy)]
    manifest = ac.build_corpus(tmp_path / "c", max_mb=5, seed=0, fmt="jsonl", binaries=binaries, jobs=1)
    digests = [digest(s) for seqs in read_records(tmp_path / "c").values() for s in seqs]
    assert len(digests) == len(set(digests)) == manifest["totals"]["functions"]
    assert manifest["totals"]["duplicates_dropped"] > 0
    # Whichever of the two came second in the seeded order added nothing.
    pair = {os.path.basename(SMALL_BINARIES[0]), copy.name}
    assert len(pair & set(manifest["binaries_without_new_functions"])) == 1


@needs_corpus
def test_split_assigns_whole_binaries(tmp_path):
    manifest = ac.build_corpus(tmp_path / "c", max_mb=5, seed=3, binaries=SMALL_BINARIES, split=0.5, jobs=2)
    train = {p.name for p in (tmp_path / "c" / "train").iterdir()}
    val = {p.name for p in (tmp_path / "c" / "val").iterdir()}
    assert train and val and not train & val
    assert train == set(manifest["split"]["train"]) and val == set(manifest["split"]["val"])
    assert abs(len(val) - 0.5 * (len(train) + len(val))) <= 1
    records = read_records(tmp_path / "c")
    train_digests = {digest(s) for k, seqs in records.items() if k.startswith("train/") for s in seqs}
    val_digests = {digest(s) for k, seqs in records.items() if k.startswith("val/") for s in seqs}
    assert train_digests and val_digests and not train_digests & val_digests


@needs_corpus
def test_max_mb_stops_near_budget_from_default_dirs(tmp_path):
    max_mb = 0.4
    manifest = ac.build_corpus(tmp_path / "c", max_mb=max_mb, seed=0, fmt="jsonl")
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != ".manifest.json"]
    written = sum(p.stat().st_size for p in files)
    assert written == manifest["totals"]["bytes"]
    longest = max(len(line) + 1 for p in files for line in p.read_text().splitlines())
    assert max_mb * 1e6 <= written < max_mb * 1e6 + longest
    assert all(ac.is_x86_64_elf(b["path"]) for b in manifest["binaries"])
    quantiles = manifest["length_quantiles"]
    assert 2 <= quantiles["min"] <= quantiles["p50"] <= quantiles["p99"] <= quantiles["max"]


@needs_corpus
@needs_objdump
def test_build_with_objdump_fallback(tmp_path):
    manifest = ac.build_corpus(
        tmp_path / "c", max_mb=0.2, seed=0, binaries=SMALL_BINARIES[:2], decoder="objdump", jobs=1
    )
    assert manifest["decoder"] == "objdump"
    assert read_records(tmp_path / "c")


@pytest.mark.parametrize(
    "lengths,expected",
    [
        # The sorted element at index min(n - 1, floor(q * n)), worked out by hand.
        (range(1, 11), {"min": 1, "p50": 6, "p90": 10, "p99": 10, "max": 10, "mean": 5.5}),
        ([5, 1, 3], {"min": 1, "p50": 3, "p90": 5, "p99": 5, "max": 5, "mean": 3.0}),
        (range(1, 101), {"min": 1, "p50": 51, "p90": 91, "p99": 100, "max": 100, "mean": 50.5}),
        ([7, 2], {"min": 2, "p50": 7, "p90": 7, "p99": 7, "max": 7, "mean": 4.5}),
        ([], {}),
    ],
)
def test_length_quantiles_hand_computed(lengths, expected):
    got = length_quantiles(list(lengths))
    assert got == expected
    assert list(got) == list(expected)  # the manifest's key order
    assert all(type(v) is int for k, v in got.items() if k != "mean")

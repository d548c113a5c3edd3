"""convert's reuse manifest when it is damaged, and checks that must hold under `python -O`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamtrain import convert as cv
from streamtrain import dataset


def _corpus(src: Path) -> None:
    rng = np.random.default_rng(41)
    src.mkdir()
    for f in range(6):
        lines = [json.dumps(np.round(rng.standard_normal((int(rng.integers(2, 9)), 3)), 5).tolist()) for _ in range(40)]
        lines[f * 5] = "[[1, 2, 3], [4, 5]]"  # one reject per file
        (src / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")


def _content(out: Path):
    """A dataset's content, whatever its file names: shard checksums, lengths, statistics, counts, rejects."""
    index = dataset.read_index(out)
    return ([s.sha256 for s in index.shards], index.lengths().tobytes(), index.mean.tobytes(), index.std.tobytes(),
            index.num_rejected, index.extra["num_records"], (out / "rejects.jsonl").read_bytes())


def _set(obj, key, value):
    obj[key] = value


# name -> (damage(manifest, g): the manifest to write, where g is a group entry that has a shard and a reject;
#          groups rebuilt afterwards: "one" (that group), "two", "all", or None when reusing is right)
DAMAGES = {
    "entry_missing_stats": (lambda m, g: g.pop("stats") and m, "one"),
    "entry_missing_key": (lambda m, g: g.pop("key") and m, "one"),
    "entry_missing_rejects": (lambda m, g: g.pop("rejects") and m, "one"),
    "stats_wrong_dim": (lambda m, g: _set(g["stats"], "mean", [0.0, 0.0]) or m, "one"),
    "stats_count_is_text": (lambda m, g: _set(g["stats"], "count", "12") or m, "one"),
    "stats_mean_null": (lambda m, g: _set(g["stats"]["mean"], 0, None) or m, "one"),
    "stats_m2_negative": (lambda m, g: _set(g["stats"]["m2"], 0, -1.0) or m, "one"),
    "stats_count_disagrees": (lambda m, g: _set(g["stats"], "count", g["stats"]["count"] + 1) or m, "one"),
    "num_records_is_text": (lambda m, g: _set(g, "num_records", str(g["num_records"])) or m, "one"),
    "num_records_disagrees": (lambda m, g: _set(g, "num_records", g["num_records"] + 1) or m, "one"),
    "reject_is_text": (lambda m, g: _set(g, "rejects", ["part-1.jsonl:6: bad"]) or m, "one"),
    "reject_line_is_text": (lambda m, g: _set(g["rejects"][0], 1, str(g["rejects"][0][1])) or m, "one"),
    "reject_too_short": (lambda m, g: _set(g["rejects"], 0, g["rejects"][0][:2]) or m, "one"),
    "shard_is_a_number": (lambda m, g: _set(g, "shard", 3) or m, "one"),
    "sha256_missing": (lambda m, g: g.pop("sha256") and m, "one"),
    "entry_is_a_list": (lambda m, g: _set(m["groups"], m["groups"].index(g), [1, 2]) or m, "one"),
    "entry_is_null": (lambda m, g: _set(m["groups"], m["groups"].index(g), None) or m, "one"),
    "shard_claimed_twice": (lambda m, g: _set(m["groups"][m["groups"].index(g) + 1], "shard", g["shard"]) or _set(
        m["groups"][m["groups"].index(g) + 1], "sha256", g["sha256"]) or m, "two"),
    "groups_is_an_object": (lambda m, g: _set(m, "groups", {"0": g}) or m, "all"),
    "settings_missing": (lambda m, g: m.pop("settings") and m, "all"),
    "settings_dim_is_text": (lambda m, g: _set(m["settings"], "dim", "3") or m, "all"),
    "settings_dim_is_true": (lambda m, g: _set(m["settings"], "dim", True) or m, "all"),
    "settings_dim_differs": (lambda m, g: _set(m["settings"], "dim", 4) or m, "all"),
    "dim_prefix_is_a_number": (lambda m, g: _set(m, "dim_prefix", 7) or m, None),
    "dim_prefix_missing": (lambda m, g: m.pop("dim_prefix") and m, None),
    "manifest_is_a_list": (lambda m, g: [m], "all"),
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_damaged_manifest_rebuilds_what_it_cannot_vouch_for(tmp_path, name):
    damage, rebuilt = DAMAGES[name]
    src, out = tmp_path / "src", tmp_path / "out"
    _corpus(src)
    first = cv.convert([src], out, workers=1, on_error="skip", shard_mb=0.004)
    assert first.groups_built >= 4 and first.num_rejected == 6
    manifest_path = out / dataset.read_index(out).extra["convert"]["manifest"]
    manifest = json.loads(manifest_path.read_text())
    target = next(g for g in manifest["groups"][:-1] if g["shard"] and g["rejects"])
    manifest_path.write_text(json.dumps(damage(manifest, target)))

    again = cv.convert([src], out, workers=1, on_error="skip", shard_mb=0.004)
    if rebuilt is not None:
        assert again.groups_built == {"one": 1, "two": 2, "all": first.groups_built}[rebuilt]
    cv.convert([src], tmp_path / "fresh", workers=1, on_error="skip", shard_mb=0.004, force=True)
    assert _content(out) == _content(tmp_path / "fresh")
    assert dataset.verify_dataset(dataset.read_index(out)) == []
    # The manifest written by that run is whole again: everything is reused next time.
    assert cv.convert([src], out, workers=1, on_error="skip", shard_mb=0.004).groups_built == 0


_MISMATCH = """
import numpy as np
from streamtrain import dataset as F
try:
    F.sequences_to_table(np.zeros((5, 2), np.float32), np.array([2, 2]), ["a", "b"], np.array([1, 2]), 2)
except ValueError as e:
    print(e)
else:
    raise SystemExit("no error")
"""


def test_sequences_to_table_checks_its_arguments_under_python_O():
    p = subprocess.run([sys.executable, "-O", "-c", _MISMATCH], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "values and lengths disagree: 5 vectors, lengths sum to 4" in p.stdout

"""``build_corpus``: binaries -> de-duplicated functions -> train/val/test folders and a manifest.

Sizing: ``max_mb`` stops after about that many MB of records (overshoot is at most one function).
One binary fills at most 1/12 of the budget (>= 1 MiB), so the corpus spans many binaries.

Determinism: for the same seed and the same binaries the output is byte for byte identical, whatever
``jobs`` is.  The seed shuffles the binary order, samples functions inside binaries larger than the
per-binary budget, picks the record forms of ``mixed`` and the train/val/test assignment (split.py).
Identical functions (same float32 bytes) are kept once across the whole corpus, so no function is
shared between splits.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .binary import BinaryTask, default_jobs, encode_binaries
from .decoders import resolve_decoder
from .discover import candidate_paths
from .elf import is_x86_64_elf
from .errors import CorpusError
from .fields import FIELD_NAMES, N_FIELDS
from .split import SPLITS, SplitAssigner
from .write import FORMATS, MAX_SINGLE_FILES_PER_BINARY, BinaryWriter, folder_name, prepare_out_dir, write_manifest

__all__ = ["DEFAULT_MAX_MB", "build_corpus", "length_quantiles"]

DEFAULT_MAX_MB = 50.0
# One binary may fill at most 1/12 of the corpus (but >= 1 MiB) so a few huge
# libraries (libLLVM: 100k functions) do not crowd out everything else.
_PER_BINARY_SHARE = 12
_MIN_PER_BINARY_BYTES = 1 << 20


def length_quantiles(lengths: Sequence[int]) -> dict[str, float]:
    """min, p50, p90, p99, max and mean of the function lengths, as the manifest reports them.

    A quantile q is the sorted element at index min(n - 1, floor(q * n)); numpy's "higher" method
    (index ceil((n - 1) * q)) picks the same element for these q (checked for every n up to 2e7).
    """
    if not lengths:
        return {}
    values = np.asarray(lengths, dtype=np.int64)
    p50, p90, p99 = np.quantile(values, (0.5, 0.9, 0.99), method="higher")
    return {
        "min": int(values.min()),
        "p50": int(p50),
        "p90": int(p90),
        "p99": int(p99),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 2),
    }


def build_corpus(
    out: str | os.PathLike,
    max_mb: float = DEFAULT_MAX_MB,
    seed: int = 0,
    fmt: str = "mixed",
    binaries: Sequence[str | os.PathLike] | None = None,
    split: float = 0.0,
    *,
    test_split: float = 0.0,
    jobs: int | None = None,
    decoder: str = "auto",
    verbose: bool = False,
) -> dict:
    """Write the corpus to ``out`` and return its manifest (also in out/.manifest.json).

    ``binaries``: files and/or folders to draw from (default: /usr/bin and
    /usr/lib/x86_64-linux-gnu).  ``split`` and ``test_split``: fractions of
    binaries that go to ``out/val`` (for model selection) and ``out/test`` (for
    the report), whole binaries at a time.  Stops after about ``max_mb`` MB of
    records.  Raises CorpusError for bad arguments.
    """
    if fmt not in FORMATS:
        raise CorpusError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    if not (isinstance(max_mb, (int, float)) and math.isfinite(max_mb) and max_mb > 0):
        raise CorpusError(f"--max-mb must be a positive number, got {max_mb!r}")
    if not (isinstance(split, (int, float)) and 0.0 <= split < 1.0):
        raise CorpusError(f"--split must be in [0, 1), got {split!r}")
    if not (isinstance(test_split, (int, float)) and 0.0 <= test_split < 1.0):
        raise CorpusError(f"--test-split must be in [0, 1), got {test_split!r}")
    if split + test_split >= 1.0:
        raise CorpusError(f"--split + --test-split must be below 1 (train needs binaries), got {split + test_split}")
    if jobs is not None and jobs < 1:
        raise CorpusError(f"--jobs must be >= 1, got {jobs!r}")
    decoder_name = resolve_decoder(decoder)
    candidates = candidate_paths(binaries)
    random.Random(f"asm-corpus/{seed}/binaries").shuffle(candidates)
    out_path = Path(out)
    prepare_out_dir(out_path)

    started = time.perf_counter()
    max_bytes = int(max_mb * 1_000_000)
    per_binary_bytes = max(_MIN_PER_BINARY_BYTES, max_bytes // _PER_BINARY_SHARE)
    max_functions = MAX_SINGLE_FILES_PER_BINARY if fmt in ("json", "object") else None
    used_names: set[str] = set()

    def tasks() -> Iterator[BinaryTask]:
        for path in candidates:
            if is_x86_64_elf(path):  # default dirs hold scripts and archives too
                name = folder_name(path, used_names)
                yield BinaryTask(path, name, seed, per_binary_bytes, max_functions, decoder_name)

    seen: set[bytes] = set()
    total_bytes = 0
    duplicates = 0
    lengths: list[int] = []
    used: list[dict] = []
    empty: list[str] = []
    errors: dict[str, str] = {}
    assigner = SplitAssigner(split, test_split)
    results = encode_binaries(tasks(), jobs or default_jobs())
    try:
        for result in results:
            if result.error:
                errors[result.name] = result.error
            fresh = []
            binary_duplicates = 0
            for _start, n_instructions, digest, text in result.functions:
                if digest in seen:
                    binary_duplicates += 1
                else:
                    seen.add(digest)
                    fresh.append((n_instructions, text))
            duplicates += binary_duplicates
            if not fresh:
                empty.append(result.name)
                continue
            split_name = assigner.next()
            writer = BinaryWriter(
                out_path / split_name / result.name, fmt, random.Random(f"asm-corpus/{seed}/{result.name}/layout")
            )
            n_functions = n_instr = 0
            for n_instructions, text in fresh:
                writer.add(text, n_instructions)
                n_functions += 1
                n_instr += n_instructions
                lengths.append(n_instructions)
                if total_bytes + writer.pending_bytes >= max_bytes:
                    break
            writer.close()
            total_bytes += writer.bytes_written
            used.append(
                {
                    "name": result.name,
                    "path": result.path,
                    "split": split_name,
                    "fdes": result.n_fdes,
                    "functions": n_functions,
                    "instructions": n_instr,
                    "duplicates_dropped": binary_duplicates,
                    "short_dropped": result.n_short,
                    "files": writer.files,
                    "bytes": writer.bytes_written,
                }
            )
            if total_bytes >= max_bytes:
                break
    finally:
        results.close()  # stops the worker pool now rather than at garbage collection

    if not used:
        raise CorpusError("no functions found in the selected binaries")
    manifest = {
        "tool": "tools/asm_corpus",
        "seed": seed,
        "format": fmt,
        "max_mb": max_mb,
        "decoder": decoder_name,
        "n_fields": N_FIELDS,
        "field_names": list(FIELD_NAMES),
        "split": {
            "val_fraction": split,
            "test_fraction": test_split,
            **{name: [b["name"] for b in used if b["split"] == name] for name in SPLITS},
        },
        "totals": {
            "binaries": len(used),
            "functions": len(lengths),
            "instructions": int(sum(lengths)),
            "duplicates_dropped": duplicates,
            "short_dropped": sum(b["short_dropped"] for b in used),
            "files": sum(b["files"] for b in used),
            "bytes": total_bytes,
        },
        "length_quantiles": length_quantiles(lengths),
        "binaries": used,
        "binaries_without_new_functions": empty,
        "errors": errors,
    }
    write_manifest(out_path, manifest)
    if verbose:
        q = manifest["length_quantiles"]
        t = manifest["totals"]
        n_val, n_test = len(manifest["split"]["val"]), len(manifest["split"]["test"])
        print(
            f"asm_corpus: {t['bytes'] / 1e6:.1f} MB in {t['files']} files, {t['binaries']} binaries "
            f"({n_val} val, {n_test} test), {t['functions']} functions, {t['instructions']} instructions, "
            f"{t['duplicates_dropped']} duplicates dropped; length p50={q['p50']} p90={q['p90']} "
            f"p99={q['p99']} max={q['max']}; {time.perf_counter() - started:.1f} s ({decoder_name})"
        )
    return manifest

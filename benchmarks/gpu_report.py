"""The table of benchmarks/gpu.sh: per fit run, real tokens/s, MFU against the bf16 matmul peak measured in
the same run (passed to every fit as --peak-tflops), data-wait % and pad %, medians over the second half of
the run's logged steps (past warm-up and compilation). Prints a table, then one JSON line.

    python benchmarks/gpu_report.py --peak-tflops P [--device NAME] [--out FILE] LABEL=RUN_DIR ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarize(run_dir: Path) -> dict | None:
    """Medians over the second half of the run's metrics lines; None when the run logged none."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
               if r.get("real_tokens_per_s") is not None]
    if not records:
        return None
    late = records[len(records) // 2 :]

    def median(key):
        values = [r[key] for r in late if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"real_tokens_per_s": median("real_tokens_per_s"), "mfu_vs_bf16_peak": median("mfu"),
            "data_wait_fraction": median("data_wait_fraction"), "pad_fraction": median("pad_fraction"),
            "steps": records[-1].get("step"), "records_used": len(late)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak-tflops", type=float, required=True, help="bf16 matmul peak measured in this run (per device)")
    p.add_argument("--device", default="", help="what the runs ran on, for the header")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    args = p.parse_args(argv)
    results = {}
    for item in args.runs:
        label, _, run_dir = item.partition("=")
        results[label] = summarize(Path(run_dir))
    print(f"fit on {args.device or 'this machine'}; MFU against the bf16 matmul peak measured in this run: "
          f"{args.peak_tflops:.1f} TFLOP/s per device")
    print(f"{'run':<34}{'real tokens/s':>15}{'MFU (bf16 peak)':>17}{'data wait':>11}{'pad':>7}")
    for label, r in results.items():
        if r is None:
            print(f"{label:<34}{'failed (see its log)':>50}")
            continue
        mfu = "" if r["mfu_vs_bf16_peak"] is None else f"{100 * r['mfu_vs_bf16_peak']:.1f}%"
        wait = "" if r["data_wait_fraction"] is None else f"{100 * r['data_wait_fraction']:.1f}%"
        pad = "" if r["pad_fraction"] is None else f"{100 * r['pad_fraction']:.1f}%"
        print(f"{label:<34}{r['real_tokens_per_s']:>15,.0f}{mfu:>17}{wait:>11}{pad:>7}")
    out = {"benchmark": "gpu", "device": args.device, "bf16_matmul_peak_tflops": args.peak_tflops, "runs": results}
    text = json.dumps(out)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 1 if any(r is None for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

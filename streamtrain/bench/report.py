"""The benchmark's tables: rows of (stage, streamtrain, peer, ratio) from one run's figures, drawn with rich
on the terminal and as Markdown for the README (benchmarks/readme_table.py)."""

from __future__ import annotations

__all__ = ["GOALS", "goals_met", "summary_rows", "ablation_rows", "print_tables", "markdown_tables", "README_BEGIN", "README_END", "render_readme"]


# The speed the product promises: (key, at least, what), each measured against its peer or bound in one run.
GOALS = (
    ("convert_vs_stdlib", 8.0, "convert >= 8x the stdlib json reader"),
    ("loader_vs_memcpy", 0.25, "loader >= 25% of memcpy"),
    ("train_vs_seed", 25.0, "fit >= 25x the seed pipeline"),
    ("mfu", 0.70, "fit MFU >= 70% of the measured matmul peak"),
)


# Per goal, the figure of the same run that bounds it on this machine (see the rows of summary_rows).
CEILINGS = {"convert_vs_stdlib": "convert_vs_stdlib_ceiling", "train_vs_seed": "train_vs_seed_ceiling",
            "mfu": "gemm_shape_mfu"}


def goals_met(r: dict) -> dict[str, bool | None]:
    """Per goal of GOALS: met, missed, or None when its stage did not run."""
    met = {}
    for key, least, _ in GOALS:
        value = r.get(key)
        met[key] = None if value is None else bool(value >= least)
    if met["loader_vs_memcpy"] is not None and r.get("loader_pad_fraction") is not None:
        met["loader_vs_memcpy"] = met["loader_vs_memcpy"] and r["loader_pad_fraction"] < 0.05  # and pad < 5%
    return met


def _goal_line(r: dict) -> str:
    met = goals_met(r)
    parts = []
    for key, least, what in GOALS:
        state = "met" if met[key] else "not met" if met[key] is not None else "not measured"
        ceiling = r.get(CEILINGS.get(key, ""))
        if ceiling is not None and met[key] is not None:
            shown = f"{100 * ceiling:.0f}%" if key == "mfu" else f"{ceiling:.1f}x"
            state += f" (ceiling here {shown}{', below the goal' if ceiling < least else ''})"
        parts.append(f"{what}{' (pad < 5%)' if key == 'loader_vs_memcpy' else ''}: {state}")
    return "goals: " + "; ".join(parts)


def _rate(value, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "tok/s":
        return f"{value / 1e6:.2f} M tok/s" if value >= 1e6 else f"{value / 1e3:.1f} k tok/s"
    return f"{value:.1f} {unit}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def summary_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(what, streamtrain, peer or bound in the same run, ratio) per measured comparison."""
    rows = []
    if "convert_mb_per_s" in r:
        rows.append((f"convert, {r['convert_workers']} workers, process start incl.",
                     _rate(r["convert_mb_per_s"], "MB/s"),
                     f"stdlib json + numpy: {_rate(r['stdlib_convert_mb_per_s'], 'MB/s')}",
                     _ratio(r["convert_vs_stdlib"])))
    if r.get("convert_floor_s") is not None:
        rows.append((f"convert ceiling: start-up + parse + write only, {r['convert_workers']} processes at once",
                     f"{r['convert_s']:.2f} s",
                     f"floor {r['convert_floor_s']:.2f} s = {r['convert_floor_startup_s']:.2f} start-up + "
                     f"{r['convert_floor_parse_s']:.2f} parse + {r['convert_floor_write_s']:.2f} write "
                     f"({r['convert_output_bytes'] / 1e6:.0f} MB, sha256, fsync)",
                     f"{_ratio(r['convert_vs_stdlib_ceiling'])} max"))
    if "loader_real_tokens_per_s" in r:
        ours = f"{_rate(r['loader_real_tokens_per_s'], 'tok/s')}, pad {100 * r['loader_pad_fraction']:.1f}%"
        rows.append((f"loader, {r['loader_workers']} workers", ours,
                     f"seed-style JSON + pad_sequence: {_rate(r['seed_loader_real_tokens_per_s'], 'tok/s')}, "
                     f"pad {100 * r['seed_loader_pad_fraction']:.0f}%", _ratio(r["loader_vs_seed"])))
        hf = r.get("hf_loader_real_tokens_per_s")
        rows.append(("loader", ours,
                     "HF datasets: " + (_rate(hf, "tok/s") if hf is not None else "not installed (pip install 'streamtrain[bench]')"),
                     _ratio(r.get("loader_vs_hf"))))
        rows.append(("loader vs memcpy bound", ours, f"memcpy: {_rate(r['memcpy_loader_real_tokens_per_s'], 'tok/s')}",
                     f"{100 * r['loader_vs_memcpy']:.1f}%"))
    if "train_real_tokens_per_s" in r:
        rows.append((f"fit {r['train_model']} (DxLxFFxH), {r['train_batch_tokens']} tokens/batch, {r['train_precision']}",
                     f"{_rate(r['train_real_tokens_per_s'], 'tok/s')}, MFU {100 * r['mfu']:.1f}%",
                     f"seed pipeline: {_rate(r['seed_train_real_tokens_per_s'], 'tok/s')}", _ratio(r["train_vs_seed"])))
        if r.get("seed_mfu") is not None:
            rows.append(("fit ceiling vs seed: fit at 100% MFU", f"MFU {100 * r['mfu']:.1f}%",
                         f"seed pipeline MFU {100 * r['seed_mfu']:.1f}%",
                         f"{_ratio(r['train_vs_seed_ceiling'])} max"))
            rows.append(("MFU ceiling: the model's matmuls alone at fit's batch", f"MFU {100 * r['mfu']:.1f}%",
                         f"matmuls alone {100 * r['gemm_shape_mfu']:.1f}% of the peak", ""))
        rows.append(("matmul peaks (MFU divides by fp32)", f"fp32 {r['fp32_matmul_peak_tflops']:.3f} TFLOP/s",
                     f"bf16 {r['bf16_matmul_peak_tflops']:.3f} TFLOP/s", ""))
    return rows


def ablation_rows(r: dict) -> list[tuple[str, str, str, str]]:
    return [(a["name"], a["what"], _rate(a["real_tokens_per_s"], "tok/s"), _ratio(a["vs_seed"]))
            for a in r.get("ablation", [])]


def print_tables(r: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    m = r.get("machine", {})
    table = Table(title=f"streamtrain bench{' --quick' if r.get('quick') else ''}: {r.get('corpus', '')}")
    for col in ("benchmark", "streamtrain", "peer / bound, same run", "ratio"):
        table.add_column(col, justify="right" if col == "ratio" else "left")
    for row in summary_rows(r):
        table.add_row(*map(escape, row))  # cells are text: "streamtrain[bench]" is no markup tag
    console.print(table)
    rows = ablation_rows(r)
    if rows:
        abl = Table(title="train ablation: each effect alone, same run")
        for col in ("pipeline", "what changes", "real tokens/s", "x seed"):
            abl.add_column(col, justify="right" if col in ("real tokens/s", "x seed") else "left")
        for row in rows:
            abl.add_row(*map(escape, row))
        console.print(abl)
    console.print(escape(_goal_line(r)))
    console.print(f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
                  f"device {m.get('device', '?')}, commit {(m.get('commit') or 'unknown')[:10]}"
                  f"{' (dirty)' if m.get('dirty') else ''}, load {m.get('load_avg_1m', '?')}")


def markdown_tables(r: dict) -> str:
    m = r.get("machine", {})
    lines = [f"Run of {m.get('time', '?')} at commit `{(m.get('commit') or 'unknown')[:10]}`"
             f"{' (--quick)' if r.get('quick') else ''}: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
             f"torch {m.get('torch', '?')}, device {m.get('device', '?')}; corpus {r.get('corpus', '?')}.", "",
             "| benchmark | streamtrain | peer / bound, same run | ratio |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(r)]
    lines += ["", _goal_line(r) + "."]
    rows = ablation_rows(r)
    if rows:
        lines += ["", "Train ablation (each effect alone, same run):", "",
                  "| pipeline | what changes | real tokens/s | × seed |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- bench-table:begin (written by benchmarks/readme_table.py from benchmarks/history.jsonl; do not edit) -->"
README_END = "<!-- bench-table:end -->"


def render_readme(readme: str, run: dict) -> str:
    """`readme` with the text between the two marker lines replaced by `run`'s tables."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README has no '{README_BEGIN}' ... '{README_END}' block to fill")
    return readme[: begin + len(README_BEGIN)] + "\n" + markdown_tables(run) + readme[end:]

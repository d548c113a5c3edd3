"""`streamtrain bench`: a tiny --quick run yields one well-formed JSON object last, with every figure and
ratio the README and the history rely on, and a line in the history file (never a speed check)."""

import json
import math

import pytest

from streamtrain.bench.history import append_history, figure, latest_run, read_history
from streamtrain.bench.machine import cpu_model
from streamtrain.bench.run import BenchOptions, finite_or_none, repo_history_path
from streamtrain.cli import main
from streamtrain.errors import UserError

REQUIRED = [
    "convert_mb_per_s", "stdlib_convert_mb_per_s", "convert_vs_stdlib",
    "loader_real_tokens_per_s", "seed_loader_real_tokens_per_s", "hf_loader_real_tokens_per_s",
    "memcpy_loader_real_tokens_per_s", "loader_epoch_real_tokens_per_s", "loader_vs_seed", "loader_vs_memcpy",
    "train_real_tokens_per_s", "seed_train_real_tokens_per_s", "train_vs_seed", "mfu",
    "fp32_matmul_peak_tflops", "bf16_matmul_peak_tflops", "ablation", "goals_met", "machine",
]
POSITIVE = ["convert_mb_per_s", "stdlib_convert_mb_per_s", "loader_real_tokens_per_s", "loader_epoch_real_tokens_per_s", "seed_loader_real_tokens_per_s",
            "memcpy_loader_real_tokens_per_s", "train_real_tokens_per_s", "seed_train_real_tokens_per_s",
            "fp32_matmul_peak_tflops", "bf16_matmul_peak_tflops"]


@pytest.mark.slow
def test_quick_json_run_is_well_formed_and_recorded(tmp_path, capsys):
    out = tmp_path / "bench-out"
    code = main(["bench", "--quick", "--json", "--size-mb", "0.2", "--corpus", "synthetic", "--model", "16x1x32",
                 "--batch-tokens", "256", "--out", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    missing = [k for k in REQUIRED if k not in result]
    assert not missing, missing
    for key in POSITIVE:
        assert isinstance(result[key], float) and result[key] > 0 and math.isfinite(result[key]), key
    # ratios are the figures' quotients, taken in the same run
    assert result["train_vs_seed"] == pytest.approx(result["train_real_tokens_per_s"] / result["seed_train_real_tokens_per_s"])
    assert result["convert_vs_stdlib"] == pytest.approx(result["convert_mb_per_s"] / result["stdlib_convert_mb_per_s"], rel=1e-6)
    assert result["loader_vs_memcpy"] == pytest.approx(result["loader_real_tokens_per_s"] / result["memcpy_loader_real_tokens_per_s"])
    assert 0 < result["mfu"] < 1
    # the limits each goal is held against, measured in the same run
    assert 0 < result["seed_mfu"] < 1 and 0 < result["gemm_shape_mfu"]
    assert result["train_vs_seed_ceiling"] == pytest.approx(1 / result["seed_mfu"])
    floor = result["convert_floor_s"]
    assert floor == pytest.approx(result["convert_floor_startup_s"] + result["convert_floor_parse_s"]
                                  + result["convert_floor_write_s"])
    assert 0 < floor and result["convert_output_bytes"] > 0
    assert result["convert_vs_stdlib_ceiling"] == pytest.approx(result["convert_mb_per_s"] * result["convert_s"]
                                                                / result["stdlib_convert_mb_per_s"] / floor)
    names = [row["name"] for row in result["ablation"]]
    assert names == ["seed", "bucketing", "sdpa", "fused_adamw", "all_three", "fit"]
    seed_row = result["ablation"][0]
    assert seed_row["real_tokens_per_s"] == result["seed_train_real_tokens_per_s"] and seed_row["vs_seed"] == 1.0
    for key in ("cpu", "cores", "torch", "device", "commit"):
        assert key in result["machine"], key
    assert result["machine"]["device"] == "cpu" or result["machine"]["device"].startswith("cuda")
    assert result["dataset"]["num_sequences"] > 0
    history = read_history(out / "history.jsonl")
    assert len(history) == 1 and history[0] == result
    assert (out / "history.png").stat().st_size > 0


def test_unknown_stage_is_one_line_exit_2(tmp_path, capsys):
    assert main(["bench", "--stages", "convert,fly", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fly" in err[0] and "convert, loader, train" in err[0]
    assert not (tmp_path / "history.jsonl").exists()


def test_options_reject_bad_values():
    with pytest.raises(UserError, match="--size-mb"):
        BenchOptions(size_mb=0)
    with pytest.raises(UserError, match="--size-mb"):
        BenchOptions(size_mb=float("nan"))
    with pytest.raises(UserError, match="--model"):
        from streamtrain.bench.train_bench import ModelShape

        ModelShape.parse("128x4")


def test_missing_data_folder_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "nope"), "--no-record"]) == 2
    assert "nope" in capsys.readouterr().err


def test_history_is_recorded_only_from_the_repository_root(tmp_path):
    assert repo_history_path(tmp_path) is None
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "streamtrain").mkdir()
    (tmp_path / "streamtrain" / "cli.py").write_text("")
    assert repo_history_path(tmp_path) == tmp_path / "benchmarks" / "history.jsonl"


def test_append_history_keeps_earlier_lines_and_reads_legacy_runs(tmp_path):
    path = tmp_path / "history.jsonl"
    legacy = {"commit": "abc", "train": {"fit_real_tokens_per_s": 17000.0, "speedup": 12.5}}
    path.write_text(json.dumps(legacy))  # no final newline: an older writer's last line
    append_history(path, {"benchmark": "bench", "quick": True, "train_real_tokens_per_s": 9.0})
    append_history(path, {"benchmark": "bench", "quick": False, "train_real_tokens_per_s": 8.0})
    append_history(path, {"benchmark": "bench", "quick": True, "train_real_tokens_per_s": 7.0})
    history = read_history(path)
    assert len(history) == 4 and history[0] == legacy
    assert figure(history[0], "train_real_tokens_per_s") == 17000.0
    assert figure(history[0], "train_vs_seed") == 12.5
    assert figure(history[0], "convert_mb_per_s") is None
    assert latest_run(history)["train_real_tokens_per_s"] == 8.0  # the newest full run
    assert latest_run(history, full_only=False)["train_real_tokens_per_s"] == 7.0


def test_non_finite_figures_become_null():
    assert finite_or_none({"a": float("nan"), "b": [1.5, float("inf")], "c": "x"}) == {"a": None, "b": [1.5, None], "c": "x"}


def test_cpu_model_reads_cpuinfo():
    assert cpu_model("processor\t: 0\nmodel name\t: Example CPU 9000\n") == "Example CPU 9000"


def test_readme_table_replaces_only_the_marker_block():
    from streamtrain.bench.report import README_BEGIN, README_END, render_readme

    run = {"benchmark": "bench", "quick": False, "corpus": "synthetic", "convert_workers": 2,
           "convert_mb_per_s": 123.4, "stdlib_convert_mb_per_s": 20.0, "convert_vs_stdlib": 6.17,
           "machine": {"time": "T", "commit": "0123456789abcdef", "cpu": "Example CPU", "cores": 2}}
    readme = f"# title\nbefore\n{README_BEGIN}\nold table 99x\n{README_END}\nafter\n"
    out = render_readme(readme, run)
    assert out.startswith(f"# title\nbefore\n{README_BEGIN}\n") and out.endswith(f"{README_END}\nafter\n")
    assert "old table" not in out
    assert "123.4 MB/s" in out and "20.0 MB/s" in out and "6.17x" in out and "0123456789" in out
    assert render_readme(out, run) == out  # idempotent
    with pytest.raises(ValueError, match="block to fill"):
        render_readme("# no block\n", run)


def test_history_plot_draws_new_and_legacy_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from streamtrain.bench.history import plot_history

    history = [{"commit": "a" * 40, "train": {"fit_real_tokens_per_s": 17000.0, "speedup": 12.5}},
               {"benchmark": "bench", "commit": "b" * 40, "train_real_tokens_per_s": 9000.0, "train_vs_seed": 7.0}]
    out = tmp_path / "history.png"
    assert plot_history(history, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_history([], tmp_path / "empty.png") and not (tmp_path / "empty.png").exists()


def test_bad_model_is_refused_before_any_stage_runs(tmp_path, capsys):
    assert main(["bench", "--model", "128x4", "--size-mb", "0.1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "bench: corpus" not in err


def test_goals_are_judged_against_their_thresholds():
    from streamtrain.bench.report import goals_met

    met = goals_met({"convert_vs_stdlib": 8.0, "loader_vs_memcpy": 0.30, "loader_pad_fraction": 0.06,
                     "train_vs_seed": 24.9})
    assert met == {"convert_vs_stdlib": True, "loader_vs_memcpy": False, "train_vs_seed": False, "mfu": None}
    assert goals_met({"loader_vs_memcpy": 0.25, "loader_pad_fraction": 0.049})["loader_vs_memcpy"] is True


def test_terminal_table_prints_cells_as_text_not_markup():
    from rich.console import Console

    from streamtrain.bench.report import print_tables

    r = {"loader_real_tokens_per_s": 2e7, "loader_workers": 0, "loader_pad_fraction": 0.05,
         "seed_loader_real_tokens_per_s": 1e7, "seed_loader_pad_fraction": 0.8, "loader_vs_seed": 2.0,
         "hf_loader_real_tokens_per_s": None, "memcpy_loader_real_tokens_per_s": 1e8, "loader_vs_memcpy": 0.2}
    console = Console(record=True, width=300)
    print_tables(r, console)
    assert "pip install 'streamtrain[bench]'" in console.export_text()

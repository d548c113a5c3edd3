"""`streamtrain bench`: convert, loader and train throughput beside their peers and bounds, in one run.

corpus (real instruction data or a heavy-tailed synthetic one) · convert (vs the stdlib json reader) ·
loader (vs seed-style loading, Hugging Face datasets, memcpy) · train (vs the seed pipeline, with an
ablation of each effect alone) · machine · history (history.jsonl, history.png) · report (tables).
"""

from streamtrain.bench.run import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench"]

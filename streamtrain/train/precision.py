"""Numeric precision: which dtype to compute in, and the one autocast + GradScaler code path that uses it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

# `--amp` on CUDA: bf16 autocast where the GPU supports it, else fp16 with a GradScaler. `--amp` on a CPU is
# measured: whether bf16 autocast beats fp32 there depends on the CPU (native bf16 dot products or emulation
# through fp32), the model's widths and the batch shapes (at small widths the casts cost more than the
# matmuls save), so no rule of thumb holds. A short probe times forward + backward of a copy of the model in
# fp32 and in bf16 at the run's most frequent batch shapes, alternating the two, and bf16 is taken only when
# it is faster by more than the measurement noise: `--amp` is then never slower than fp32. fp16 on a CPU is
# emulated and never a candidate. The result is cached per machine, torch, thread count, model and shapes
# (`user_cache.cache_dir()`/precision/), so a second run of the same config does not probe again.
#
# `choose_precision` and `decide_cpu_precision` are pure functions (of what the hardware offers, of measured
# timings), so every branch is testable on any machine; `Precision.autocast()` and `Precision.scaler` are
# used the same way whatever was chosen (the scaler is a no-op unless fp16, autocast is a no-op for fp32).

__all__ = [
    "Precision",
    "CpuProbe",
    "ProbeShape",
    "choose_precision",
    "decide_cpu_precision",
    "probe_shapes",
    "time_precisions",
    "probe_cpu_precision",
    "probe_cache_key",
    "cpu_identity",
    "autocast_for",
    "build_precision",
    "use_tf32_for_fp32",
    "MIN_MARGIN",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

MIN_MARGIN = 0.05  # bf16 must be at least this much faster: the probe's shapes and steps are a sample of the run
_NOISE_SIGMAS = 2.0  # ... and faster by more than this many standard errors of the measured ratio
PROBE_BUDGET_S = 2.5  # the probe's target duration, warm-up included (it always takes PROBE_MIN_ROUNDS rounds)
PROBE_MAX_SHAPES = 8
PROBE_MIN_ROUNDS = 3
PROBE_MAX_ROUNDS = 9
_CACHE_FORMAT = "streamtrain-precision-probe-1"


@dataclass(frozen=True)
class ProbeShape:
    batch: int  # B, sequences per micro-batch
    length: int  # T, padded length
    token_share: float  # share of the epoch's padded tokens this shape stands for


@dataclass(frozen=True)
class CpuProbe:
    """What the --amp probe measured on a CPU and chose."""

    precision: str  # 'fp32' | 'bf16'
    ratio: float  # bf16 speed relative to fp32 (fp32 time / bf16 time), median over paired rounds
    noise: float  # relative standard error of the ratio (from the rounds' scaled MAD)
    margin: float  # by how much bf16 had to be faster: max(MIN_MARGIN, 2 noise)
    rounds: int
    shapes: tuple[tuple[int, int, float], ...]  # (B, T, token share) timed
    cached: bool = False  # read from the cache instead of measured in this run

    def describe(self) -> str:
        """One line: what was measured and what it led to."""
        shapes = f"{len(self.shapes)} most frequent batch shape{'s' if len(self.shapes) != 1 else ''}"
        how = "cached" if self.cached else f"{self.rounds} rounds, ±{100 * self.noise:.0f}%"
        line = f"--amp: bf16 measured {self.ratio:.2f}x fp32 at this model's {shapes} ({how}) -> {self.precision}"
        if self.precision == "fp32" and self.ratio > 1.0:
            line += f" (bf16 must be over {1 + self.margin:.2f}x)"
        return line


def choose_precision(
    device_type: str, cuda_bf16_supported: bool, forced: str | None = None, amp: bool = True,
    cpu_probe: CpuProbe | None = None,
) -> tuple[str, str]:
    """Return (precision, reason): precision is 'fp32', 'bf16' or 'fp16'; reason is one human sentence.
    `forced` (--precision) wins; otherwise fp32 unless `amp` (--amp). On a CPU, --amp takes what
    `cpu_probe` chose; without a probe it stays in fp32 (nothing says bf16 would pay)."""
    if forced is not None:
        if forced == "fp16" and device_type == "cpu":
            return "fp16", "forced by --precision fp16 (slow on CPU: no fp16 matmul units)"
        return forced, f"forced by --precision {forced}"
    if not amp:
        return "fp32", "fp32 (pass --amp for mixed precision)"
    if device_type == "cuda":
        if cuda_bf16_supported:
            return "bf16", "--amp: bf16 autocast (the GPU supports bf16; no loss scaling needed)"
        return "fp16", "--amp: fp16 autocast with loss scaling (the GPU has no bf16)"
    if cpu_probe is None:
        return "fp32", "--amp: fp32 (bf16 was not measured on this CPU)"
    return cpu_probe.precision, cpu_probe.describe()


def decide_cpu_precision(
    fp32_s: Sequence[float], bf16_s: Sequence[float], min_margin: float = MIN_MARGIN
) -> tuple[str, float, float, float]:
    """(precision, ratio, noise, margin) from paired timings: `fp32_s[i]` and `bf16_s[i]` are the costs of
    round i (any time unit, the same work) in each precision, measured next to each other.

    ratio is the median over rounds of fp32_s[i] / bf16_s[i] (bf16's speed-up; a ratio of pairs cancels
    slow drifts of the machine's speed, which a ratio of medians would not). noise is the relative
    standard error of that median: the spread of one round's ratio from the median absolute deviation
    (robust to a round that another process interrupted), times 1.25 / sqrt(rounds). bf16 wins only when
    ratio - 1 exceeds margin = max(min_margin, 2 noise): a tie or a doubt goes to fp32, so that choosing
    is never slower than not choosing."""
    if not fp32_s or len(fp32_s) != len(bf16_s):
        raise ValueError(f"need paired timings, got {len(fp32_s)} fp32 and {len(bf16_s)} bf16")
    ratios = [a / max(b, 1e-300) for a, b in zip(fp32_s, bf16_s)]
    ratio = statistics.median(ratios)
    sigma = 1.4826 * statistics.median(abs(r - ratio) for r in ratios) / ratio  # MAD -> sigma of a normal
    noise = 1.2533 * sigma / math.sqrt(len(ratios))  # the median's standard error, for normal errors
    margin = max(min_margin, _NOISE_SIGMAS * noise)
    return ("bf16" if ratio > 1.0 + margin else "fp32"), ratio, noise, margin


def probe_shapes(shape_tokens: Mapping[tuple[int, int], int], max_shapes: int = PROBE_MAX_SHAPES) -> list[ProbeShape]:
    """The batch shapes to time, each weighted by the share of padded tokens it stands for.

    `shape_tokens`: padded tokens per (B, T) over an epoch. The shapes, in order of T, are cut into
    `max_shapes` consecutive groups of equal token share (a shape goes to the group holding the middle of
    its tokens), and each group is represented by its most frequent shape (by tokens; ties: the one
    nearest the middle of the group), so that short and long sequences are both timed even where many
    shapes are about equally frequent. A shape with more than 1 / max_shapes of the tokens is a group of
    its own (and fewer shapes are returned). Sorted by share, largest first."""
    items = sorted((T, B, int(n)) for (B, T), n in shape_tokens.items() if n > 0)
    total = sum(n for _, _, n in items)
    if total == 0:
        return []
    groups: dict[int, list[tuple[float, int, int, int]]] = {}
    done = 0
    for T, B, n in items:
        middle = (done + n / 2) / total
        groups.setdefault(min(int(middle * max_shapes), max_shapes - 1), []).append((middle, T, B, n))
        done += n
    shapes = []
    for g, members in groups.items():
        centre = (g + 0.5) / max_shapes
        _, T, B, _ = max(members, key=lambda m: (m[3], -abs(m[0] - centre)))
        shapes.append(ProbeShape(B, T, sum(m[3] for m in members) / total))
    return sorted(shapes, key=lambda s: (-s.token_share, s.length))


def time_precisions(
    run_step: Callable[[str, ProbeShape], None],
    shapes: Sequence[ProbeShape],
    candidates: Sequence[str] = ("fp32", "bf16"),
    budget_s: float = PROBE_BUDGET_S,
    min_rounds: int = PROBE_MIN_ROUNDS,
    max_rounds: int = PROBE_MAX_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], list[ProbeShape]]:
    """Time `run_step(precision, shape)` (one forward + backward; it must return only when the work is
    done) and return ({precision: seconds per padded token of each round}, the shapes timed).

    Warm-up first: every candidate once per shape (kernel selection, allocator, bf16 weight casts), not
    timed. A round then times each shape once in every candidate, the candidates next to each other and
    in an order that alternates from one shape and round to the next, so that a slow spell of the machine
    falls on both. A round's cost is sum over shapes of share * seconds / (B * T): the time per token of
    an epoch made of these shapes. Rounds go on while `budget_s` (warm-up included) lasts, at least
    `min_rounds` and at most `max_rounds`, and none starts that would end past the budget. When the first
    shape's warm-up shows that the budget cannot hold min_rounds rounds over every shape, only as many of
    the most frequent shapes are timed as fit (at least one). The optimizer step is left out: it updates
    the fp32 weights and state in every precision, so it costs both the same."""
    start = clock()
    shapes = list(shapes)
    first = shapes[0]
    warm = {}
    for name in candidates:
        t0 = clock()
        run_step(name, first)
        warm[name] = clock() - t0
    # the first call of a process pays one-off set-up: the faster warm-up is the better estimate of a step
    step_s = min(warm.values())
    fit = int(budget_s / max(step_s * len(candidates) * (min_rounds + 1), 1e-9))
    shapes = shapes[: max(1, min(len(shapes), fit))]
    for shape in shapes[1:]:
        for name in candidates:
            run_step(name, shape)
    weight = sum(s.token_share for s in shapes)
    costs: dict[str, list[float]] = {name: [] for name in candidates}
    round_s = 0.0
    for r in range(max_rounds):
        if r >= min_rounds and clock() - start + round_s > budget_s:
            break
        round_start = clock()
        round_cost = dict.fromkeys(candidates, 0.0)
        for i, shape in enumerate(shapes):
            order = candidates if (r + i) % 2 == 0 else list(reversed(candidates))
            for name in order:
                t0 = clock()
                run_step(name, shape)
                round_cost[name] += shape.token_share / weight * (clock() - t0) / (shape.batch * shape.length)
        for name in candidates:
            costs[name].append(round_cost[name])
        round_s = clock() - round_start
    return costs, shapes


def cpu_identity(cpuinfo: str | None = None) -> dict[str, str]:
    """The CPU as the probe's cache knows it: model name and a digest of its feature flags (x86 `flags`,
    ARM `Features` of /proc/cpuinfo, or `cpuinfo` text; platform names where there is no such file)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "flags", "features", "cpu part", "cpu implementer") and key not in fields:
            fields[key] = " ".join(value.split())
    flags = fields.get("flags") or fields.get("features") or ""
    model = fields.get("model name") or " ".join(
        v for v in (fields.get("cpu implementer"), fields.get("cpu part"), platform.processor()) if v
    )
    return {
        "model": model or platform.machine(),
        "machine": platform.machine(),
        "flags_sha256": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16],
    }


def probe_cache_key(model_config: Mapping, shapes: Sequence[ProbeShape], threads: int | None = None) -> dict:
    """Everything the probe's answer depends on: this CPU, torch, the thread count, the model and the
    shapes that would be timed."""
    return {
        "format": _CACHE_FORMAT,
        "device": "cpu",
        "cpu": cpu_identity(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "model": dict(model_config),
        "shapes": [[s.batch, s.length, round(s.token_share, 6)] for s in shapes],
    }


def _cache_path(key: dict):
    from streamtrain.user_cache import cache_dir

    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / "precision" / f"{digest}.json"


def _read_cached(key: dict) -> CpuProbe | None:
    """The cached probe of `key`, or None: missing, unreadable, of another key or malformed all mean
    probing again."""
    path = _cache_path(key)
    if path is None:
        return None
    try:
        obj = json.loads(path.read_bytes())
        if obj["key"] != key:
            return None
        return _probe_from_record(obj["probe"], cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _probe_from_record(p: Mapping, cached: bool) -> CpuProbe:
    """A CpuProbe from its plain-values form (the cache file, a checkpoint); ValueError, KeyError or
    TypeError when it is not one."""
    probe = CpuProbe(
        precision=str(p["precision"]), ratio=float(p["ratio"]), noise=float(p["noise"]),
        margin=float(p["margin"]), rounds=int(p["rounds"]),
        shapes=tuple((int(b), int(t), float(w)) for b, t, w in p["shapes"]), cached=cached,
    )
    if probe.precision not in ("fp32", "bf16") or not math.isfinite(probe.ratio) or probe.ratio <= 0:
        raise ValueError(f"not a probe result: {dict(p)}")
    return probe


def _write_cached(key: dict, probe: CpuProbe) -> None:
    """Replace the cache entry atomically; a failure (read-only or full disk) only costs a probe later."""
    from streamtrain.dataset import atomic_write_bytes

    path = _cache_path(key)
    if path is None:
        return
    record = {"key": key, "probe": {**asdict(probe), "cached": False}}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    except OSError:
        pass


def probe_cpu_precision(
    run_step: Callable[[str, ProbeShape], None],
    shape_tokens: Mapping[tuple[int, int], int],
    model_config: Mapping,
    budget_s: float = PROBE_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> CpuProbe:
    """--amp on a CPU: the cached answer for this CPU, torch, thread count, model and shapes, else measure
    (`time_precisions`), decide (`decide_cpu_precision`) and cache it. `run_step` runs one forward +
    backward in a precision at a shape; `shape_tokens`: padded tokens per (B, T) of the training plan."""
    shapes = probe_shapes(shape_tokens)
    if not shapes:
        raise ValueError("the training plan has no batches to time")
    key = probe_cache_key(model_config, shapes)
    cached = _read_cached(key)
    if cached is not None:
        return cached
    costs, timed = time_precisions(run_step, shapes, budget_s=budget_s, clock=clock)
    precision, ratio, noise, margin = decide_cpu_precision(costs["fp32"], costs["bf16"])
    probe = CpuProbe(
        precision, ratio, noise, margin, len(costs["fp32"]),
        tuple((s.batch, s.length, round(s.token_share, 6)) for s in timed),
    )
    _write_cached(key, probe)
    return probe


def use_tf32_for_fp32(precision: str, device_type: str) -> bool:
    """Let fp32 matmuls on CUDA run on TF32 tensor cores (fp32 range, 10-bit mantissa products, fp32 sums):
    several times the fp32 rate from Ampere on, well within what training tolerates. PyTorch's default keeps
    full fp32 for bitwise reproducibility across GPUs. Only for fp32 on CUDA: the setting is process-wide,
    and on a CPU it would change nothing but other code's results. Returns whether it was set."""
    if precision != "fp32" or device_type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")  # also sets torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    return True


def autocast_for(precision: str, device_type: str):
    """The autocast context of `precision` on `device_type` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])


@dataclass
class Precision:
    name: str  # 'fp32' | 'bf16' | 'fp16'
    device_type: str  # 'cpu' | 'cuda'
    reason: str
    scaler: "torch.amp.GradScaler"
    rule: str = "default"  # how it was chosen: 'forced' (--precision), 'amp' (--amp) or 'default' (fp32)
    probe: CpuProbe | None = field(default=None)  # what --amp measured on a CPU

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self):
        return autocast_for(self.name, self.device_type)

    def record(self) -> dict:
        """The choice as plain values, for RUN/config.json and the checkpoint: a resumed --amp run reads
        it back instead of probing again."""
        return {
            "name": self.name,
            "device_type": self.device_type,
            "rule": self.rule,
            "reason": self.reason,
            "probe": None if self.probe is None else {
                **asdict(self.probe), "shapes": [list(s) for s in self.probe.shapes],
            },
        }


def build_precision(
    device: torch.device,
    amp: bool,
    forced: str | None,
    probe: Callable[[], CpuProbe] | None = None,
    recorded: Mapping | None = None,
) -> Precision:
    """The run's precision. `probe`: measures --amp on a CPU, called only when needed; `recorded`: the
    choice a resumed run's checkpoint holds (`Precision.record()`), which --amp keeps on the same kind of
    device instead of measuring again."""
    device_type = device.type
    rule = "forced" if forced is not None else ("amp" if amp else "default")
    cpu_probe = None
    if rule == "amp" and recorded is not None and recorded.get("rule") == "amp" and recorded.get("device_type") == device_type:
        name = str(recorded["name"])
        try:
            cpu_probe = _probe_from_record(recorded["probe"], cached=False) if recorded.get("probe") else None
        except (ValueError, KeyError, TypeError):
            cpu_probe = None
        then = f": bf16 measured {cpu_probe.ratio:.2f}x fp32 then" if cpu_probe is not None else ""
        reason = f"--amp: {name}, kept from the start of the run{then}"
    else:
        if rule == "amp" and device_type == "cpu" and probe is not None:
            cpu_probe = probe()
        bf16_cuda = device_type == "cuda" and torch.cuda.is_bf16_supported()
        name, reason = choose_precision(device_type, bf16_cuda, forced, amp, cpu_probe)
    if use_tf32_for_fp32(name, device_type):
        reason += "; matmuls on TF32 tensor cores"
    scaler = torch.amp.GradScaler(device_type, enabled=(name == "fp16"))
    return Precision(name, device_type, reason, scaler, rule, cpu_probe)

"""Time the fused CUDA kernels against torch on one GPU (not a unit test).

    python benchmarks/kernels.py [--json results.json] [--repeats 100] [--eager]

LayerNorm: achieved GB/s (bytes of x and y, plus residual and sum when fused, plus gamma
and beta) next to the same device's device-to-device copy GB/s for the same byte count
(``dst.copy_(src)`` of half the bytes: each byte is read once and written once), and
next to ``torch.nn.functional.layer_norm`` (after ``x + r`` when fused).
Attention: the fused kernel on the packed qkv tensor next to torch SDPA and to eager
matmul-softmax-matmul, both starting from the same packed tensor (the reshape/permute
into heads and back, as a user needs them, included), and SDPA alone on pre-permuted
contiguous q, k, v.

Every time is the median over ``--repeats`` samples of CUDA-event time per call, each
sample replaying a CUDA graph of 10 back-to-back calls (after warm-up), so that Python
and launch overheads do not count, for torch or for the kernels; ``--eager`` times plain
back-to-back calls instead. Targets: LayerNorm >= 80 % of copy bandwidth at >= 8 M
elements; attention >= 1.5x faster than SDPA (with the unpacking) at fp16, B=64, N=49,
heads=32, head_dim=32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trtvit_native import kernels  # noqa: E402

INNER = 10  # calls per timed sample


class Timer:
    """Median per-call milliseconds of a callable, by CUDA graph replay or eager calls."""

    def __init__(self, repeats: int, use_graphs: bool):
        self.repeats = repeats
        self.use_graphs = use_graphs
        self.fallbacks: List[str] = []

    def _graph(self, fn: Callable[[], object]) -> Callable[[], None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(INNER):
                fn()
        return graph.replay

    def __call__(self, name: str, fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        run = None
        if self.use_graphs:
            try:
                run = self._graph(fn)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager timing
                torch.cuda.synchronize()
                self.fallbacks.append(f"{name}: {type(e).__name__}: {e}")
        if run is None:
            def run():
                for _ in range(INNER):
                    fn()
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        samples = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / INNER)
        del run
        return statistics.median(samples)


def layernorm_case(timer: Timer, dtype: torch.dtype, rows: int, d: int, residual: bool) -> Dict:
    size = torch.finfo(dtype).bits // 8
    x = torch.randn(rows, d, device="cuda", dtype=dtype)
    r = torch.randn(rows, d, device="cuda", dtype=dtype)
    w = torch.randn(d, device="cuda", dtype=dtype) * 0.1 + 1
    b = torch.randn(d, device="cuda", dtype=dtype) * 0.1
    n = rows * d
    moved = (4 if residual else 2) * n * size + 2 * d * size
    kind = "layernorm" + ("+residual" if residual else "")
    if residual:
        ours = timer(kind, lambda: kernels.layernorm(x, w, b, residual=r))
        theirs = timer(f"torch {kind}", lambda: torch.nn.functional.layer_norm(x + r, (d,), w, b))
    else:
        ours = timer(kind, lambda: kernels.layernorm(x, w, b))
        theirs = timer(f"torch {kind}", lambda: torch.nn.functional.layer_norm(x, (d,), w, b))
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = timer("copy", lambda: dst.copy_(src))
    row = {"kernel": kind, "dtype": str(dtype)[6:], "rows": rows, "d": d, "elements": n, "bytes": moved,
           "ms": ours, "GBps": moved / ours / 1e6, "copy_ms": copy, "copy_GBps": moved / copy / 1e6,
           "torch_ms": theirs, "torch_GBps": moved / theirs / 1e6}
    row["fraction_of_copy"] = row["GBps"] / row["copy_GBps"]
    print(f"{kind:19s} {row['dtype']:8s} {rows:6d} x {d:5d} ({n / 1e6:5.1f} M): "
          f"{ours * 1e3:8.1f} us {row['GBps']:7.0f} GB/s = {100 * row['fraction_of_copy']:5.1f} % of copy "
          f"({row['copy_GBps']:.0f} GB/s); torch {theirs * 1e3:8.1f} us ({theirs / ours:.2f}x)", flush=True)
    return row


def bench_layernorm(timer: Timer) -> List[Dict]:
    shapes = [(64 * 49, 1024), (64 * 196, 512), (8192, 1024), (16384, 1024), (32768, 512), (65536, 512)]
    return [layernorm_case(timer, dtype, rows, d, residual)
            for dtype in (torch.float16, torch.float32) for rows, d in shapes for residual in (False, True)]


def attention_case(timer: Timer, dtype: torch.dtype, batch: int, tokens: int, heads: int, hd: int = 32) -> Dict:
    qkv = torch.randn(batch, tokens, 3 * heads * hd, device="cuda", dtype=dtype)

    def unpack():
        return qkv.reshape(batch, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4)

    def sdpa():
        q, k, v = unpack()
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(batch, tokens, heads * hd)

    def eager():
        q, k, v = unpack()
        p = (q @ k.transpose(-2, -1) * hd ** -0.5).softmax(-1)
        return (p @ v).transpose(1, 2).reshape(batch, tokens, heads * hd)

    q, k, v = (t.contiguous() for t in unpack())
    label = f"B{batch} N{tokens} H{heads} {str(dtype)[6:]}"
    ours = timer(f"attention {label}", lambda: kernels.attention(qkv, heads, hd))
    t_sdpa = timer(f"sdpa {label}", sdpa)
    t_sdpa_only = timer(f"sdpa alone {label}", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    t_eager = timer(f"eager {label}", eager)
    row = {"kernel": "attention", "dtype": str(dtype)[6:], "batch": batch, "tokens": tokens, "heads": heads,
           "head_dim": hd, "ms": ours, "sdpa_ms": t_sdpa, "sdpa_only_ms": t_sdpa_only, "eager_ms": t_eager,
           "bytes": qkv.numel() * qkv.element_size() * 4 // 3}  # qkv read, out written
    row["GBps"] = row["bytes"] / ours / 1e6
    print(f"attention {row['dtype']:8s} B {batch:2d} N {tokens:3d} heads {heads:2d}: "
          f"{ours * 1e3:8.1f} us ({row['GBps']:5.0f} GB/s); "
          f"SDPA+unpack {t_sdpa * 1e3:8.1f} us ({t_sdpa / ours:.2f}x), "
          f"SDPA alone {t_sdpa_only * 1e3:8.1f} us ({t_sdpa_only / ours:.2f}x), "
          f"eager {t_eager * 1e3:8.1f} us ({t_eager / ours:.2f}x)", flush=True)
    return row


def bench_attention(timer: Timer) -> List[Dict]:
    return [attention_case(timer, dtype, batch, tokens, heads)
            for dtype in (torch.float16, torch.float32) for batch in (1, 8, 64) for tokens in (49, 196)
            for heads in (16, 32)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed samples per measurement (median)")
    parser.add_argument("--eager", action="store_true", help="time eager back-to-back calls, not CUDA graphs")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    lib = kernels.load_kernel_library()
    timer = Timer(args.repeats, use_graphs=not args.eager)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = torch.cuda.get_device_name()
    method = "eager calls" if args.eager else f"CUDA graphs of {INNER} calls"
    print(f"{when}; {device}; torch {torch.__version__}; CUDA {torch.version.cuda}; {lib.path} "
          f"(version {lib.version()}); median of {args.repeats} samples, {method}", flush=True)
    ln = bench_layernorm(timer)
    att = bench_attention(timer)

    big = [r for r in ln if r["elements"] >= 8_000_000]
    worst = min(big, key=lambda r: r["fraction_of_copy"])
    ln_met = worst["fraction_of_copy"] >= 0.8
    target = next(r for r in att if r["dtype"] == "float16" and r["batch"] == 64 and r["tokens"] == 49
                  and r["heads"] == 32)
    speedup = target["sdpa_ms"] / target["ms"]
    print(f"target LayerNorm >= 80 % of copy at >= 8 M elements: worst {100 * worst['fraction_of_copy']:.1f} % "
          f"({worst['kernel']} {worst['dtype']} {worst['rows']}x{worst['d']}): {'met' if ln_met else 'MISSED'}")
    print(f"target attention >= 1.5x SDPA (fp16 B=64 N=49 heads=32): {speedup:.2f}x "
          f"(SDPA alone {target['sdpa_only_ms'] / target['ms']:.2f}x, eager {target['eager_ms'] / target['ms']:.2f}x): "
          f"{'met' if speedup >= 1.5 else 'MISSED'}")
    for note in timer.fallbacks:
        print(f"note: timed eagerly, graph capture failed for {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": when, "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "library": str(lib.path), "library_version": lib.version(), "method": method, "repeats": args.repeats,
            "layernorm": ln, "attention": att,
            "targets": {"layernorm_fraction_of_copy_worst": worst["fraction_of_copy"], "layernorm_met": ln_met,
                        "attention_speedup_vs_sdpa": speedup, "attention_met": speedup >= 1.5}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

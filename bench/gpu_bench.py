"""GPU benchmark of focal loss forward + backward at the CONTRACT §5 GPU shapes.

    python bench/gpu_bench.py --out DIR [--parts focal ece] [--shapes 8192x32000 ...] [--impls cuda ...]

Times (median of triton.testing.do_bench, inputs rotated past the L2 cache) the fused CUDA C++
and Triton kernels, the eager reference and torch.compile of it at gamma = 3 and FLSD-53; at
gamma = 0 also F.cross_entropy and Liger-Kernel's cross entropy when it is installed. Each step
is timed as called (host + device) and replayed from a CUDA graph (device only). Reports ms, GB/s
against the minimal traffic (read the logits once, write the gradient once: 2·N·C·bytes + 8·N),
the percentage of this run's own device-to-device copy bandwidth, speed-ups and peak extra memory.
Writes DIR/focal_loss.json and DIR/focal_loss.md; then ECE from logits against torchmetrics and
the eager reference (and the classwise ECE at C <= 1000), to DIR/ece.json and DIR/ece.md.
"""

import argparse
import datetime
import json
import os
import platform
from functools import partial

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import calibkernels as ck
from calibkernels import reference

GPU_SHAPES = [(65536, 10), (65536, 100), (65536, 1000), (8192, 32000), (8192, 128256),
              (4096, 262144)]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
GAMMAS = (3.0, "flsd-53", 0.0)  # 0: also F.cross_entropy and Liger's cross entropy
L2_BYTES = 50 * 2**20  # H100; inputs smaller than ~2x this are rotated


def copy_bandwidth():
    """Device-to-device copy GB/s (read + write counted) on 1 GiB, as the roofline of this run."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def liger_cross_entropy():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as fn
    except ImportError:
        return None
    return lambda x, t, gamma: fn(x, t)


def implementations(gamma, names=None):
    impls = {
        "cuda": lambda x, t, g: ck.focal_loss(x, t, gamma=g, backend="cuda"),
        "triton": lambda x, t, g: ck.focal_loss(x, t, gamma=g, backend="triton"),
    }
    # Opt-in (--impls cuda+compile ...): our op inside a compiled step, whose traced forward
    # writes the row statistics only and whose backward is the gradient phase (3 passes).
    for backend in ("cuda", "triton"):
        if names and f"{backend}+compile" in names:
            step = torch.compile(partial(ck.focal_loss, backend=backend), dynamic=False)
            impls[f"{backend}+compile"] = lambda x, t, g, step=step: step(x, t, gamma=g)
    if gamma == 0.0:
        impls["F.cross_entropy"] = lambda x, t, g: F.cross_entropy(x, t)
        liger = liger_cross_entropy()
        if liger is not None:
            impls["liger"] = liger
    else:
        torch._dynamo.reset()  # one fresh compile per shape: no recompile limit, no stale cache
        compiled = torch.compile(reference.focal_loss, dynamic=False)
        impls["eager"] = lambda x, t, g: reference.focal_loss(x, t, gamma=g)
        impls["compile"] = lambda x, t, g: compiled(x, t, gamma=g)
    return impls


def graph_ms(step, copies):
    """Median ms of one step replayed from a CUDA graph (every copy's step captured once): the
    device time without the host's. None where the implementation cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(copies):
                step()
        graph.replay()
        torch.cuda.synchronize()
        return do_bench(graph.replay, warmup=5, rep=100, return_mode="median") / copies
    except Exception as e:  # e.g. a host synchronisation inside the implementation
        torch.cuda.synchronize()
        print(f"  (no CUDA graph: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]})")
        return None


def bench_one(fn, n, c, dtype, gamma, graph=True):
    """Median ms of forward + backward, the same replayed from a CUDA graph, and the peak memory
    beyond the inputs and the gradient."""
    per_copy = n * c * torch.finfo(dtype).bits // 8
    copies = max(1, min(256, (2 * L2_BYTES) // per_copy + 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [(torch.randn(n, c, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
          for _ in range(copies)]
    ts = [torch.randint(0, c, (n,), device="cuda", generator=g) for _ in range(copies)]
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % copies
        return torch.autograd.grad(fn(xs[i], ts[i], gamma), xs[i])

    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grad = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - grad[0].numel() * grad[0].element_size()
    del grad
    ms = do_bench(step, warmup=10, rep=100, return_mode="median")
    replay = graph_ms(step, copies) if graph else None
    return ms, replay, max(0, extra)


def bench_ece(out, copy_gbps, shapes, impl_names=None):
    """Top-label ECE (15 bins) from logits: both fused backends against the eager reference and
    torchmetrics; at C <= 1000 also the classwise ECE of both backends and of the eager reference
    (impls "... classwise"). Those of impl_names only, when given; minimal traffic N·C·bytes + 8·N.
    Tables are rewritten after every shape."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    impls = {
        "cuda": lambda x, t: ck.ece(x, t, backend="cuda"),
        "triton": lambda x, t: ck.ece(x, t, backend="triton"),
        "eager": lambda x, t: reference.calibration_error(x, t),
        "torchmetrics": lambda x, t: multiclass_calibration_error(x, t, x.shape[1], n_bins=15),
    }
    classwise = {
        "cuda classwise": lambda x, t: ck.classwise_ece(x, t, backend="cuda"),
        "triton classwise": lambda x, t: ck.classwise_ece(x, t, backend="triton"),
        "eager classwise": lambda x, t: reference.classwise_ece(x, t),
    }
    rows = []
    for (n, c), (dname, dtype) in [(s, d) for s in shapes for d in DTYPES.items()]:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(n, c, device="cuda", generator=g) * 2).to(dtype)
        t = torch.randint(0, c, (n,), device="cuda", generator=g)
        minimal = n * c * x.element_size() + 8 * n
        results = {}
        todo = dict(impls, **(classwise if c <= 1000 else {}))
        todo = {k: v for k, v in todo.items() if impl_names is None or k in impl_names}
        for name, fn in todo.items():
            try:
                fn(x, t)
                ms = do_bench(lambda: fn(x, t), warmup=5, rep=50, return_mode="median")
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            results[name] = ms
            gbps = minimal / ms / 1e6
            rows.append(dict(n=n, c=c, dtype=dname, impl=name, ms=ms, gbps=gbps,
                             pct_copy=100 * gbps / copy_gbps))
            print(f"ece {n}x{c} {dname} {name}: {ms:.3f} ms {gbps:.0f} GB/s", flush=True)
        for r in rows[len(rows) - len(results):]:  # classwise against the eager classwise
            bases = ("eager classwise",) if r["impl"] in classwise else ("eager", "torchmetrics")
            for base in bases:
                if base in results:
                    r[f"speedup_vs_{base.split()[0]}"] = results[base] / r["ms"]
        del x, t
        torch.cuda.empty_cache()
        write_ece(out, copy_gbps, rows)
    return rows


def write_ece(out, copy_gbps, rows):
    with open(os.path.join(out, "ece.json"), "w") as f:
        json.dump(dict(meta=metadata(copy_gbps), rows=rows), f, indent=1)
    with open(os.path.join(out, "ece.md"), "w") as f:
        f.write(f"# ECE (15 bins, from logits) on {torch.cuda.get_device_name()}\n\n"
                "Top-label ECE; the \"classwise\" rows are the classwise ECE (C <= 1000), their "
                "speed-up against the eager classwise ECE.\n"
                f"Copy bandwidth of this run: {copy_gbps:.0f} GB/s; GB/s count N·C·bytes + 8·N."
                "\n\n| N × C | dtype | impl | ms | GB/s | % copy | vs eager | vs torchmetrics |\n"
                "|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            sp = [f"{r[k]:.1f}×" if k in r else "" for k in
                  ("speedup_vs_eager", "speedup_vs_torchmetrics")]
            f.write(f"| {r['n']} × {r['c']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | "
                    f"{r['gbps']:.0f} | {r['pct_copy']:.0f} | " + " | ".join(sp) + " |\n")


def metadata(copy_gbps):
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.date.today().isoformat(), python=platform.python_version(),
                copy_gbps=copy_gbps, note="median ms (triton.testing.do_bench)")


def write_focal(out, copy_gbps, rows):
    meta = metadata(copy_gbps)
    with open(os.path.join(out, "focal_loss.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(out, "focal_loss.md"), "w") as f:
        f.write(f"# Focal loss forward + backward on {meta['gpu']}\n\n"
                f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
                f"{meta['date']}. Copy bandwidth of this run: {copy_gbps:.0f} GB/s. GB/s count the "
                f"minimal traffic 2·N·C·bytes + 8·N.\n\n"
                "`graph ms` replays the step from a CUDA graph (device time without the host's); "
                "`% copy` and the speed-ups are from the eager `ms`.\n\n"
                "| N × C | dtype | γ | impl | ms | graph ms | GB/s | % copy | vs eager | "
                "vs compile | vs F.ce | vs liger | extra peak MiB |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            sp = [f"{r[k]:.2f}×" if k in r else "" for k in
                  ("speedup_vs_eager", "speedup_vs_compile", "speedup_vs_F.cross_entropy",
                   "speedup_vs_liger")]
            graph = f"{r['graph_ms']:.3f}" if r.get("graph_ms") is not None else ""
            f.write(f"| {r['n']} × {r['c']} | {r['dtype']} | {r['gamma']} | {r['impl']} | "
                    f"{r['ms']:.3f} | {graph} | {r['gbps']:.0f} | {r['pct_copy']:.0f} | "
                    + " | ".join(sp) + f" | {r['extra_peak_bytes'] / 2**20:.1f} |\n")


def bench_focal(out, copy_gbps, shapes, impl_names=None, graph=True):
    rows = []
    for (n, c), (dname, dtype), gamma in [(s, d, g) for s in shapes for d in DTYPES.items()
                                          for g in GAMMAS]:
        minimal = 2 * n * c * torch.finfo(dtype).bits // 8 + 8 * n
        results = {}
        for name, fn in implementations(gamma, impl_names).items():
            if impl_names and name not in impl_names:
                continue
            try:
                ms, replay, extra = bench_one(fn, n, c, dtype, gamma, graph)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{n}x{c} {dname} gamma={gamma} {name}: out of memory")
                continue
            except Exception as e:  # e.g. a compile path failing on this torch: the rest still run
                torch.cuda.synchronize()
                print(f"{n}x{c} {dname} gamma={gamma} {name}: FAILED {type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0][:200]}", flush=True)
                continue
            results[name] = ms
            gbps = minimal / ms / 1e6
            rows.append(dict(n=n, c=c, dtype=dname, gamma=gamma, impl=name, ms=ms, gbps=gbps,
                             pct_copy=100 * gbps / copy_gbps, extra_peak_bytes=extra,
                             graph_ms=replay))
            replay_txt = f", graph {replay:.3f} ms" if replay is not None else ""
            print(f"{n}x{c} {dname} gamma={gamma} {name}: {ms:.3f} ms{replay_txt} {gbps:.0f} GB/s "
                  f"({100 * gbps / copy_gbps:.0f}% of copy), extra peak {extra / 2**20:.1f} MiB",
                  flush=True)
            torch.cuda.empty_cache()
        for r in rows[-len(results):]:
            for base in ("eager", "compile", "F.cross_entropy", "liger"):
                if base in results:
                    r[f"speedup_vs_{base}"] = results[base] / r["ms"]
        write_focal(out, copy_gbps, rows)
    return rows


def run(out, parts=("focal", "ece"), shapes=GPU_SHAPES, impl_names=None, graph=True):
    os.makedirs(out, exist_ok=True)
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    if "ece" in parts:  # the quick part first
        bench_ece(out, copy_gbps, shapes, impl_names)
    if "focal" in parts:
        bench_focal(out, copy_gbps, shapes, impl_names, graph)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the .json and .md tables")
    parser.add_argument("--parts", nargs="+", default=["focal", "ece"], choices=["focal", "ece"])
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="NxC shapes (default: the CONTRACT §5 GPU shapes)")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="only these implementations, in both parts (and the opt-in "
                             "cuda+compile, triton+compile: the fused op inside torch.compile)")
    parser.add_argument("--no-graph", action="store_true",
                        help="skip the CUDA-graph replay timings (halves the run)")
    args = parser.parse_args()
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes
              else GPU_SHAPES)
    run(args.out, args.parts, shapes, args.impls, graph=not args.no_graph)

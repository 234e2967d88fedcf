"""What a forward costs on an accelerator, and how fast each strategy's plain-PyTorch loop runs there:
no vLLM needed, so it runs on a lent GPU machine (where vLLM cannot) as well as on this CPU.

    python benchmarks/bench_device.py            # CUDA when there is one, else the CPU
    python benchmarks/bench_device.py --quick    # a small smoke run (CPU-sized)

Step cost: LlamaGen models of the official sizes (random weights, bfloat16 on a GPU) run one
KV-cached forward of `tokens` query tokens per stream for 1, 16 and 64 guided images in flight (2
streams each) over 128 cached positions, the shape of an SJD or ZipAR step; eager, and replayed as
a CUDA graph (what vLLM's decode steps run on a GPU). This is the curve the load-aware windows
(`samplers/load.py`) learn on the running engine.

Reference loops: raster, ZipAR, SJD (+ continuation, + sibling candidates at the first draft: a
two-level draft tree, SJD-PAC's proactive drafting cut to its first level) and ZipAR x SJD from
`model_executors/llamagen_reference.py` on the embedded model (trained: real acceptance), one image in
flight and ZipAR/raster also with 16; and at the official sizes (random weights: only the time per
forward means something there, and the time per image is projected from the embedded model's
forwards per image). Times are wall-clock with the device synchronised.

Prints the tables and writes benchmarks/results/device-<device>.md (`--copy-to DIR` writes a copy).
It needs torch, transformers, safetensors and numpy, not vLLM. Where the package is not installed
(a lent GPU machine), lay it out as pip would and set BENCH_COMMIT (there is no git there):

    mkdir -p /tmp/pkg && cp -r vllm_visual_ar /tmp/pkg/ && cp -r model_executors samplers /tmp/pkg/vllm_visual_ar/
    PYTHONPATH=/tmp/pkg BENCH_COMMIT=<commit> python3 benchmarks/bench_device.py
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import machine, markdown_table, random_llamagen_reference, write_results  # noqa: E402

STRATEGIES = [  # (name, function name in llamagen_reference, kwargs), raster first
    ("raster", "generate", {}),
    ("ZipAR w=8", "generate_zipar", dict(window=8)),
    ("SJD L=16", "generate_sjd", dict(window=16)),
    ("SJD L=16 + 3 candidates at the first draft", "generate_sjd", dict(window=16, candidates=3)),
    ("SJD L=16 + continuation", "generate_sjd", dict(window=16, continued=True)),
    ("SJD L=16 + continuation + 3 candidates", "generate_sjd", dict(window=16, continued=True, candidates=3)),
    ("SJD L=32 + continuation", "generate_sjd", dict(window=32, continued=True)),
    ("ZipAR w=8 x SJD L=16 + continuation", "generate_zipar_sjd", dict(window=8, sjd_window=16, continued=True)),
]
BATCHED = ("generate", "generate_zipar")  # loops that take several images at once


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def forward_ms(fn, device, repeats: int) -> float:
    """Mean milliseconds of fn() over `repeats` calls after two warm-ups, device synchronised."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return 1000 * (time.perf_counter() - t0) / repeats


def graph_ms(fn, device, repeats: int) -> float | None:
    """fn() captured once as a CUDA graph, mean milliseconds per replay; None off CUDA or when the
    capture fails."""
    if device.type != "cuda":
        return None
    import torch

    try:
        return forward_ms(captured(fn, device), device, repeats)
    except Exception as e:  # noqa: BLE001 - a table cell, not a crash
        print(f"  CUDA graph capture failed: {type(e).__name__}: {e}", flush=True)
        return None


def forward_of(model, streams: int, tokens: int, context: int, device, dtype):
    """A function running one forward of `tokens` new tokens per stream after `context` cached
    positions (the cache set up for `streams`), logits for every token."""
    import torch

    cfg = model.config
    pos = torch.arange(cfg.cls_token_num + context, cfg.cls_token_num + context + tokens, device=device)
    h = torch.randn(streams, tokens, cfg.hidden_size, device=device, dtype=dtype)
    mask = model.causal_mask[None, None, pos]

    def step():
        with torch.no_grad():
            return model.step_masked(h, pos, mask)

    return step


def captured(fn, device):
    """fn() captured once as a CUDA graph -> its replay (raises where the capture fails)."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def step_cost(sizes, in_flight, tokens, context, device, dtype, repeats) -> tuple[str, list[str]]:
    """Per size, a table of ms per forward (eager / CUDA graph) against images in flight and tokens
    per stream, and a line with the fitted t = a + b n (n: tokens in the step)."""
    import numpy as np
    import torch

    out, fits = [], []
    for size in sizes:
        model = random_llamagen_reference(size, device=device, dtype=dtype)
        cfg = model.config
        rows, points = [], []
        for n_images in in_flight:
            streams = 2 * n_images
            model.setup_cache(streams, device=device, max_len=cfg.cls_token_num + context + max(tokens))
            row = [n_images]
            for t in tokens:
                step = forward_of(model, streams, t, context, device, dtype)
                eager = forward_ms(step, device, repeats)
                graph = graph_ms(step, device, repeats)
                best = graph if graph is not None else eager
                points.append((n_images, t, best))
                row.append(f"{eager:.2f}" + (f" / {graph:.2f}" if graph is not None else ""))
                print(f"{size} {n_images} in flight, {t} tokens/stream: eager {eager:.2f} ms"
                      + (f", graph {graph:.2f} ms" if graph is not None else ""), flush=True)
            rows.append(row)
        ms_at = {(i, t): ms for i, t, ms in points}
        n = np.array([2 * i * t for i, t, _ in points], dtype=float)
        b, a = np.polyfit(n, np.array([ms for *_, ms in points]), 1)
        line = (f"{size}: t = {a:.3f} ms + {1000 * b:.2f} us x tokens in the step (least squares over the "
                f"{'CUDA graph' if device.type == 'cuda' else 'eager'} times above)")
        one = ms_at[(1, 1)]
        if (1, 16) in ms_at:
            line += f"; one image at 16 tokens per stream: {ms_at[(1, 16)] / one:.2f}x its 1-token step"
        if (max(in_flight), 1) in ms_at:
            line += f"; {max(in_flight)} images at 1 token: {ms_at[(max(in_flight), 1)] / one:.2f}x"
        if (max(in_flight), 16) in ms_at:
            line += f"; {max(in_flight)} images at 16 tokens: {ms_at[(max(in_flight), 16)] / one:.2f}x"
        fits.append(line)
        header = ["images in flight (2 streams each)"] + [f"{t} tokens/stream, ms" for t in tokens]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        out.append(f"### {size} ({params:.0f} M parameters)\n\n" + markdown_table(header, rows))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n\n".join(out), fits


def policy_table(sizes, in_flight, device, dtype, window: int = 16, slope: float = 0.7, steps: int = 240) -> str:
    """The scheduler's load-aware policy (`samplers/load.WidthPolicy`, the engine's own code) learning
    on this device: each step's widths are the policy's, the step is a forward of that many tokens
    per stream (a CUDA graph replay per width, on CUDA), and its measured time is what the policy
    observes. Tokens committed per forward follow the embedded model's SJD yield, 1 + 0.7 ln w."""
    import math

    import numpy as np
    import torch

    from vllm_visual_ar.samplers.load import StepShape, WidthChoice, WidthPolicy

    rows = []
    for size in sizes:
        model = random_llamagen_reference(size, device=device, dtype=dtype)
        cfg = model.config
        for n_images in in_flight:
            streams, context = 2 * n_images, 128
            model.setup_cache(streams, device=device, max_len=cfg.cls_token_num + context + window)
            runs: dict[int, object] = {}

            def run(width):
                if width not in runs:
                    step = forward_of(model, streams, width, context, device, dtype)
                    # replayed as a CUDA graph, as vLLM's decode steps are
                    runs[width] = captured(step, device) if device.type == "cuda" else step
                sync(device)
                t0 = time.perf_counter()
                runs[width]()
                sync(device)
                return time.perf_counter() - t0

            policy, chosen, seconds = WidthPolicy(), [], 0.0
            for i in range(steps):
                widths = policy.widths([WidthChoice(window, slope, streams=2)] * n_images, StepShape(streams), 0)
                shape = StepShape(streams, sum(2 * (w - 1) for w in widths), sum(2 for w in widths if w > 1))
                t = run(max(widths))  # every image gets the same width here (same window and yield)
                policy.observe(shape, t)
                if i >= steps // 2:
                    chosen.append(max(widths))
                    seconds += t
            committed = sum(n_images * (1 + slope * math.log(w)) for w in chosen)
            rate = {w: n_images * (1 + slope * math.log(w)) / forward_ms(lambda w=w: run(w), device, 5) * 1000
                    for w in (1, 2, 4, 8, 12, 16)}
            best = max(rate, key=rate.get)
            m = policy.cost.marginal()
            widths_seen = sorted(set(chosen))
            rows.append([size, n_images, f"{np.median(chosen):.0f} ({widths_seen[0]}-{widths_seen[-1]})",
                         f"{committed / seconds / rate[1]:.2f}x", f"{rate[window] / rate[1]:.2f}x",
                         f"{best} ({rate[best] / rate[1]:.2f}x)",
                         f"{1e6 * m.draft:.1f} / {1e6 * m.wide_stream:.1f}" if m else "-"])
            print(rows[-1], flush=True)
            del runs
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = ["model", "images in flight (2 streams each)", "width chosen, median (range)",
              "tokens/s vs width 1, policy", f"pinned {window}", "best fixed width (its tokens/s)",
              "learned us per draft / per verifying stream"]
    return markdown_table(header, rows)


def run_loop(model, name, kwargs, classes, sampling, device, seed) -> tuple[float, int, float]:
    """(seconds, forwards per image, accepted drafts per verified draft or nan) of one call per
    image (or one call for all `classes`, for the loops that batch)."""
    import torch

    from vllm_visual_ar.model_executors import llamagen_reference as ref

    fn = getattr(ref, name)
    generator = torch.Generator(device).manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    if name in BATCHED:
        results = [fn(model, classes, generator=generator, **sampling, **kwargs)]
    else:
        results = [fn(model, c, generator=generator, **sampling, **kwargs) for c in classes]
    sync(device)
    seconds = time.perf_counter() - t0
    forwards = sum(r.forward_passes for r in results) / len(results)
    drafts = [r.extra["drafts"] for r in results if "drafts" in r.extra]
    verified = sum(d[0] for d in drafts)
    acceptance = sum(d[1] for d in drafts) / verified if verified else float("nan")
    return seconds, forwards, acceptance


def strategy_table(model, sampling, device, images: int, batch: int, projected: dict | None = None,
                   strategies=STRATEGIES) -> tuple[str, dict]:
    """One row per strategy: forwards/image, step compression, ms/image and ms/forward at one image
    in flight, latency gain over raster and that gain over the step compression, images/s with
    `batch` in flight (loops that batch). `projected`: forwards per image measured on a trained
    model, for a projected ms/image at this model's ms/forward (random weights)."""
    classes = [c % model.config.num_classes for c in range(images)]
    rows, forwards_of, base = [], {}, {}
    for label, name, kwargs in strategies:
        run_loop(model, name, kwargs, classes[:1], sampling, device, seed=123)  # warm-up
        seconds, forwards, acceptance = run_loop(model, name, kwargs, classes, sampling, device, seed=0)
        per_image = 1000 * seconds / images
        per_forward = per_image / forwards
        forwards_of[label] = forwards
        if projected is not None:
            per_image = per_forward * projected[label]
            forwards = projected[label]
        base.setdefault("forwards", forwards)
        base.setdefault("ms", per_image)
        compression = base["forwards"] / forwards
        gain = base["ms"] / per_image
        rate = "-"
        if name in BATCHED and batch > 1:
            batch_classes = [c % model.config.num_classes for c in range(batch)]
            run_loop(model, name, kwargs, batch_classes, sampling, device, seed=123)
            s, _, _ = run_loop(model, name, kwargs, batch_classes, sampling, device, seed=1)
            rate = batch / s
            base.setdefault("rate", rate)
            rate = f"{rate:.1f} ({rate / base['rate']:.2f}x)"
        shown = acceptance == acceptance and projected is None  # a random model's acceptance means nothing
        rows.append([label, f"{forwards:.1f}", f"{compression:.2f}", f"{acceptance:.3f}" if shown else "-", f"{per_forward:.2f}", f"{per_image:.0f}", f"{gain:.2f}x", f"{gain / compression:.2f}",
                     rate])
        print(rows[-1], flush=True)
    header = ["decoding", "forwards/image" + (" (embedded, projected)" if projected else ""), "step compression",
              "draft acceptance", "ms/forward", "ms/image, 1 in flight" + (" (projected)" if projected else ""),
              "latency gain", "gain / step compression", f"images/s, {batch} in flight"]
    return markdown_table(header, rows), forwards_of


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--quick", action="store_true", help="GPT-B only, fewer shapes and images (a CPU smoke run)")
    ap.add_argument("--sizes", nargs="+", default=None, help="official sizes for the step-cost tables")
    ap.add_argument("--loop-sizes", nargs="+", default=None, help="official sizes for the reference-loop tables")
    ap.add_argument("--copy-to", default=None, help="also write the results file into this folder")
    ap.add_argument("--load-policy", action="store_true",
                    help="only the load-aware policy learning on this device (device-<kind>-load.md)")
    args = ap.parse_args()

    import torch

    from vllm_visual_ar.model_executors.llamagen_reference import load_reference
    from vllm_visual_ar.models import EMBEDDED_MODEL_DIR

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.quick:
        sizes, loop_sizes, in_flight, tokens, repeats, images, batch = ["GPT-B"], [], [1, 16], [1, 4, 16], 3, 2, 4
    elif gpu:
        sizes, loop_sizes = ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"], ["GPT-B", "GPT-XL"]
        in_flight, tokens, repeats, images, batch = [1, 16, 64], [1, 2, 4, 8, 16, 32], 20, 16, 16
    else:  # a GPT-B forward of 64 guided images x 32 tokens takes seconds on a few CPU cores
        sizes, loop_sizes, in_flight, tokens, repeats, images, batch = ["GPT-B"], [], [1, 16], [1, 4, 16], 5, 8, 16
    sizes, loop_sizes = args.sizes or sizes, args.loop_sizes if args.loop_sizes is not None else loop_sizes
    accelerator = (f"{torch.cuda.get_device_name(device)} "
                   f"({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB), "
                   f"CUDA {torch.version.cuda}") if gpu else None
    print(machine(accelerator, str(dtype).removeprefix("torch.")), flush=True)

    kind = (torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-") if gpu else "cpu")
    if args.load_policy:
        sizes = args.sizes or (["GPT-B"] if args.quick or not gpu else ["GPT-B", "GPT-XL", "GPT-3B"])
        in_flight = [1, 16] if args.quick or not gpu else [1, 16, 64]
        t0 = time.perf_counter()
        table = policy_table(sizes, in_flight, device, dtype, steps=80 if args.quick else 240)
        print(f"total: {time.perf_counter() - t0:.0f} s", flush=True)
        notes = ("The load-aware policy (`samplers/load.WidthPolicy`, the code vLLM's scheduler runs) chooses every "
                 "step's SJD width for the images in flight (window 16); the step is one forward of that many "
                 "tokens per stream over 128 cached positions (random-weight LlamaGen of the given size, "
                 + ("replayed as a CUDA graph" if gpu else "eager") + "), and its measured time is what the policy "
                 "learns from, as the engine learns from its own steps. Tokens committed per forward are the "
                 "embedded model's measured SJD yield, 1 + 0.7 ln w (a random model accepts nothing). "
                 "'policy': its tokens per second over the second half of the steps, against width 1's; "
                 "'pinned' and 'best fixed width': widths 1, 2, 4, 8, 12, 16 timed after. The forward only: "
                 "no sampling, verification or vLLM scheduling, which the engine's steps add (accel.md, load.md).")
        path = write_results(f"device-{kind}-load" + ("-quick" if args.quick else ""),
                             "Load-aware SJD widths learned on " + (accelerator or "this CPU"), table, notes,
                             machine(accelerator, str(dtype).removeprefix("torch.")))
        print(open(path).read())
        if args.copy_to:
            os.makedirs(args.copy_to, exist_ok=True)
            shutil.copy(path, args.copy_to)
        return

    sections = []
    t0 = time.perf_counter()
    cost, fits = step_cost(sizes, in_flight, tokens, 128, device, dtype, repeats)
    sections.append("## Forward cost against tokens per step\n\nms per forward, eager" + (" / CUDA graph" if gpu else "")
                    + f" ({dtype}, 128 cached positions, logits for every token):\n\n" + cost + "\n\n"
                    + "\n".join(f"- {f}" for f in fits))
    print(f"step cost: {time.perf_counter() - t0:.0f} s", flush=True)

    embedded = load_reference(EMBEDDED_MODEL_DIR, device=str(device))
    cfg = embedded.config
    sampling = dict(guidance_scale=cfg.default_guidance_scale, temperature=1.0, top_k=cfg.default_top_k, top_p=1.0)
    table, forwards_of = strategy_table(embedded, sampling, device, images, batch)
    sections.append(f"## Reference loops, embedded model (float32; {images} images, one at a time)\n\n" + table)
    for size in loop_sizes:
        model = random_llamagen_reference(size, device=device, dtype=dtype)
        sampling = dict(guidance_scale=4.0, temperature=1.0, top_k=2000, top_p=1.0)
        try:
            table, _ = strategy_table(model, sampling, device, 2, batch, projected=forwards_of)
        except Exception as e:  # noqa: BLE001 - keep what was measured (a lent machine's minutes are few)
            print(f"{size} reference loops failed: {type(e).__name__}: {e}", flush=True)
            continue
        sections.append(f"## Reference loops, {size} ({dtype}, random weights; 2 images, one at a time)\n\n"
                        "forwards/image and ms/image are projected: the embedded model's forwards per image times "
                        "this model's ms per forward (a random model's drafts are not accepted as a trained "
                        f"model's are). images/s with {batch} in flight is measured.\n\n" + table)
        del model
    print(f"total: {time.perf_counter() - t0:.0f} s", flush=True)

    notes = ("Step cost: random-weight LlamaGen models (16x16 tokens, 16384 codes), one forward of the given "
             "tokens per stream at positions 128.. of the image, logits for every token (SJD and ZipAR need "
             "them), mean of the repeats after two warm-ups. Reference loops: the plain-PyTorch loops the "
             "engine is tested against (`model_executors/llamagen_reference.py`), each image's loop timed "
             "from start to its last token with the device synchronised; the model's default sampling "
             f"(embedded: guidance {cfg.default_guidance_scale}, top-k {cfg.default_top_k}; official sizes: "
             "guidance 4, top-k 2000), temperature 1. 'gain / step compression' is the share of the forwards "
             "saved that shows in latency. vLLM itself does not run here (no vLLM on the accelerator "
             "machine): the engine's own tables are accel.md, step.md, raster.md.")
    path = write_results(f"device-{kind}" + ("-quick" if args.quick else ""),
                         "Forward cost and reference-loop speed on " + (accelerator or "this CPU"),
                         "\n\n".join(sections), notes, machine(accelerator, str(dtype).removeprefix("torch.")))
    print(open(path).read())
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
        shutil.copy(path, args.copy_to)


if __name__ == "__main__":
    main()

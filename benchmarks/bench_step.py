"""Where one engine step's time goes, at one image in flight: raster, ZipAR, SJD and ZipAR x SJD on
the embedded model (or another LlamaGen folder / an official size with random weights).

    python benchmarks/bench_step.py [--model FOLDER | --gpt-size GPT-B] [--repeats 3]

Each part of the step is timed by wrapping the function that does it (a perf_counter pair per
call, about a microsecond): vLLM's scheduler and the plugin's scheduler half, input preparation
(vLLM's, then the strategy's plan and the masked-attention inputs), the model's forward (of which
the strategy's masked attention), the logits, vLLM's sampler, the strategy's verification, the
runner's own sampling glue (guidance mixing, token placement), and the output bookkeeping. Prints a
table of milliseconds per step and writes benchmarks/results/step.md (step-gpt-b.md, ...).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, as bench_raster

from common import markdown_table, write_results  # noqa: E402

SETTINGS = [
    ("raster", dict()),
    ("ZipAR w=8", dict(strategy="zipar", window=8)),
    ("SJD L=16", dict(strategy="sjd", window=16)),
    ("ZipAR w=8 x SJD L=16 + continuation", dict(strategy="zipar_sjd", window=8, sjd_window=16,
                                                 continue_after_reject=True)),
]

spent: dict[str, float] = collections.defaultdict(float)
fed: list[int] = []  # tokens each step's forward took (both streams)


def timed(owner, name: str, label: str) -> None:
    """Replace owner.name by a wrapper adding its wall time to spent[label]."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def instrument(model_dir: str) -> None:
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_visual_ar import worker
    from vllm_visual_ar.families import family_of, load_object
    from vllm_visual_ar.model_executors.masked_attention import MaskedAttention
    from vllm_visual_ar.samplers import strategy_class, strategy_names
    from vllm_visual_ar.scheduler import VisualARScheduler

    model = load_object(family_of(model_dir).model_class)
    timed(LLMEngine, "step", "step")
    timed(EngineCore, "step", "engine core step")
    timed(VisualARScheduler, "schedule", "schedule")
    schedule = VisualARScheduler.schedule

    def counted(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        if out.total_num_scheduled_tokens:
            fed.append(out.total_num_scheduled_tokens)
        return out

    VisualARScheduler.schedule = counted
    timed(VisualARScheduler, "update_from_output", "update from output")
    timed(GPUModelRunner, "execute_model", "execute model")
    timed(GPUModelRunner, "sample_tokens", "sample tokens")
    timed(GPUModelRunner, "_prepare_inputs", "prepare inputs (vLLM)")
    timed(worker.VisualARRunnerMixin, "_prepare_inputs", "prepare inputs")
    timed(worker.VisualARRunnerMixin, "_sample", "sample")
    timed(worker, "masked_attention_for", "masked attention inputs")
    timed(MaskedAttention, "apply", "masked attention")
    timed(model, "forward", "forward")
    timed(model, "compute_logits", "logits")
    timed(Sampler, "forward", "vLLM sampler")
    runners = {strategy_class(name).runner for name in strategy_names()} - {None}
    for runner in runners:
        timed(runner, "prepare", "strategy plan")
        timed(runner, "emit", "strategy verify")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a LlamaGen model folder (default: the embedded model)")
    ap.add_argument("--gpt-size", default=None, help="an official LlamaGen size with random weights (GPT-B, ...)")
    ap.add_argument("--repeats", type=int, default=3, help="images per setting, after one warm-up image")
    ap.add_argument("--only", nargs="+", default=None,
                    help="only the settings whose label starts with one of these (the results file then holds only them)")
    args = ap.parse_args()

    from vllm_visual_ar.models import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    if args.gpt_size:
        from common import random_llamagen_folder

        model_dir = random_llamagen_folder(args.gpt_size)
    instrument(model_dir)
    from vllm_visual_ar.generator import ImageGenerator

    engine = ImageGenerator(model_dir, max_images_in_flight=1)
    header = ["decoding", "forwards/image", "tokens fed/forward", "ms/step", "ms/image", "schedule + update",
              "prepare (vLLM)", "strategy plan", "masked-attention inputs", "forward (model)", "masked attention",
              "logits", "vLLM sampler", "strategy verify", "runner sampling glue", "rest of vLLM's step",
              "plugin's own share"]
    rows = []
    for label, decoding in SETTINGS:
        if args.only and not label.startswith(tuple(args.only)):
            continue
        engine.generate([3], seed=0, **decoding)  # warm-up
        spent.clear()
        fed.clear()
        forwards = 0
        t0 = time.perf_counter()
        for i in range(args.repeats):
            image = engine.generate([i % 10], seed=i, **decoding)[0]
            forwards += image.stats.forward_passes
        wall = time.perf_counter() - t0
        steps = forwards  # one image in flight: one engine step per forward
        ms = {k: v / steps * 1e3 for k, v in spent.items()}
        forward = ms["forward"] - ms.get("masked attention", 0.0)
        prepare_plugin = ms["prepare inputs"] - ms["prepare inputs (vLLM)"]
        plan = ms.get("strategy plan", 0.0)
        mask_inputs = ms.get("masked attention inputs", 0.0)
        verify = ms.get("strategy verify", 0.0)
        glue = ms["sample"] - ms["vLLM sampler"] - verify + (prepare_plugin - plan - mask_inputs)
        plugin = plan + mask_inputs + ms.get("masked attention", 0.0) + verify + glue
        accounted = (ms["schedule"] + ms["update from output"] + ms["prepare inputs (vLLM)"] + plan + mask_inputs
                     + ms["forward"] + ms["logits"] + ms["vLLM sampler"] + verify + glue)
        rest = ms["step"] - accounted
        rows.append([label, f"{forwards / args.repeats:.0f}", f"{sum(fed) / len(fed):.1f}", f"{ms['step']:.2f}",
                     f"{wall / args.repeats * 1e3:.0f}", f"{ms['schedule'] + ms['update from output']:.2f}",
                     f"{ms['prepare inputs (vLLM)']:.2f}", f"{plan:.2f}", f"{mask_inputs:.2f}", f"{forward:.2f}",
                     f"{ms.get('masked attention', 0.0):.2f}", f"{ms['logits']:.2f}", f"{ms['vLLM sampler']:.2f}",
                     f"{verify:.2f}", f"{glue:.2f}", f"{rest:.2f}", f"{plugin / ms['step']:.0%}"])
        print(rows[-1], flush=True)
    table = markdown_table(header, rows)
    print(table)
    name = "step" + ("-" + args.gpt_size.lower() if args.gpt_size else "")
    notes = ("One guided image in flight (cond and uncond streams), the model's default sampling, "
             f"{args.repeats} images per row after a warm-up; milliseconds per engine step. 'forward (model)' "
             "excludes the masked attention, which the row shows apart. 'runner sampling glue' is the plugin "
             "runner's own work around vLLM's sampler and the strategy (guidance mixing, token placement, the "
             "emitted-token table) plus the runner's share of input preparation outside the strategy's plan. "
             "'rest of vLLM's step' is the engine step's time outside every part named (vLLM's own model-runner "
             "and engine-core bookkeeping, output processing). 'plugin's own share': plan, masked-attention "
             "inputs and attention, verification and glue, as a share of the step.")
    print("wrote", write_results(name, "Where a decode step's time goes (one image in flight)", table, notes))


if __name__ == "__main__":
    main()

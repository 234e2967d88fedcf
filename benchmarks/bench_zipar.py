"""ZipAR row-parallel decoding against raster decoding, both in vLLM's engine, on the embedded model.

    python benchmarks/bench_zipar.py [--windows 16 8 4 2 1] [--in-flight 1 16] [--repeats 2] [--per-class 20]

For raster and each window: forward passes per image, tokens per forward, images/s with 1 and 16
guided images in flight (best of --repeats after a warm-up), and sample quality from the project's
evaluator (class agreement, Fréchet distance to held-out real digits). Everything runs in one
process, one engine, one configuration after the other. Prints a table and writes
benchmarks/results/zipar.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see bench_raster.py

from common import markdown_table, write_results  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[16, 8, 4, 2, 1])
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=20, help="images per class for the quality columns")
    args = ap.parse_args()

    import torch

    from vllm_visual_ar.evaluation import Evaluator
    from vllm_visual_ar.generator import ImageGenerator
    from vllm_visual_ar.mnist import from_model_space

    engine = ImageGenerator(max_images_in_flight=max(args.in_flight))
    cfg = engine.config
    sampling = dict(guidance_scale=cfg.default_guidance_scale, temperature=1.0, top_k=cfg.default_top_k, top_p=1.0)
    evaluator = Evaluator()
    quality_classes = [c for c in range(10) for _ in range(args.per_class)]

    def best_seconds(classes, decoding) -> float:
        engine.generate(classes, seed=0, **sampling, **decoding)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.generate(classes, seed=0, **sampling, **decoding)
            times.append(time.perf_counter() - t0)
        return min(times)

    configs = [("raster", {})] + [(f"ZipAR w={w}", dict(strategy="zipar", window=w)) for w in args.windows]
    rows, raster_rate = [], {}
    for name, decoding in configs:
        images = engine.generate(quality_classes, seed=0, **sampling, **decoding)
        forwards = images[0].stats.forward_passes
        codes = torch.stack([im.codes for im in images])
        q = evaluator(from_model_space(engine.vq.decode_codes(codes)), quality_classes)
        row = [name, forwards, f"{100 * (forwards / cfg.num_image_tokens - 1):+.1f}%",
               f"{images[0].stats.tokens_per_forward:.2f}"]
        for n in args.in_flight:
            rate = n / best_seconds([i % 10 for i in range(n)], decoding)
            raster_rate.setdefault(n, rate)
            row += [f"{rate:.2f}", f"{rate / raster_rate[n]:.2f}x"]
        row += [f"{q.class_agreement:.3f}", f"{q.frechet:.2f}"]
        rows.append(row)
        print(row, flush=True)

    header = ["decoding", "forwards/image", "vs raster", "tokens/forward"]
    for n in args.in_flight:
        header += [f"images/s, {n} in flight", "speed-up"]
    header += [f"class agreement ({len(quality_classes)} images)", "Fréchet distance"]
    table = markdown_table(header, rows)
    print(table)
    notes = (f"Embedded model (16x16 tokens, 1.1 M parameters), guided (scale {sampling['guidance_scale']}), temperature 1, "
             f"top-k {sampling['top_k']}; every configuration in vLLM's engine (in-process core, see "
             "bench_raster.md), same seeds. Forwards are counted per image from the engine's per-step outputs; "
             "ZipAR follows the authors' LlamaGen schedule (row 1 waits for row 0, so 2W + (H-2)w forwards). "
             "Speed-up is images/s against raster at the same number of images in flight, measured in this run. "
             "Fréchet distance: classifier features of the samples against 500 held-out real digits (real "
             "digits score 7.6, their VQ reconstructions 7.3).")
    print("wrote", write_results("zipar", "ZipAR row-parallel decoding vs raster, in vLLM", table, notes))


if __name__ == "__main__":
    main()

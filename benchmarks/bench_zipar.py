"""ZipAR row-parallel decoding against raster decoding, both in vLLM's engine, on the embedded model.

    python benchmarks/bench_zipar.py [--windows 16 8 4 2 1] [--in-flight 1 16] [--repeats 2] [--per-class 20]
                                     [--large-windows 8 4] (empty: skip the second table)

For raster and each window: forward passes per image, tokens per forward, images/s with 1 and 16
guided images in flight (at least 10 images, in rounds; the median of --repeats passes, each
speed-up against a raster pass just before it), and
sample quality from the project's evaluator (class agreement, Fréchet distance to held-out real
digits). A second table repeats the speed measurement, one guided image in flight, on a model of
LlamaGen GPT-B's size (111 M parameters, random weights: speed only), where a forward costs more
than vLLM's per-step work.
Everything runs in one process, one configuration after the other. Prints the tables and writes
benchmarks/results/zipar.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see bench_raster.py

from common import PAIRED_NOTE, compare_decodings, markdown_table, write_results  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[16, 8, 4, 2, 1])
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=20, help="images per class for the quality columns")
    ap.add_argument("--large-windows", type=int, nargs="*", default=[8, 4])
    args = ap.parse_args()

    from vllm_visual_ar.generator import ImageGenerator

    engine = ImageGenerator(max_images_in_flight=max(args.in_flight))
    configs = [("raster", {})] + [(f"ZipAR w={w}", dict(strategy="zipar", window=w)) for w in args.windows]
    table = compare_decodings(engine, configs, args.in_flight, args.repeats, args.per_class)
    if args.large_windows:
        table += "\n\n" + large_model_table(args.large_windows, args.repeats)
    print(table)
    notes = ("Embedded model (16x16 tokens, 1.1 M parameters), guided at the model's defaults (scale 2.0, top-k 32), "
             "temperature 1; every configuration in vLLM's engine (in-process core, see "
             "bench_raster.md), same seeds. Forwards are counted per image from the engine's per-step outputs; "
             "ZipAR follows the authors' LlamaGen schedule (row 1 waits for row 0, so 2W + (H-2)w forwards). "
             + PAIRED_NOTE + " "
             "Fréchet distance: classifier features of the samples against 500 held-out real digits (real "
             "digits score 7.6, their VQ reconstructions 7.3). Second table: LlamaGen GPT-B dimensions (12 layers, "
             "width 768, 12 heads, 16384 codes, 1000 classes), random weights, one guided image (two sequences) in "
             "flight, same engine settings.")
    print("wrote", write_results("zipar", "ZipAR row-parallel decoding vs raster, in vLLM", table, notes))


def large_model_table(windows: list[int], repeats: int) -> str:
    """images/s of raster and ZipAR on a GPT-B-sized model with random weights, one guided image."""
    import tempfile

    from vllm_visual_ar.generator import ImageGenerator
    from vllm_visual_ar.model_executors.convert import write_model_folder
    from vllm_visual_ar.model_executors.llamagen_config import LlamaGenConfig
    from vllm_visual_ar.model_executors.llamagen_reference import LlamaGenReference
    from vllm_visual_ar.model_executors.vq import VQConfig, VQModel

    vq = VQConfig(codebook_size=16384, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32)
    config = LlamaGenConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, codebook_size=16384,
                            num_classes=1000, image_grid=16, image_size=16 * vq.downsample, vq=vq.to_dict())
    folder = write_model_folder(tempfile.mkdtemp(prefix="gpt_b_random_"), config, LlamaGenReference(config).state_dict(),
                                VQModel(vq).state_dict())
    engine = ImageGenerator(folder, max_images_in_flight=1)
    sampling = dict(guidance_scale=4.0, top_k=2000)
    rows, raster = [], None
    for name, decoding in [("raster", {})] + [(f"ZipAR w={w}", dict(strategy="zipar", window=w)) for w in windows]:
        image = engine.generate([207], seed=0, **sampling, **decoding)[0]  # warm-up, and the forward count
        seconds = min(engine.generate([207], seed=0, **sampling, **decoding)[0].stats.seconds for _ in range(repeats))
        raster = raster or seconds
        rows.append([name, image.stats.forward_passes, f"{1 / seconds:.3f}", f"{raster / seconds:.2f}x",
                     f"{seconds / image.stats.forward_passes * 1e3:.1f}"])
        print(rows[-1], flush=True)
    return markdown_table(["decoding (GPT-B size, random weights)", "forwards/image", "images/s, 1 in flight",
                           "speed-up", "ms/forward"], rows)


if __name__ == "__main__":
    main()

"""Text-to-image decoding in vLLM's engine on the embedded text-to-image model (t2i-mnist, Lumina-mGPT's
layout): raster order, ZipAR, SJD and ZipAR x SJD (`--zipar-sjd window:sjd_window`), side by side in
one run.

    python benchmarks/bench_t2i.py [--zipar-windows 8 4] [--sjd-windows 16] [--zipar-sjd 8:8 4:8]
                                   [--in-flight 1 16] [--repeats 2] [--per-prompt 2]

For each decoding: forward passes per image, step compression (tokens per forward: the image's
tokens, ends of line and image end included, over its forwards), SJD's draft acceptance, images/s
with 1 and 16 guided images in flight (at least 10 images in rounds; the median of --repeats
passes) with the speed-up over raster (each pass against a raster pass just before it), and the
evaluator's class agreement and attribute agreement on captions that name a digit and an attribute ("a thick seven", "3 slanted to the left", ...).
A second table gives the forward counts on Lumina-mGPT's real 768x768 grid (48x48 codes), from the
schedule alone (no weights), next to the authors' figures. Prints the tables and writes
benchmarks/results/t2i.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see bench_raster.py

from common import PAIRED_NOTE, decoding_table, markdown_table, paired_rates, write_results  # noqa: E402

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# (caption template, the attribute bin it asks for): the evaluator measures that bin
# (`vllm_visual_ar/mnist.py::ATTRIBUTES`).
CAPTIONS = (("a thick {word}", "thick"), ("a thin {digit}", "thin"), ("the digit {word} slanted to the left", "left"),
            ("{digit} slanted to the right", "right"))


def quality_prompts(per_prompt: int) -> tuple[list[str], list[int], list[str]]:
    prompts, classes, attributes = [], [], []
    for c, word in enumerate(DIGITS):
        for template, attribute in CAPTIONS:
            prompts += [template.format(word=word, digit=c)] * per_prompt
            classes += [c] * per_prompt
            attributes += [attribute] * per_prompt
    return prompts, classes, attributes


def evaluator_images(images) -> "torch.Tensor":
    """Generated images (PIL, 32x32) -> the evaluator's [N, 1, 28, 28] in [0, 1]."""
    import numpy as np
    import torch

    x = torch.stack([torch.from_numpy(np.asarray(im.image.convert("L"), dtype=np.float32)) for im in images])
    return x[:, None, 2:-2, 2:-2] / 255


def compare(engine, configs, in_flight: list[int], repeats: int, per_prompt: int) -> str:
    from vllm_visual_ar.evaluation import Evaluator

    evaluator = Evaluator()
    sampling = dict(temperature=1.0)  # guidance, top-k, top-p: the model's defaults (config.json)
    prompts, classes, attributes = quality_prompts(per_prompt)
    texts = [f"the digit {w}" for w in DIGITS]

    def quality_images(decoding):
        images = engine.generate(prompts=prompts, seed=0, **sampling, **decoding)
        quality = evaluator(evaluator_images(images), classes, attributes)
        return images, [f"{quality.class_agreement:.3f}", f"{quality.attribute_agreement:.3f}"]

    return decoding_table(configs, engine.layout.num_tokens, in_flight, quality_images,
                          lambda n, decoding, base: paired_rates(engine, n, sampling, decoding, base, repeats,
                                                                 texts, "prompts"),
                          [f"class agreement ({len(prompts)} images)", "attribute agreement (chance 1/3)"])


def lumina_grid_table(windows: list[int]) -> str:
    """Forwards per 768x768 image on Lumina-mGPT's grid, from the schedules alone."""
    from vllm_visual_ar.samplers.zipar import forward_passes

    rows = [["raster", forward_passes(48, 48, 49, row_end=True), "2,357 (the image header sampled too)"]]
    paper = {16: "about 756 (-68%); the authors' formula W + (H-1)(w-1) = 753", 8: "377 (W + (H-1)(w-1))"}
    for w in windows:
        rows.append([f"ZipAR w={w}", forward_passes(48, 48, w, row_end=True), paper.get(w, "-")])
    rows.append(["SJD L=16", "depends on acceptance", "about 1,050 (SJD paper)"])
    return markdown_table(["decoding, Lumina-mGPT 768x768 (48x48 codes)", "our forwards/image",
                           "the papers / authors' code"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zipar-windows", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--sjd-windows", type=int, nargs="+", default=[16])
    ap.add_argument("--zipar-sjd", nargs="+", default=["8:8", "4:8"], help="ZipAR x SJD rows, window:sjd_window")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-prompt", type=int, default=2, help="images per caption for the quality columns")
    args = ap.parse_args()

    from vllm_visual_ar.generator import ImageGenerator

    engine = ImageGenerator("t2i-mnist", max_images_in_flight=max(args.in_flight))
    configs = ([("raster", {})] + [(f"ZipAR w={w}", dict(strategy="zipar", window=w)) for w in args.zipar_windows]
               + [(f"SJD L={w}", dict(strategy="sjd", window=w)) for w in args.sjd_windows])
    for pair in args.zipar_sjd:
        w, j = (int(v) for v in pair.split(":"))
        configs.append((f"ZipAR w={w} x SJD L={j}", dict(strategy="zipar_sjd", window=w, sjd_window=j)))
    table = compare(engine, configs, args.in_flight, args.repeats, args.per_prompt)
    grid = lumina_grid_table([16, 8])
    print(table + "\n\n" + grid)
    layout = engine.layout
    notes = (f"t2i-mnist ({layout.rows}x{layout.cols} codes at its default size, an end of line per row and the image "
             f"end: {layout.num_tokens} tokens per image), guided at the model's defaults (config.json), temperature 1; "
             "every configuration in vLLM's engine (in-process core), same seeds. Forwards are counted per image "
             "from the engine's per-step outputs (the prompt's forward included); raster spends a forward on each "
             "placed token too, as the original loops do. ZipAR follows the authors' Lumina-mGPT schedule (the window "
             "counts the row's leading token); ZipAR x SJD runs the same rows, each verifying an SJD window "
             "(`samplers/zipar_sjd.py`). " + PAIRED_NOTE
             + " Class agreement: the evaluator's classifier on the decoded 32x32 images (centre "
             "28x28); attribute agreement: the share whose measured bin (per-digit terciles of stroke width or "
             "slant) is the one the caption asks for.\n\nSecond table: the forward counts of a 768x768 Lumina-mGPT "
             "image follow from the schedule alone (`samplers/zipar.py::forward_passes`).")
    print("wrote", write_results("t2i", "Text-to-image: raster, ZipAR, SJD and ZipAR x SJD in vLLM (t2i-mnist)",
                                 table + "\n\n" + grid, notes))


if __name__ == "__main__":
    main()

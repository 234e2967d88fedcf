"""Speculative Jacobi Decoding against raster decoding, both in vLLM's engine, on the embedded model.

    python benchmarks/bench_sjd.py [--windows 4 8 16 32] [--inits random horizontal] [--in-flight 1 16]
                                   [--repeats 2] [--per-class 20] [--relaxed-deltas 0.05 0.1 0.2 0.4]

For raster and each (window, init): forward passes per image (step compression), tokens per forward
(mean accepted length), the share of drafts accepted, images/s with 1 and 16 guided images in
flight (at least 10 images, in rounds of that many; the median of --repeats passes, each speed-up
against a raster pass just before it), and the
evaluator's class agreement and Fréchet distance. Then the relaxed (LANTERN-style, not exact)
acceptance at L=16, horizontal init, for each delta: the quality/steps curve. One process, one engine, one
configuration after the other. Prints a table and writes benchmarks/results/sjd.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see bench_raster.py

from common import PAIRED_NOTE, compare_decodings, write_results  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--inits", nargs="+", default=["random", "horizontal"])
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=20, help="images per class for the quality columns")
    ap.add_argument("--relaxed-deltas", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4])
    args = ap.parse_args()

    from vllm_visual_ar.generator import ImageGenerator

    engine = ImageGenerator(max_images_in_flight=max(args.in_flight))
    configs = [("raster", {})] + [(f"SJD L={w} {init}", dict(strategy="sjd", window=w, init=init))
                                  for init in args.inits for w in args.windows]
    configs += [(f"SJD L=16 horizontal relaxed delta={d}", dict(strategy="sjd", window=16, init="horizontal",
                                                                relaxed_delta=d)) for d in args.relaxed_deltas]
    table = compare_decodings(engine, configs, args.in_flight, args.repeats, args.per_class)
    print(table)
    notes = ("Embedded model (16x16 tokens, 1.1 M parameters), guided at the model's defaults (scale 2.0, top-k 32), "
             "temperature 1; every configuration in vLLM's engine (in-process core, see bench_raster.md), same seeds. "
             "Forwards and tokens/forward are means over the quality images, counted from the engine's per-step "
             "outputs; draft acceptance = accepted drafts / drafts verified (a forward verifies min(L, tokens left) - 1 "
             "drafts). Exact SJD is exact in distribution, so its quality differences from raster are sampling noise; "
             "the relaxed rows (LANTERN-style acceptance, neighbours = the 16 nearest codes in the VQ latent space) "
             "trade exactness for steps. "
             + PAIRED_NOTE)
    print("wrote", write_results("sjd", "Speculative Jacobi Decoding vs raster, in vLLM", table, notes))


if __name__ == "__main__":
    main()

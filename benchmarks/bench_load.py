"""Load-aware SJD, ZipAR and ZipAR x SJD windows against raster, side by side, at 1, 16 and 64 guided images in flight.

    python benchmarks/bench_load.py [--in-flight 1 16 64 1] [--rounds 3]

One engine on the embedded model. For each number of images in flight, in the order given (the
default ends with 1 again: the policy must widen alone after a loaded run), every row runs once per
round, each right after a raster run of its own; a cell is the median over the rounds of the row's
images/s over that raster run's, with the range beside it. The row "raster (again)" is raster
against raster: its range is the noise of a cell. The load-aware policy keeps learning across the
whole run, as it does in a serving engine. Forwards per image show what the policy chose at each
load (256: width 1 throughout). Prints the table and writes benchmarks/results/load.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see bench_raster.py

from common import default_sampling, markdown_table, write_results  # noqa: E402


def configs() -> list[tuple[str, dict]]:
    sjd = dict(strategy="sjd", init="horizontal")
    return [("raster (again)", {}), ("raster, coupled", dict(coupled=True)),
            ("SJD L=16 (pinned)", dict(sjd, window=16)),
            ("SJD L=16, load-aware", dict(sjd, window=16, load_aware=True)),
            ("SJD L=16 + continuation, load-aware", dict(sjd, window=16, load_aware=True,
                                                         continue_after_reject=True)),
            ("SJD L=16 + coupled, load-aware", dict(sjd, window=16, load_aware=True, coupled=True)),
            ("SJD L=64, load-aware", dict(sjd, window=64, load_aware=True)),
            ("SJD L=64 + coupled, load-aware", dict(sjd, window=64, load_aware=True, coupled=True)),
            ("ZipAR w=4 (pinned)", dict(strategy="zipar", window=4)),
            ("ZipAR w=4, load-aware", dict(strategy="zipar", window=4, load_aware=True)),
            ("ZipAR w=8 (pinned)", dict(strategy="zipar", window=8)),
            ("ZipAR w=8, load-aware", dict(strategy="zipar", window=8, load_aware=True)),
            ("ZipAR w=4 rows paced (x SJD L=1), load-aware", dict(strategy="zipar_sjd", window=4, sjd_window=1,
                                                                  load_aware=True)),
            ("ZipAR w=8 x SJD L=16 (pinned)", dict(strategy="zipar_sjd", window=8, sjd_window=16)),
            ("ZipAR w=8 x SJD L=16, load-aware", dict(strategy="zipar_sjd", window=8, sjd_window=16, load_aware=True))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 16, 64, 1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-images", type=int, default=3, help="images per round at 1 in flight (one at a time)")
    ap.add_argument("--rows", nargs="+", default=None,
                    help="only the rows whose name contains one of these (raster always runs; prints, writes no file)")
    args = ap.parse_args()

    from vllm_visual_ar.generator import ImageGenerator

    engine = ImageGenerator(max_images_in_flight=max(args.in_flight))
    sampling = default_sampling(engine.config)
    rows = [(name, d) for name, d in configs()
            if args.rows is None or name.startswith("raster (") or any(k in name for k in args.rows)]
    for _, decoding in rows:  # warm-up: every path once
        engine.generate([0, 1], seed=0, **sampling, **decoding)

    def run(n: int, decoding: dict, seed: int) -> tuple[float, float]:
        """-> (images/s, forwards per image) of one round."""
        t0 = time.perf_counter()
        if n == 1:
            images = [engine.generate([c], seed=seed + c, **sampling, **decoding)[0] for c in range(args.single_images)]
        else:
            images = engine.generate([i % 10 for i in range(n)], seed=seed, **sampling, **decoding)
        seconds = time.perf_counter() - t0
        return len(images) / seconds, sum(im.stats.forward_passes for im in images) / len(images)

    # Each row runs right after a raster run of its own, and its speed-up is taken against that run:
    # a shared machine drifts by more than what separates the rows (raster's own 16-in-flight rate
    # moved by half across runs), and what drifts within a pair's few seconds is small. "raster
    # (again)" is raster against raster, the same way: the spread of its ratios is the noise.
    columns, header, raster_rates = [], ["decoding"], []
    for step, n in enumerate(args.in_flight):
        ratios: dict[str, list[float]] = {name: [] for name, _ in rows}
        rates: list[float] = []  # raster's
        forwards: dict[str, list[float]] = {name: [] for name, _ in rows}
        for r in range(args.rounds):
            for name, decoding in rows:
                seed = 1000 * r + 10 * step
                base, _ = run(n, {}, seed)
                rate, fw = run(n, decoding, seed)
                rates.append(base)
                ratios[name].append(rate / base)
                forwards[name].append(fw)
        column = {name: [f"{statistics.mean(forwards[name]):.1f}",
                         f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})"] for name, v in ratios.items()}
        columns.append(column)
        label = f"{n} in flight" + (" (after the loaded runs)" if n in args.in_flight[:step] else "")
        header += [f"forwards/image, {label}", f"vs raster, {label} (range)"]
        print(label, f"raster {statistics.median(rates):.2f} images/s", {name: c for name, c in column.items()},
              flush=True)
        raster_rates.append(statistics.median(rates))
    table = markdown_table(header, [[name] + sum((c[name] for c in columns), []) for name, _ in rows])
    table += "\n\nRaster's images/s (median of its runs): " + ", ".join(
        f"{rate:.2f} at {n} in flight" for rate, n in zip(raster_rates, args.in_flight)) + "."
    print(table)
    notes = (f"Embedded model (16x16 tokens, 1.1 M parameters), guided at the model's defaults, temperature 1; "
             f"vLLM's engine, in-process core, one engine for the whole run. Each cell: the median of {args.rounds} "
             f"rounds of the row's images/s over those of a raster run just before it (the range in brackets); "
             f"'raster (again)' is raster against raster, the noise of a cell; at 1 in flight a round is {args.single_images} images one "
             f"after the other, else one generate call of n images. 'pinned' runs its window at every step; "
             f"'load-aware' lets the scheduler choose each step's width (samplers/load.py), learning its cost model "
             f"on this engine's steps as the run goes (its state carries over from one column to the next): SJD's "
             f"width before every step; ZipAR's window when the image is admitted; ZipAR x SJD's setting when it is "
             f"admitted, then, where it keeps its own rows, whether each row starts early, before every step "
             f"('rows paced': sjd_window 1, ZipAR's rows on that wavefront).")
    if args.rows is not None:
        return
    print("wrote", write_results("load", "Load-aware SJD, ZipAR and ZipAR x SJD windows against raster, side by side",
                                 table, notes))


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmark scripts: engine environment, machine description, result tables.

Imported by every benchmark before vLLM, so the environment defaults below are in place when an
engine starts: a 1 GiB KV cache on CPU instead of 90% of RAM, no CPU pinning (shared machines)."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def machine(accelerator: str | None = None, dtype: str = "float32") -> str:
    """The CPU (and the accelerator a script ran on, if any), torch, vLLM where installed, dtype."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    try:
        import vllm

        software = f"torch {torch.__version__}, vllm {vllm.__version__}"
    except ImportError:
        software = f"torch {torch.__version__}, no vLLM"
    host = f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM"
    return f"{accelerator + '; ' if accelerator else ''}{host}; {software}, {dtype}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, table: str, notes: str = "", machine_line: str | None = None) -> str:
    """benchmarks/results/<name>.md: title, machine, date and commit (BENCH_COMMIT where the tree has no
    git, as on a lent accelerator machine), the table, the notes."""
    path = os.path.join(os.path.dirname(__file__), "results", f"{name}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = (f"# {title}\n\nMachine: {machine_line or machine()}\nDate: {time.strftime('%Y-%m-%d %H:%M')}, "
            f"commit {commit}\n\n{table}\n\n{notes}\n")
    with open(path, "w") as f:
        f.write(text)
    return path


def default_sampling(config) -> dict:
    """The model's own sampling defaults (guidance, top-k, top-p), temperature 1."""
    return dict(guidance_scale=config.default_guidance_scale, temperature=1.0, top_k=config.default_top_k,
                top_p=getattr(config, "default_top_p", 1.0))


def timed_pass(engine, n: int, sampling: dict, decoding: dict, items=range(10), key: str = "classes") -> float:
    """Images/s of one pass: at least 10 images, in rounds of n in flight (one round = one generate
    call, image i of a round asking for items[i % len(items)]: classes, or prompts with
    key="prompts"), so that a single image's luck does not decide the 1-in-flight figure."""
    items = list(items)
    rounds = max(1, -(-10 // n))
    t0 = time.perf_counter()
    for r in range(rounds):
        engine.generate(**{key: [items[(r * n + i) % len(items)] for i in range(n)]}, seed=r * n, **sampling,
                        **decoding)
    return rounds * n / (time.perf_counter() - t0)


def images_per_second(engine, n: int, sampling: dict, decoding: dict, repeats: int, items=range(10),
                      key: str = "classes") -> float:
    """Best of `repeats` passes (`timed_pass`) after a warm-up."""
    engine.generate(**{key: list(items)[: min(n, 10)]}, seed=0, **sampling, **decoding)  # warm-up
    return max(timed_pass(engine, n, sampling, decoding, items, key) for _ in range(repeats))


PAIRED_NOTE = ("Speed-up: each pass of a row runs right after a pass of the first row (raster) and is taken against "
               "it; the cell is the median over the passes, the range in brackets, and raster's own row is raster "
               "against raster, the noise of a speed-up. Images/s: the median of the row's passes.")


def paired_rates(engine, n: int, sampling: dict, decoding: dict, baseline: dict, repeats: int, items=range(10),
                 key: str = "classes") -> tuple[list[float], list[float]]:
    """-> (images/s of each of `repeats` passes of `decoding`, each over a pass of `baseline` run just
    before it). A shared machine drifts by more than what separates two decodings (raster's own rate
    moved by half across runs); within a pair's few seconds the drift is small, so a decoding's
    speed-up is read against its own baseline runs, not against the baseline's row."""
    engine.generate(**{key: list(items)[: min(n, 10)]}, seed=0, **sampling, **decoding)  # warm-up
    rates, ratios = [], []
    for _ in range(repeats):
        base = timed_pass(engine, n, sampling, baseline, items, key)
        rates.append(timed_pass(engine, n, sampling, decoding, items, key))
        ratios.append(rates[-1] / base)
    return rates, ratios


def sample_quality(engine, images, evaluator=None):
    """The evaluator's verdict (class agreement, Fréchet distance) on generated images."""
    import torch

    from vllm_visual_ar.evaluation import Evaluator
    from vllm_visual_ar.mnist import from_model_space

    codes = torch.stack([im.codes for im in images])
    return (evaluator or Evaluator())(from_model_space(engine.decode_codes(codes.flatten(1))),
                                      [im.class_id for im in images])


def decoding_table(configs: list[tuple[str, dict]], image_tokens: int, in_flight: list[int], quality_images,
                   rates, quality_header: list[str], efficiency_at: int | None = None) -> str:
    """A markdown table, one row per (name, decoding kwargs) in configs, the first being the
    baseline: forwards per image (mean), tokens per forward, SJD acceptance where there is some,
    then at each number of guided images in flight the images/s (median of the passes) and the
    speed-up over the baseline, each pass against a baseline pass run just before it (`rates(n,
    decoding, baseline)` -> (rates, ratios), `paired_rates`): the median ratio, with the range. The
    baseline's own row is the baseline against itself: the noise of a speed-up. Then the quality
    columns (`quality_images(decoding)` -> (images, [column values])). With `efficiency_at` n: the
    speed-up at n in flight divided by the step compression (the share of the forwards saved that
    shows in images/s)."""
    rows, baseline = [], configs[0][1]
    base_forwards = None
    for name, decoding in configs:
        images, quality = quality_images(decoding)
        forwards = sum(im.stats.forward_passes for im in images) / len(images)
        base_forwards = base_forwards or forwards
        drafts = sum(im.stats.draft_tokens for im in images)
        accepted = sum(im.stats.accepted_drafts for im in images)
        row = [name, f"{forwards:.1f}", f"{100 * (forwards / image_tokens - 1):+.1f}%",
               f"{image_tokens / forwards:.2f}", f"{accepted / drafts:.3f}" if drafts else "-"]
        for n in in_flight:
            rate, ratios = rates(n, decoding, baseline)
            speedup = statistics.median(ratios)
            row += [f"{statistics.median(rate):.2f}", f"{speedup:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"]
            if n == efficiency_at:
                row.append(f"{speedup / (base_forwards / forwards):.2f}")
        rows.append(row + quality)
        print(rows[-1], flush=True)
    header = ["decoding", "forwards/image", "vs raster", "tokens/forward", "draft acceptance"]
    for n in in_flight:
        header += [f"images/s, {n} in flight", "speed-up (range)"] + (
            ["speed-up / step compression"] if n == efficiency_at else [])
    return markdown_table(header + quality_header, rows)


def compare_decodings(engine, configs: list[tuple[str, dict]], in_flight: list[int], repeats: int,
                      per_class: int) -> str:
    """`decoding_table` for a class-conditional model: the model's default sampling, same seeds,
    and the evaluator's class agreement and Fréchet distance on `per_class` images per class."""
    from vllm_visual_ar.evaluation import Evaluator

    sampling = default_sampling(engine.config)
    evaluator = Evaluator()
    quality_classes = [c for c in range(10) for _ in range(per_class)]

    def quality_images(decoding):
        images = engine.generate(quality_classes, seed=0, **sampling, **decoding)
        q = sample_quality(engine, images, evaluator)
        return images, [f"{q.class_agreement:.3f}", f"{q.frechet:.2f}"]

    return decoding_table(configs, engine.config.num_image_tokens, in_flight, quality_images,
                          lambda n, decoding, base: paired_rates(engine, n, sampling, decoding, base, repeats),
                          [f"class agreement ({len(quality_classes)} images)", "Fréchet distance"])


_temporary_folders: list = []  # kept alive until the script ends, then removed


def random_llamagen_folder(gpt_size: str, seed: int = 0) -> str:
    """A LlamaGen class-to-image folder of an official size (`GPT_SIZES`: 16x16 tokens, 16384 codes,
    1000 classes) with random weights and a small VQ decoder, in a temporary folder removed when
    the script ends: its forwards cost what the real model's do, its images mean nothing. For speed
    tables only."""
    import tempfile

    from vllm_visual_ar.model_executors.convert import write_model_folder
    from vllm_visual_ar.model_executors.vq import VQModel

    model = random_llamagen_reference(gpt_size, seed)
    _temporary_folders.append(tempfile.TemporaryDirectory(prefix=f"{gpt_size.lower()}-"))
    return write_model_folder(_temporary_folders[-1].name, model.config, model.state_dict(),
                              VQModel(_small_vq()).state_dict())


def _small_vq():
    from vllm_visual_ar.model_executors.vq import VQConfig

    return VQConfig(codebook_size=16384, codebook_embed_dim=8, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                    z_channels=32, image_channels=3)


def random_llamagen_reference(gpt_size: str, seed: int = 0, device="cpu", dtype=None, image_grid: int = 16):
    """The plain-PyTorch LlamaGen model of an official size (`GPT_SIZES`: 16384 codes, 1000 classes)
    with random weights N(0, 0.02), built on `device`: what `random_llamagen_folder` writes."""
    import torch

    from vllm_visual_ar.model_executors.llamagen_config import GPT_SIZES, LlamaGenConfig
    from vllm_visual_ar.model_executors.llamagen_reference import LlamaGenReference

    size, vq = GPT_SIZES[gpt_size], _small_vq()
    config = LlamaGenConfig(hidden_size=size["dim"], num_hidden_layers=size["n_layer"],
                            num_attention_heads=size["n_head"], codebook_size=vq.codebook_size, num_classes=1000,
                            image_grid=image_grid, image_size=image_grid * vq.downsample, vq=vq.to_dict())
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaGenReference(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            if dtype is not None:  # the parameters only: Module.to(dtype) would make the complex RoPE table real
                p.data = p.data.to(dtype)
    return model.eval()

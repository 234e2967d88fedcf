"""How to build a vLLM engine that serves an image model: the plugin's scheduler and worker, no
tokenizer, and sizes taken from the model folder. Used by the offline API, the CLI and the tests."""
from __future__ import annotations

import os

from vllm_visual_ar.models import resolve_model_dir

SCHEDULER_CLS = "vllm_visual_ar.scheduler.VisualARScheduler"
WORKER_CLS = "vllm_visual_ar.worker.VisualARWorker"


def set_engine_env() -> None:
    """Environment defaults that must be in place before vLLM starts its engine process."""
    # The plugin wires into the V1 model runner; the V2 runner (default on GPU in 0.33) is not supported.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # On CPU, vLLM otherwise reserves 90% of RAM for KV cache; 1 GiB holds thousands of small images.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(model: str | None = None, max_images_in_flight: int = 16, **overrides) -> dict:
    """Keyword arguments for `vllm.LLM` / `EngineArgs`. Each guided image in flight takes two
    sequences (cond and uncond)."""
    from vllm_visual_ar.admission import image_need
    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.requests import Decoding
    from vllm_visual_ar.samplers import strategy_for

    model_dir = resolve_model_dir(model)
    config = family_of(model_dir).config(model_dir)
    # Room for every image in flight to take its widest step at once (for a next-scale family, its
    # largest scale, or a hand-off between two models that feeds every scale but the last).
    widest = max(image_need(config, decoding, True, block_size=16).tokens_per_step
                 for decoding in strategy_for(config, Decoding()).budget_decodings(config))
    kwargs = dict(
        model=model_dir,
        skip_tokenizer_init=not family_of(model_dir).takes_text,
        scheduler_cls=SCHEDULER_CLS,
        worker_cls=WORKER_CLS,
        max_num_seqs=2 * max_images_in_flight,
        max_model_len=config.max_position_embeddings,
        # A text model's prompt is prefilled in one step (the scheduler never splits a pair's step).
        max_num_batched_tokens=max(2048, 4 * max_images_in_flight, widest * max_images_in_flight,
                                   config.max_position_embeddings if family_of(model_dir).takes_text else 0),
        seed=0,
        # Image requests share no prefix worth caching (a one-token prompt), and a cached block is
        # matched by token ids alone, while a row-parallel strategy places the same ids at other
        # raster positions.
        enable_prefix_caching=False,
        # The plugin's runner returns a variable number of tokens per request and step,
        # which vLLM's async scheduling does not carry.
        async_scheduling=False,
    )
    # Eager mode everywhere: the plugin's runner changes positions, logits rows and attention per
    # step, which CUDA graphs captured for one-token decode batches would not see.
    kwargs["enforce_eager"] = True
    if is_cpu():
        # AVX2-only CPUs emulate bf16 slowly.
        kwargs["dtype"] = "float32"
    kwargs.update(overrides)
    return kwargs

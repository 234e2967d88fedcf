import contextlib
import os

# Before vLLM is imported anywhere: small KV cache, no CPU pinning, and the engine in this process
# so tests can look at the scheduler's state (free KV blocks, live requests).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import tiny_config, write_official_checkpoints  # noqa: E402

TINY_MAX_IMAGES = 4


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(folder, reference model): random tiny LlamaGen written in the official release layout and
    converted by the plugin's converter, so every engine test also exercises conversion."""
    from vllm_visual_ar.model_executors.convert import convert_llamagen

    root = tmp_path_factory.mktemp("tiny")
    config = tiny_config(grid=8)
    reference, gpt_pt, vq_pt = write_official_checkpoints(root, config)
    folder = convert_llamagen(str(gpt_pt), str(vq_pt), str(root / "converted"),
                              image_size=config.image_size, num_heads=config.num_attention_heads)
    return folder, reference


@pytest.fixture(scope="session")
def tiny_generator(tiny_model):
    """One engine for all tiny-model tests. Raw logits come back as logprobs so tests can compare
    the engine's logits with the reference model's."""
    from vllm_visual_ar.generator import ImageGenerator

    folder, _ = tiny_model
    return ImageGenerator(folder, max_images_in_flight=TINY_MAX_IMAGES,
                          max_logprobs=tiny_config().codebook_size, logprobs_mode="raw_logits")


@pytest.fixture(scope="session")
def make_generator():
    """Build extra in-process engines that live until the session ends: shutting an in-process
    engine down tears down vLLM's process-wide parallel state under the engines still in use."""
    from vllm_visual_ar.generator import ImageGenerator

    alive = []

    def make(*args, **kwargs):
        alive.append(ImageGenerator(*args, **kwargs))
        return alive[-1]

    yield make


def scheduler_of(generator):
    """The engine-core scheduler (in-process engine, see the environment above)."""
    return generator.llm.llm_engine.engine_core.engine_core.scheduler


def frozen_rows(beta, keep_rows: bool = False):
    """An absolute step-cost model (`load.RowCost`) that has learnt `beta` (a, b, c, p, q, f; the other
    streams' c', p' are 0 unless given) and learns nothing more: the engine's own steps would move it
    while a test runs. `keep_rows`: every image keeps its rows at admission, whatever the model would
    choose."""
    import numpy as np

    from vllm_visual_ar.samplers.load import RowCost, StepShape

    class FrozenRows(RowCost):
        def coefficients(self):
            return np.array([*beta, 0.0, 0.0][:8], dtype=float)

        def observe(self, shape, seconds):
            pass

        def choose(self, options, *args, **kwargs):
            return len(options) - 1 if keep_rows else super().choose(options, *args, **kwargs)

    rows = FrozenRows()
    rows._last = rows.features(StepShape(1))
    return rows


FREE_ROWS = (5e-3, 0, 0, 0, 0, 0)  # rows cost nothing: kept at admission, every row starts (ZipAR's rule)
COSTLY_ROWS = (5e-3, 0, 1e-2, 1e-2, 1e-2, 1e-2)  # a row costs more than a step: none starts early


@contextlib.contextmanager
def load_policy(generator, rows=None):
    """The engine's load policy with this row cost model (`load.RowCost`: admission and row starts),
    restored afterwards."""
    policy = scheduler_of(generator)._width_policy
    kept = policy.rows
    policy.rows = rows if rows is not None else policy.rows
    policy._since_rows = policy._since_plain = 0
    try:
        yield policy
    finally:
        policy.rows = kept
        policy._since_rows = policy._since_plain = 0


def step_until_done(engine, submit_at: dict[int, list] | None = None, each_step=None, max_steps: int = 2000):
    """Step the engine until nothing is left, adding (id, prompt, params) at the given step numbers
    and calling each_step() after every step; -> {request_id: final CompletionOutput}."""
    submit_at = submit_at or {}
    done = {}
    for step in range(max_steps):
        if not engine.has_unfinished_requests() and not any(k >= step for k in submit_at):
            break
        for rid, prompt, sp in submit_at.get(step, []):
            engine.add_request(rid, prompt, sp)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        if each_step is not None:
            each_step()
    assert not engine.has_unfinished_requests()
    return done


def finish_reasons(engine, requests: list, name: str) -> dict[str, str]:
    """Submit hand-made (prompt, params) requests together, step until none is left -> {request id:
    finish reason}; a request that never finishes fails the step limit."""
    submitted = {0: [(f"{name}-{i}", prompt, sp) for i, (prompt, sp) in enumerate(requests)]}
    return {rid: out.finish_reason for rid, out in step_until_done(engine, submitted, max_steps=50).items()}


def raw_logits(output, vocab: int) -> "torch.Tensor":
    """Raw logits per generated position [S, vocab] from vLLM's logprobs (engine built with
    logprobs_mode="raw_logits"); ids at or past `vocab` are dropped, ids not returned are NaN."""
    rows = []
    for step in output.outputs[0].logprobs:
        row = torch.full((vocab,), float("nan"))
        for token, lp in step.items():
            if token < vocab:
                row[token] = lp.logprob
        rows.append(row)
    return torch.stack(rows)


def rel_err(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Largest absolute difference relative to the largest magnitude of the expected `b`."""
    return ((a - b).abs().max() / b.abs().max()).item()


def t2i_reference(generator, hf_model, mix, text, guidance_scale, size=None, negative_prompt=None, window=None,
                  sjd_window=None, forwards=False):
    """A text-to-image family's greedy image from the plain-PyTorch loop over the transformers model
    (`model_executors/t2i_reference.py`: raster order, ZipAR's with `window`, ZipAR x SJD's with
    `sjd_window` too; with `forwards`, its forward count as a third value), with the family's
    prompts and layout as the engine builds them and the family's guidance `mix` as the test writes
    it out. -> (layout, generated tokens)."""
    from vllm_visual_ar.model_executors.t2i_reference import (generate_image_tokens, generate_zipar_image_tokens,
                                                              generate_zipar_sjd_image_tokens,
                                                              transformers_next_logits)
    from vllm_visual_ar.requests import prompt_pair

    cond, uncond, size = prompt_pair(generator.config, text, negative_prompt, size, generator.tokenizer)
    layout = generator.family.image_layout(generator.config, size)
    uncond = uncond if guidance_scale != 1.0 else None
    if window is None:
        tokens = generate_image_tokens(transformers_next_logits(hf_model), cond, uncond, layout, mix, guidance_scale,
                                       top_k=1)
        count = layout.num_tokens
    elif sjd_window is None:
        tokens, count = generate_zipar_image_tokens(hf_model, cond, uncond, layout, window, mix, guidance_scale)
    else:
        tokens, count = generate_zipar_sjd_image_tokens(hf_model, cond, uncond, layout, window, sjd_window, mix,
                                                        guidance_scale)
    return (layout, torch.tensor(tokens)) + ((count,) if forwards else ())


def chi_square_p(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """Chi-square goodness of fit of samples to the exact distribution over outcomes."""
    from scipy.stats import chisquare

    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert all(exact[s] > 0 for s in counts), "a sample the model gives probability 0"
    # Pool the outcomes expected fewer than 5 times into one bin.
    big = [s for s, p in exact.items() if p * n >= 5]
    observed = [counts.get(s, 0) for s in big] + [n - sum(counts.get(s, 0) for s in big)]
    expected = [exact[s] * n for s in big] + [n - sum(exact[s] * n for s in big)]
    return chisquare(observed, expected).pvalue


@pytest.fixture(scope="session")
def enumerable_model(tmp_path_factory, make_generator):
    """A random model with a 3-code codebook and a 2x2 grid: 81 possible images."""
    from tiny_models import TINY_VQ, tiny_config, write_tiny_model

    from vllm_visual_ar.model_executors.vq import VQConfig

    config = tiny_config(grid=2, vq=VQConfig(**{**TINY_VQ.to_dict(), "codebook_size": 3}))
    folder = tmp_path_factory.mktemp("enumerable")
    ref = write_tiny_model(folder, config, seed=4)
    return make_generator(str(folder), max_images_in_flight=64), ref


def enumerate_images(ref, class_id: int, guidance_scale: float, temperature: float, top_k: int) -> dict[tuple, float]:
    """The exact probability of every image of the enumerable model under raster sampling."""
    import itertools

    from vllm_visual_ar.samplers.sampling import target_probs

    cfg = ref.config
    seqs = torch.tensor(list(itertools.product(range(cfg.codebook_size), repeat=cfg.num_image_tokens)))
    with torch.no_grad():
        cond = ref(torch.full((len(seqs),), class_id), seqs[:, :-1])
        uncond = ref(torch.full((len(seqs),), cfg.num_classes), seqs[:, :-1])
    logits = uncond + guidance_scale * (cond - uncond)
    probs = torch.stack([target_probs(logits[:, i], temperature, top_k, 1.0) for i in range(seqs.shape[1])], 1)
    joint = probs.gather(2, seqs[:, :, None]).squeeze(2).prod(1)
    return {tuple(s.tolist()): float(p) for s, p in zip(seqs, joint)}

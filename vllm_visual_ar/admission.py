"""What an image reserves in the engine, whether an engine can ever hold it, and which waiting
images a step admits. Plain logic: the scheduler applies it to vLLM requests, and the offline API
and the HTTP endpoint use it to refuse an image that could never run before it reaches the engine.

An image's length is fixed, so the scheduler reserves everything it will need at admission (see
`scheduler.py`): one sequence per stream, the KV blocks of the whole image and its look-ahead, and
the widest step's tokens, as its decoding strategy states them (`Strategy.footprint`: ZipAR counts
its stand-ins and every active row, SJD one window of look-ahead and the window), so a running image
never waits for memory and a guided pair is never split.

Admission rule (bounded unfairness): waiting images are considered in arrival order and each one
that fits in what is left is admitted, so an image that does not fit yet does not hold back later
ones that do. Each time a later image is admitted past a waiting one, the waiting one counts an
overtake; once it has been overtaken `max_overtakes` times, nothing behind it is admitted until it
is. Since nothing running ever grows past its reservation and every image ends, the engine then
drains until it fits, so no image waits forever and a large one waits for at most `max_overtakes`
smaller ones. An image that would not fit in an empty engine is refused at once (`cannot_fit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

from vllm_visual_ar.phase_kv import blocks_needed, expected_layout


@dataclass(frozen=True)
class Need:
    """Engine resources: sequences, tokens in one step, KV blocks."""
    sequences: int = 0
    tokens_per_step: int = 0
    kv_blocks: int = 0

    def __add__(self, other: "Need") -> "Need":
        return Need(self.sequences + other.sequences, self.tokens_per_step + other.tokens_per_step,
                    self.kv_blocks + other.kv_blocks)

    def __sub__(self, other: "Need") -> "Need":
        return Need(self.sequences - other.sequences, self.tokens_per_step - other.tokens_per_step,
                    self.kv_blocks - other.kv_blocks)

    def fits_in(self, room: "Need") -> bool:
        return (self.sequences <= room.sequences and self.tokens_per_step <= room.tokens_per_step
                and self.kv_blocks <= room.kv_blocks)


def footprint_need(prompt_tokens: int, footprint, kv_layout, lookahead: int | None = None) -> Need:
    """One stream, from its strategy's footprint (`samplers/strategy.py::Footprint`): KV for its
    prompt, every token it appends and its look-ahead, in the engine's KV cache groups (`kv_layout`,
    `phase_kv.py`: a stream of a phased model holds only its phase's groups at a time); the token
    budget of its widest step (the prefill included). `lookahead` overrides the strategy's (an engine
    with a speculative method of vLLM's own)."""
    lookahead = footprint.lookahead if lookahead is None else lookahead
    tokens = prompt_tokens + footprint.tokens + lookahead
    phase_tokens = ({p: min(n + lookahead, tokens) for p, n in footprint.phase_tokens.items()}
                    if footprint.phase_tokens else None)
    return Need(1, max(prompt_tokens, footprint.widest_step), blocks_needed(kv_layout, tokens, phase_tokens))


def image_need(config, decoding, guided: bool, block_size: int, prompt_tokens: int = 1, size=None) -> Need:
    """What one image of a model config asks of the engine, as the scheduler will reserve it: its
    strategy's footprint (`samplers/`), per stream (each taken with the longer prompt), in the KV
    cache groups vLLM forms for the model."""
    from vllm_visual_ar.families import image_layout
    from vllm_visual_ar.samplers import strategy_for

    footprint = strategy_for(config, decoding)(config, decoding, size).footprint(image_layout(config, size).num_tokens)
    layout = expected_layout(getattr(config, "kv_phases", {}), block_size)
    one = footprint_need(prompt_tokens, footprint, layout)
    return one + one if guided else one


@dataclass(frozen=True)
class EngineLimits:
    room: Need          # what an idle engine has
    max_model_len: int
    block_size: int


def engine_limits(vllm_config) -> EngineLimits:
    """From a VllmConfig whose KV cache has been sized (the engine has started)."""
    sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
    seqs = min(sched.max_num_seqs, getattr(sched, "max_num_active_seqs", None) or sched.max_num_seqs)
    tokens = getattr(sched, "max_num_scheduled_tokens", None) or sched.max_num_batched_tokens
    # vLLM's block pool keeps one null block; an unsized cache (not expected) refuses nothing.
    blocks = cache.num_gpu_blocks - 1 if cache.num_gpu_blocks else 2**62
    return EngineLimits(Need(seqs, tokens, blocks), vllm_config.model_config.max_model_len, cache.block_size)


def cannot_fit(need: Need, room: Need) -> str | None:
    """Why an image with this need can never be scheduled in an engine with this room, or None."""
    problems = []
    if need.sequences > room.sequences:
        problems.append(f"{need.sequences} sequences (the engine runs at most {room.sequences}: max_num_seqs)")
    if need.tokens_per_step > room.tokens_per_step:
        problems.append(f"{need.tokens_per_step} tokens in one step (the engine schedules at most "
                        f"{room.tokens_per_step}: max_num_batched_tokens; use a smaller window)")
    if need.kv_blocks > room.kv_blocks:
        problems.append(f"{need.kv_blocks} KV cache blocks (the engine has {room.kv_blocks})")
    if not problems:
        return None
    return "this image can never be scheduled by this engine: it needs " + " and ".join(problems)


def image_cannot_fit(vllm_config, config, decoding, guided: bool, size=None, prompt_tokens: int = 1) -> str | None:
    """Why one image could never be scheduled by the started engine of `vllm_config`, or None:
    the check the offline API and the endpoint make before submitting."""
    from vllm_visual_ar.families import image_layout

    limits = engine_limits(vllm_config)
    longest = prompt_tokens + image_layout(config, size).num_tokens
    if longest > limits.max_model_len:
        return (f"this image can never be scheduled by this engine: its prompt and image take {longest} "
                f"tokens, more than max_model_len {limits.max_model_len}")
    return cannot_fit(image_need(config, decoding, guided, limits.block_size, prompt_tokens, size), limits.room)


def admit(groups: Sequence[tuple[Hashable, Need]], room: Need, overtaken: dict, max_overtakes: int) -> list:
    """Waiting groups [(key, need)] in arrival order, the room left this step, and how often each
    waiting group has been overtaken so far (updated in place) -> the keys admitted this step."""
    admitted, passed = [], []  # passed: waiting groups that did not fit
    for key, need in groups:
        if any(overtaken.get(k, 0) >= max_overtakes for k in passed):
            break  # an image overtaken often enough: nothing more goes ahead of it
        if need.fits_in(room):
            room = room - need
            admitted.append(key)
            overtaken.pop(key, None)
            for k in passed:
                overtaken[k] = overtaken.get(k, 0) + 1
        else:
            passed.append(key)
    return admitted

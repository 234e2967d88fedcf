"""The plugin's request format: how an image becomes vLLM requests, and how the engine reads them back.

An unguided image (guidance_scale == 1) is one request. A guided image is two requests, one per
classifier-free-guidance stream, that the plugin scheduler runs in lockstep and the runner samples
as one:

    cond:   TokensPrompt([class_token]),      extra_args["visual_ar"] = {"image_id": ID, "role": "cond", "guidance_scale": s}
    uncond: TokensPrompt([null_class_token]), extra_args["visual_ar"] = {"image_id": ID, "role": "uncond", "guidance_scale": s}

Both carry the same max_tokens (the image's token count); the cond request carries the sampling
settings and the seed. Optional keys choose the decoding order, the same on both halves:
"strategy": "raster" (default) or "zipar" with "window": w (`Decoding`). A ZipAR request must ask
for the whole image (max_tokens = the image's token count) and no logprobs; its tokens still come
back in raster order. `image_requests` builds all of this, for `LLM.generate` or the engine client.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, replace

from vllm_visual_ar.samplers.sjd import DEFAULT_WINDOW, check_init, check_relaxed, check_sjd_window
from vllm_visual_ar.samplers.zipar import check_window

EXTRA_ARGS_KEY = "visual_ar"
ROLES = ("single", "cond", "uncond")
STRATEGIES = ("raster", "zipar", "sjd", "code")
# PyTorch's CPU generator (mt19937) keeps only the low 32 bits of a seed (seeds 0 and 2**32 draw the
# same numbers), so larger seeds could not all give distinct images.
MAX_SEED = 2**32 - 1
# Guidance is bounded so that s * (cond - uncond) stays finite in float32 (no model of these
# families is sampled anywhere near it); temperature by vLLM's own SamplingParams limit.
MAX_GUIDANCE_SCALE = 100.0
MAX_TEMPERATURE = 2.0


def check_number(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open), or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            (low < value if low_open else low <= value) and value <= high):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {short(value)}")
    return float(value)


def check_seed(seed, images: int = 1) -> int | None:
    """None or an integer with seed .. seed + images - 1 in [0, MAX_SEED] (image i uses seed + i)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - (images - 1):
        top = f"{MAX_SEED - images + 1}] for {images} images (image i uses seed + i" if images > 1 else str(MAX_SEED)
        raise ValueError(f"seed must be an integer in [0, {top}], got {short(seed)}")
    return seed


def short(value, limit: int = 80) -> str:
    """repr for error messages, bounded in length and depth (the value may be anything a client sent)."""
    import reprlib

    shown = reprlib.Repr()  # attributes, not keywords: Python 3.10 and 3.11 take none
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlong = 2, limit, limit, 40
    text = shown.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Decoding:
    """How an image's tokens are decoded: "raster" (one token per forward), "zipar" (row-parallel: a
    row starts once the row above has `window` tokens; `samplers/zipar.py`) or "sjd" (speculative
    Jacobi decoding: `window` tokens verified per forward, drafts initialised by `init`;
    `samplers/sjd.py`). SJD's window defaults to 16 and its init to "random"; `relaxed_delta` turns on
    relaxed (LANTERN-style, not exact) acceptance over `relaxed_neighbours` latent neighbours.
    "code" (VAR models with a CoDe refiner, `samplers/next_scale.py`): the drafter decodes the first
    `draft_steps` scales, the refiner the rest; "raster" on a VAR model is its plain next-scale order."""
    strategy: str = "raster"
    window: int | None = None
    init: str | None = None
    relaxed_delta: float | None = None
    relaxed_neighbours: int | None = None
    draft_steps: int | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {short(self.strategy)}")
        if self.strategy == "zipar":
            check_window(self.window)
        elif self.strategy == "sjd":
            object.__setattr__(self, "window", check_sjd_window(DEFAULT_WINDOW if self.window is None else self.window))
            object.__setattr__(self, "init", check_init("random" if self.init is None else self.init))
        elif self.window is not None:
            raise ValueError(f"window applies to strategies 'zipar' and 'sjd' only, got window={short(self.window)} "
                             f"with strategy {self.strategy!r}")
        if self.strategy != "sjd" and self.init is not None:
            raise ValueError(f"init applies to strategy 'sjd' only, got init={short(self.init)}")
        if self.strategy != "sjd" and (self.relaxed_delta, self.relaxed_neighbours) != (None, None):
            raise ValueError("relaxed_delta and relaxed_neighbours apply to strategy 'sjd' only")
        if self.strategy == "code":
            n = self.draft_steps
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"draft_steps must be an integer >= 1 (CoDe: scales the drafter decodes), got {short(n)}")
        elif self.draft_steps is not None:
            raise ValueError(f"draft_steps applies to strategy 'code' only, got draft_steps={short(self.draft_steps)} "
                             f"with strategy {self.strategy!r}")
        delta, neighbours = check_relaxed(self.relaxed_delta, self.relaxed_neighbours)
        object.__setattr__(self, "relaxed_delta", delta)
        object.__setattr__(self, "relaxed_neighbours", neighbours)

    def fitted(self, config) -> "Decoding":
        """The same decoding with its sizes cut to what an image of `config` can use: a ZipAR window
        beyond the grid width is raster order, an SJD window beyond the image verifies the whole
        image, and no code has more latent neighbours than the other codes."""
        window = self.window
        if window is not None:
            window = min(window, config.image_grid if self.strategy == "zipar" else config.num_image_tokens)
        neighbours = self.relaxed_neighbours
        if neighbours is not None:
            neighbours = min(neighbours, max(1, config.codebook_size - 1))
        return replace(self, window=window, relaxed_neighbours=neighbours)

    def to_args(self) -> dict:
        args = {"strategy": self.strategy, "window": self.window, "init": self.init,
                "relaxed_delta": self.relaxed_delta, "relaxed_neighbours": self.relaxed_neighbours,
                "draft_steps": self.draft_steps}
        return {k: v for k, v in args.items() if v is not None}


@dataclass(frozen=True)
class ImageRequestInfo:
    image_id: str
    role: str  # "single", "cond" or "uncond"
    guidance_scale: float
    decoding: Decoding = Decoding()

    @property
    def guided(self) -> bool:
        return self.role != "single"


def image_request_info(sampling_params) -> ImageRequestInfo | None:
    """What the plugin needs to know about a request; None for a request that is not one of ours.
    Raises ValueError for a malformed `visual_ar` entry."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    info = extra.get(EXTRA_ARGS_KEY)
    if info is None:
        return None
    try:
        parsed = ImageRequestInfo(str(info["image_id"]), info.get("role", "single"),
                                  check_number(info.get("guidance_scale", 1.0), "guidance_scale", 0, MAX_GUIDANCE_SCALE))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed extra_args[{EXTRA_ARGS_KEY!r}]: {short(info)}") from e
    decoding = Decoding(info.get("strategy", "raster"), info.get("window"), info.get("init"),
                        info.get("relaxed_delta"), info.get("relaxed_neighbours"), info.get("draft_steps"))
    parsed = ImageRequestInfo(parsed.image_id, parsed.role, parsed.guidance_scale, decoding)
    if parsed.role not in ROLES:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]['role'] must be one of {ROLES}, got {short(parsed.role)}")
    return parsed


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling settings of one image, validated. top_k 0 and top_p 1 switch those filters off;
    temperature 0 (or top_k 1) is greedy."""
    guidance_scale: float = 4.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # The scale that means "no guidance" in the model family's convention (`families.py`):
    # LlamaGen's uncond + s (cond - uncond) at s = 1, VAR's (1 + t) cond - t uncond at t = 0.
    unguided_scale: float = 1.0

    def __post_init__(self):
        check_number(self.guidance_scale, "guidance_scale", 0, MAX_GUIDANCE_SCALE)
        check_number(self.temperature, "temperature", 0, MAX_TEMPERATURE)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {short(self.top_k)}")
        check_number(self.top_p, "top_p", 0, 1, low_open=True)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != self.unguided_scale


def validate_class_id(config, class_id) -> int:
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < config.num_classes:
        raise ValueError(f"class {short(class_id)} is not one of this model's classes (0..{config.num_classes - 1})")
    return class_id


def image_requests(config, class_id: int, settings: SamplingSettings, seed: int | None = None,
                   image_id: str | None = None, decoding: Decoding = Decoding()) -> list[tuple[dict, "object"]]:
    """-> [(prompt, SamplingParams)] for one image: one pair for a guided image, one entry otherwise."""
    from vllm import SamplingParams

    validate_class_id(config, class_id)
    check_seed(seed)
    decoding = decoding.fitted(config)
    image_id = image_id or uuid.uuid4().hex
    greedy = settings.temperature == 0 or settings.top_k == 1

    def params(role: str, with_seed: bool) -> SamplingParams:
        return SamplingParams(
            max_tokens=config.num_image_tokens, min_tokens=config.num_image_tokens, ignore_eos=True,
            temperature=0.0 if greedy else settings.temperature,
            top_k=0 if greedy else min(settings.top_k, config.codebook_size),
            top_p=1.0 if greedy else settings.top_p,
            seed=seed if with_seed else None, detokenize=False,
            extra_args={EXTRA_ARGS_KEY: {"image_id": image_id, "role": role,
                                         "guidance_scale": float(settings.guidance_scale), **decoding.to_args()}})

    cond_prompt = {"prompt_token_ids": [config.class_token(class_id)]}
    if not settings.guided:
        return [(cond_prompt, params("single", True))]
    return [(cond_prompt, params("cond", True)),
            ({"prompt_token_ids": [config.null_class_token]}, params("uncond", False))]

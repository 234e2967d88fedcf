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
from dataclasses import dataclass

EXTRA_ARGS_KEY = "visual_ar"
ROLES = ("single", "cond", "uncond")
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
    """How an image's tokens are decoded: a strategy registered in `samplers/__init__.py` and its
    options. "raster" (one token per forward), "zipar" (row-parallel: a row starts once the row above
    has `window` tokens; `samplers/zipar.py`) or "sjd" (speculative Jacobi decoding: `window` tokens
    verified per forward, drafts initialised by `init`; `samplers/sjd.py`). SJD's window defaults to
    16 and its init to "random"; `relaxed_delta` turns on relaxed (LANTERN-style, not exact)
    acceptance over `relaxed_neighbours` latent neighbours. "code" (VAR models with a CoDe refiner,
    `samplers/next_scale.py`): the drafter decodes the first `draft_steps` scales, the refiner the
    rest; "raster" on a VAR model is its plain next-scale order. Each strategy validates the fields
    it reads (`Strategy.checked`); a field no strategy of this name reads must be unset."""
    strategy: str = "raster"
    window: int | None = None
    init: str | None = None
    relaxed_delta: float | None = None
    relaxed_neighbours: int | None = None
    draft_steps: int | None = None

    def __post_init__(self):
        from vllm_visual_ar.samplers import strategy_class, strategy_names

        names = strategy_names()
        if not isinstance(self.strategy, str) or self.strategy not in names:
            raise ValueError(f"strategy must be one of {names}, got {short(self.strategy)}")
        cls = strategy_class(self.strategy)
        for name, value in cls.checked(self).items():
            object.__setattr__(self, name, value)
        for name in DECODING_OPTIONS:
            if getattr(self, name) is not None and name not in cls.fields:
                readers = [repr(s) for s in names if name in strategy_class(s).fields]
                raise ValueError(f"{name} applies to strateg{'ies' if len(readers) > 1 else 'y'} "
                                 f"{' and '.join(readers)} only, got {name}={short(getattr(self, name))} "
                                 f"with strategy {self.strategy!r}")

    def fitted(self, config) -> "Decoding":
        """The same decoding with its sizes cut to what an image of `config` can use (a ZipAR window
        beyond the grid width is raster order, an SJD window beyond the image verifies the whole
        image, no code has more latent neighbours than the other codes)."""
        from vllm_visual_ar.samplers import strategy_class

        return strategy_class(self.strategy).fitted(self, config)

    def to_args(self) -> dict:
        args = {"strategy": self.strategy, **{name: getattr(self, name) for name in DECODING_OPTIONS}}
        return {k: v for k, v in args.items() if v is not None}


DECODING_OPTIONS = ("window", "init", "relaxed_delta", "relaxed_neighbours", "draft_steps")


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

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

import uuid
from dataclasses import dataclass

from vllm_visual_ar.samplers.sjd import DEFAULT_WINDOW, check_init, check_relaxed, check_sjd_window
from vllm_visual_ar.samplers.zipar import check_window

EXTRA_ARGS_KEY = "visual_ar"
ROLES = ("single", "cond", "uncond")
STRATEGIES = ("raster", "zipar", "sjd")


@dataclass(frozen=True)
class Decoding:
    """How an image's tokens are decoded: "raster" (one token per forward), "zipar" (row-parallel: a
    row starts once the row above has `window` tokens; `samplers/zipar.py`) or "sjd" (speculative
    Jacobi decoding: `window` tokens verified per forward, drafts initialised by `init`;
    `samplers/sjd.py`). SJD's window defaults to 16 and its init to "random"; `relaxed_delta` turns on
    relaxed (LANTERN-style, not exact) acceptance over `relaxed_neighbours` latent neighbours."""
    strategy: str = "raster"
    window: int | None = None
    init: str | None = None
    relaxed_delta: float | None = None
    relaxed_neighbours: int | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "zipar":
            check_window(self.window)
        elif self.strategy == "sjd":
            object.__setattr__(self, "window", check_sjd_window(DEFAULT_WINDOW if self.window is None else self.window))
            object.__setattr__(self, "init", check_init("random" if self.init is None else self.init))
        elif self.window is not None:
            raise ValueError(f"window applies to strategies 'zipar' and 'sjd' only, got window={self.window!r} "
                             f"with strategy {self.strategy!r}")
        if self.strategy != "sjd" and self.init is not None:
            raise ValueError(f"init applies to strategy 'sjd' only, got init={self.init!r}")
        if self.strategy != "sjd" and (self.relaxed_delta, self.relaxed_neighbours) != (None, None):
            raise ValueError("relaxed_delta and relaxed_neighbours apply to strategy 'sjd' only")
        delta, neighbours = check_relaxed(self.relaxed_delta, self.relaxed_neighbours)
        object.__setattr__(self, "relaxed_delta", delta)
        object.__setattr__(self, "relaxed_neighbours", neighbours)

    def to_args(self) -> dict:
        args = {"strategy": self.strategy, "window": self.window, "init": self.init,
                "relaxed_delta": self.relaxed_delta, "relaxed_neighbours": self.relaxed_neighbours}
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
                                  float(info.get("guidance_scale", 1.0)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed extra_args[{EXTRA_ARGS_KEY!r}]: {info!r}") from e
    decoding = Decoding(info.get("strategy", "raster"), info.get("window"), info.get("init"),
                        info.get("relaxed_delta"), info.get("relaxed_neighbours"))
    parsed = ImageRequestInfo(parsed.image_id, parsed.role, parsed.guidance_scale, decoding)
    if parsed.role not in ROLES:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]['role'] must be one of {ROLES}, got {parsed.role!r}")
    return parsed


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling settings of one image, validated. top_k 0 and top_p 1 switch those filters off;
    temperature 0 (or top_k 1) is greedy."""
    guidance_scale: float = 4.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {self.guidance_scale!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


def validate_class_id(config, class_id) -> int:
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < config.num_classes:
        raise ValueError(f"class {class_id!r} is not one of this model's classes (0..{config.num_classes - 1})")
    return class_id


def image_requests(config, class_id: int, settings: SamplingSettings, seed: int | None = None,
                   image_id: str | None = None, decoding: Decoding = Decoding()) -> list[tuple[dict, "object"]]:
    """-> [(prompt, SamplingParams)] for one image: one pair for a guided image, one entry otherwise."""
    from vllm import SamplingParams

    validate_class_id(config, class_id)
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

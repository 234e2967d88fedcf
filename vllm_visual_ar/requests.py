"""The plugin's request format: how an image becomes vLLM requests, and how the engine reads them back.

An unguided image (guidance_scale == 1) is one request. A guided image is two requests, one per
classifier-free-guidance stream, that the plugin scheduler runs in lockstep and the runner samples
as one:

    cond:   TokensPrompt([class_token]),      extra_args["visual_ar"] = {"image_id": ID, "role": "cond", "guidance_scale": s}
    uncond: TokensPrompt([null_class_token]), extra_args["visual_ar"] = {"image_id": ID, "role": "uncond", "guidance_scale": s}

Both carry the same max_tokens (the image's token count); the cond request carries the sampling
settings and the seed. Optional keys choose the decoding order, the same on both halves:
"strategy": "raster" (default) or "zipar" with "window": w (`Decoding`); for a next-scale (VAR) model,
"scale_sampling": {"top_k" | "top_p" | "temperature": [one value per scale]}. A ZipAR request must ask
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
    it reads (`Strategy.checked`); a field no strategy of this name reads must be unset. `coupled`
    (raster, SJD) draws every token from noise fixed per (seed, position) (`samplers/coupling.py`):
    the same seed then gives the same image in raster order and with SJD. `load_aware` (SJD, ZipAR,
    ZipAR x SJD): the window is a ceiling that the scheduler narrows under load (`samplers/load.py`;
    ZipAR's once, when the image is admitted; ZipAR x SJD's setting then, and each row's start
    before every step). "zipar_sjd"
    (`samplers/zipar_sjd.py`): ZipAR's rows (`window`), each verifying up to `sjd_window` tokens per
    forward with SJD's rule (default 8, init "horizontal"). `group_acceptance` (SJD; not exact): GSD's
    grouped test of each draft (`samplers/sjd.py::group_ratio`). `draft_candidates` (SJD, exact): K
    candidates for the first draft of each forward, its K - 1 siblings fed beside the chain (SJD-PAC's
    draft tree, first level; `samplers/sjd.py::verify_with_siblings`)."""
    strategy: str = "raster"
    window: int | None = None
    init: str | None = None
    relaxed_delta: float | None = None
    relaxed_neighbours: int | None = None
    draft_steps: int | None = None
    coupled: bool | None = None
    continue_after_reject: bool | None = None
    load_aware: bool | None = None
    sjd_window: int | None = None
    group_acceptance: bool | None = None
    draft_candidates: int | None = None

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
                listed = ' and '.join(filter(None, [', '.join(readers[:-1]), readers[-1]]))
                raise ValueError(f"{name} applies to strateg{'ies' if len(readers) > 1 else 'y'} "
                                 f"{listed} only, got {name}={short(getattr(self, name))} "
                                 f"with strategy {self.strategy!r}")

    def fitted(self, config, size=None) -> "Decoding":
        """The same decoding with its sizes cut to what an image of `config` at `size` can use (a
        ZipAR window beyond a row is raster order, an SJD window beyond the image verifies the whole
        image, no code has more latent neighbours than the other codes)."""
        from vllm_visual_ar.samplers import strategy_class

        return strategy_class(self.strategy).fitted(self, config, size)

    def to_args(self) -> dict:
        args = {"strategy": self.strategy, **{name: getattr(self, name) for name in DECODING_OPTIONS}}
        return {k: v for k, v in args.items() if v is not None}


DECODING_OPTIONS = ("window", "init", "relaxed_delta", "relaxed_neighbours", "draft_steps", "coupled",
                    "continue_after_reject", "load_aware", "sjd_window", "group_acceptance", "draft_candidates")


@dataclass(frozen=True)
class ImageRequestInfo:
    image_id: str
    role: str  # "single", "cond" or "uncond"
    guidance_scale: float
    decoding: Decoding = Decoding()
    # Next-scale models: settings given per scale, {name: values} (`SamplingSettings.per_scale`);
    # they replace the request's SamplingParams value of that name at each scale.
    scale_sampling: tuple = ()
    size: tuple[int, int] | None = None  # (width, height) of a text-to-image request; None: the model's one size

    def setting(self, name: str, scale: int, default):
        """Setting `name` at `scale`: its per-scale value if it has them, else `default`."""
        values = dict(self.scale_sampling).get(name)
        return default if values is None else values[scale]

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
    decoding = Decoding(info.get("strategy", "raster"), **{name: info.get(name) for name in DECODING_OPTIONS})
    scale_sampling = info.get("scale_sampling") or {}
    if not isinstance(scale_sampling, dict) or set(scale_sampling) - set(PER_SCALE):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]['scale_sampling'] must map some of {sorted(PER_SCALE)} "
                         f"to per-scale lists, got {short(scale_sampling)}")
    scale_sampling = tuple(sorted((k, check_per_scale(k, v)) for k, v in scale_sampling.items()))
    size = info.get("size")
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]['size'] must be [width, height], got {short(size)}")
    parsed = ImageRequestInfo(parsed.image_id, parsed.role, parsed.guidance_scale, decoding, scale_sampling,
                              tuple(size) if size is not None else None)
    if parsed.role not in ROLES:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]['role'] must be one of {ROLES}, got {short(parsed.role)}")
    return parsed


def set_decoding(sampling_params, decoding: Decoding) -> None:
    """Rewrite a request's decoding in its `visual_ar` args (the scheduler's load-aware choice at
    admission, before the request's first forward: the model runner reads it from there)."""
    extra = dict(sampling_params.extra_args)
    kept = {k: v for k, v in extra[EXTRA_ARGS_KEY].items() if k != "strategy" and k not in DECODING_OPTIONS}
    extra[EXTRA_ARGS_KEY] = {**kept, **decoding.to_args()}
    sampling_params.extra_args = extra


def step_width(output) -> int | None:
    """The window a step of an image request ran at, when the scheduler's load-aware policy chose it
    (carried in the step's output: vLLM passes `kv_transfer_params` through to the frontend as is)."""
    params = getattr(output, "kv_transfer_params", None)
    return params.get(STEP_WIDTH_KEY) if isinstance(params, dict) else None


def image_window(output) -> int | None:
    """The window a whole image ran at, when the scheduler chose it at admission (ZipAR's), carried
    like the width on the image's last output."""
    params = getattr(output, "kv_transfer_params", None)
    return params.get(IMAGE_WINDOW_KEY) if isinstance(params, dict) else None


def step_drafts(output) -> tuple[int, int] | None:
    """(drafts verified, drafts accepted) by a step, when the scheduler half reported them
    (`Strategy.step_drafts`, carried like the width)."""
    params = getattr(output, "kv_transfer_params", None)
    drafts = params.get(STEP_DRAFTS_KEY) if isinstance(params, dict) else None
    return tuple(drafts) if drafts is not None else None


STEP_WIDTH_KEY = "visual_ar_width"
STEP_DRAFTS_KEY = "visual_ar_drafts"
IMAGE_WINDOW_KEY = "visual_ar_image_window"


def check_top_k(value, name: str = "top_k") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {short(value)}")
    return value


# The settings a next-scale (VAR) image may give per scale, as CoDe does (top-k 600 and temperature
# 1.1 on the first seven scales, 1.0 after), each with its check.
PER_SCALE = {"top_k": check_top_k,
             "top_p": lambda v, name="top_p": check_number(v, name, 0, 1, low_open=True),
             "temperature": lambda v, name="temperature": check_number(v, name, 0, MAX_TEMPERATURE)}
NEUTRAL = {"top_k": 0, "top_p": 1.0, "temperature": 1.0}


def check_per_scale(name: str, values) -> tuple:
    """A non-empty list of valid values of setting `name`, one per scale -> tuple, or ValueError."""
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} per scale must be a non-empty list, got {short(values)}")
    return tuple(PER_SCALE[name](v, f"{name}[{i}]") for i, v in enumerate(values))


def per_scale_problem(scale_sampling: dict, num_scales: int | None) -> str | None:
    """Why per-scale settings do not fit a model with `num_scales` scales (None: not a next-scale model)."""
    if not scale_sampling:
        return None
    if num_scales is None:
        return (f"{', '.join(sorted(scale_sampling))} as a list (one value per scale) applies to next-scale "
                "(VAR) models only")
    for name, values in scale_sampling.items():
        if len(values) != num_scales:
            return f"{name} has {len(values)} values for this model's {num_scales} scales"
    return None


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling settings of one image, validated. top_k 0 and top_p 1 switch those filters off;
    temperature 0 (or top_k 1) is greedy. For a next-scale (VAR) model, top_k, top_p and temperature
    may each be a list with one value per scale (`per_scale`)."""
    guidance_scale: float = 4.0
    temperature: float | tuple = 1.0
    top_k: int | tuple = 0
    top_p: float | tuple = 1.0
    # The scale that means "no guidance" in the model family's convention (`families.py`):
    # LlamaGen's uncond + s (cond - uncond) at s = 1, VAR's (1 + t) cond - t uncond at t = 0.
    unguided_scale: float = 1.0

    def __post_init__(self):
        check_number(self.guidance_scale, "guidance_scale", 0, MAX_GUIDANCE_SCALE)
        for name, check in PER_SCALE.items():
            value = getattr(self, name)
            object.__setattr__(self, name, check_per_scale(name, value) if isinstance(value, (list, tuple))
                               else check(value))

    @property
    def guided(self) -> bool:
        return self.guidance_scale != self.unguided_scale

    @property
    def per_scale(self) -> dict[str, tuple]:
        """The settings given per scale: {name: values}."""
        return {name: getattr(self, name) for name in PER_SCALE if isinstance(getattr(self, name), tuple)}

    def scalar(self, name: str):
        """A setting as one value for vLLM's SamplingParams (a per-scale one: its neutral value)."""
        value = getattr(self, name)
        return NEUTRAL[name] if isinstance(value, tuple) else value


def validate_class_id(config, class_id) -> int:
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < config.num_classes:
        raise ValueError(f"class {short(class_id)} is not one of this model's classes (0..{config.num_classes - 1})")
    return class_id


MAX_PROMPT_CHARS = 4000


def parse_size(size) -> tuple[int, int] | None:
    """None, "WxH" or (width, height) -> (width, height) of positive integers, or ValueError."""
    if size is None or size == "auto":
        return None
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            size = tuple(int(p) for p in parts)
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return tuple(size)
    raise ValueError(f"size must be 'WIDTHxHEIGHT' (pixels), got {short(size)}")


def check_text(text, name: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} must be non-empty text, got {short(text)}")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is longer than {MAX_PROMPT_CHARS} characters")
    return text


def prompt_pair(config, prompt, negative_prompt=None, size=None, tokenizer=None):
    """One image's (cond prompt ids, uncond prompt ids, size) as its model family builds them: a
    class-conditional model's class token and null class, or a text model's templated prompt and
    its unconditional (or negative) prompt for the size asked for (default: the family's)."""
    from vllm_visual_ar.families import family_of

    family = family_of(config)
    if family.takes_text:
        check_text(prompt, "prompt")
        if negative_prompt is not None:
            check_text(negative_prompt, "negative_prompt")
        size = family.size(config, size)
        family.image_layout(config, size)  # a size the model does not make is a ValueError here
        cond, uncond = family.prompts(config, tokenizer, prompt, negative_prompt, size)
        return cond, uncond, size
    if negative_prompt is not None:
        raise ValueError("negative_prompt applies to text-to-image models; this one is class-conditional")
    validate_class_id(config, prompt)
    family.image_layout(config, size)
    return [config.class_token(prompt)], [config.null_class_token], None


def image_requests(config, prompt, settings: SamplingSettings, seed: int | None = None,
                   image_id: str | None = None, decoding: Decoding = Decoding(), size=None,
                   negative_prompt: str | None = None, tokenizer=None) -> list[tuple[dict, "object"]]:
    """-> [(prompt, SamplingParams)] for one image: one pair for a guided image, one entry otherwise.
    `prompt` is a class id (class-conditional models) or text (text-to-image models, which need the
    model's `tokenizer`)."""
    from vllm import SamplingParams

    from vllm_visual_ar.families import image_layout

    cond_ids, uncond_ids, size = prompt_pair(config, prompt, negative_prompt, size, tokenizer)
    check_seed(seed)
    layout = image_layout(config, size)
    if problem := per_scale_problem(settings.per_scale, getattr(config, "num_scales", None)):
        raise ValueError(problem)
    decoding = decoding.fitted(config, size)
    image_id = image_id or uuid.uuid4().hex
    temperature, top_k, top_p = (settings.scalar(n) for n in ("temperature", "top_k", "top_p"))
    greedy = temperature == 0 or top_k == 1
    per_scale = {"scale_sampling": {k: list(v) for k, v in settings.per_scale.items()}} if settings.per_scale else {}

    def params(role: str, with_seed: bool) -> SamplingParams:
        return SamplingParams(
            # ignore_eos alone holds the image to its length: min_tokens would also mask the EOS
            # that a text model's layout places at its end (Emu3).
            max_tokens=layout.num_tokens, ignore_eos=True,
            temperature=0.0 if greedy else temperature,
            top_k=0 if greedy else min(top_k, layout.codebook_size),
            top_p=1.0 if greedy else top_p,
            seed=seed if with_seed else None, detokenize=False,
            extra_args={EXTRA_ARGS_KEY: {"image_id": image_id, "role": role,
                                         "guidance_scale": float(settings.guidance_scale), **decoding.to_args(),
                                         **per_scale, **({"size": list(size)} if size is not None else {})}})

    cond_prompt = {"prompt_token_ids": cond_ids}
    if not settings.guided:
        return [(cond_prompt, params("single", True))]
    return [(cond_prompt, params("cond", True)), ({"prompt_token_ids": uncond_ids}, params("uncond", False))]

"""`POST /v1/images/generations` on vLLM's OpenAI-compatible server (entry point `vllm.endpoint_plugins`).

Request (OpenAI's images API, plus this plugin's decoding fields; the pydantic model `ImagesRequest`,
shown in the server's /docs and /openapi.json; unknown fields are a 400):

    {"prompt": "7" | 7 | "seven",      # a class id, or a name from config.json's class_names
     "model": "...", "n": 1, "size": "auto" | "32x32", "response_format": "b64_json",
     "seed": 0, "guidance_scale": 2.0, "temperature": 1.0, "top_k": 32, "top_p": 1.0,
     # VAR models: top_k, top_p, temperature may each be a list, one value per scale (CoDe's way)
     "strategy": "raster" | "zipar" | "sjd" | "zipar_sjd", "window": 8, "init": "random" | "horizontal",
     "sjd_window": 8,                                    # zipar_sjd: tokens each row verifies per forward
     "relaxed_delta": 0.1, "relaxed_neighbours": 16,     # SJD: relaxed acceptance (not exact)
     "group_acceptance": true,                           # SJD: GSD's group acceptance (not exact)
     "coupled": true,                                    # raster, SJD: noise fixed per (seed, position)
     "continue_after_reject": true,                      # SJD: SJD-PAC's adaptive continuation
     "draft_candidates": 3,                              # SJD: candidates for each forward's first draft (exact)
     "load_aware": true,                                 # SJD, ZipAR, ZipAR x SJD: the scheduler narrows the window under load
     "strategy": "code", "draft_steps": 2,               # VAR models with a CoDe refiner
     "extra_params": {...any of the fields above...},   # vllm-omni style; wins over top level
     "stream": false, "partial_images": 0..3,
     "timeout": 30.0}                                   # seconds; then the images are aborted: 408

Response: `{"created", "data": [{"b64_json": PNG}], "size", "output_format": "png", "usage"}`;
`/metrics` gains per-image forward passes, tokens per forward and latency, and SJD's drafts
verified/accepted. With
`"stream": true` (n = 1), server-sent events as OpenAI's API sends them: `partial_images` events of
type `image_generation.partial_image` as the image's codes come in (LlamaGen: the complete rows, rows
not yet generated black; VAR: the complete scales, coarse to fine), then `image_generation.completed`
with the whole image. Image i of a request uses seed `seed + i`.

The model family (`families.py`) decides what guidance 0 or 1 means (LlamaGen: 1 is unguided; VAR's
cfg: 0 is), which strategies apply (VAR: its own scale order, or "code" with `draft_steps` on a CoDe
folder) and how codes become pixels. Class-conditional models take no text, so `negative_prompt` is
rejected (400) rather than silently ignored. Validation is total and comes before the engine is
touched: the schema first (every field's JSON type, strictly: "2" is not 2; strings at most 1,000
characters), then the values: numbers finite and in range (seed in [0, 2**32 - 1] for every image
of the request, guidance and temperature at most 100) and what the model makes (its classes, sizes,
scales); bodies at most 1 MiB (else 413);
a bad field is a 400 with an OpenAI-style error body naming it. Windows beyond an image's length
act as the longest useful one; an image the engine could never schedule (too many tokens in one
step for `max_num_batched_tokens`, more KV than the cache holds) is a 400 at once. With `timeout`,
images not done in time are aborted (their KV freed) and the answer is a 408 with
`"type": "timeout_error"` (streamed: an `error` event). A client that disconnects aborts its images
(both guidance streams), which frees their KV blocks.
"""

import asyncio
import base64
import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_visual_ar.admission import image_cannot_fit
from vllm_visual_ar.families import family_of, image_layout
from vllm_visual_ar.requests import (DECODING_OPTIONS, Decoding, SamplingSettings, check_seed, check_text,
                                     image_requests, image_window, parse_size, per_scale_problem, short,
                                     step_drafts, step_width)

MAX_IMAGES_PER_REQUEST = 16
MAX_PARTIAL_IMAGES = 3  # as OpenAI's API
MAX_BODY_BYTES = 1 << 20
MAX_STRING = 1000       # characters in any string field (OpenAI's prompt limit for dall-e-2)
MAX_TIMEOUT = 3600.0    # seconds


# -- the request ---------------------------------------------------------------------------------
# Fields for which "" means "not given", as null does for every field (OpenAI clients may send either).
EMPTY_IS_DEFAULT = {"size", "response_format", "output_format", "strategy", "negative_prompt"}


class DecodingFields(BaseModel):
    """The fields an images request may give at the top level or in `extra_params`."""

    # strict: JSON types as sent (no "2" for 2, no true for 1); a field not declared here is a 400
    model_config = ConfigDict(extra="forbid", strict=True, str_max_length=MAX_STRING)

    seed: int | None = Field(None, description="Image i of the request uses seed + i, each in [0, 2**32 - 1]. "
                                               "Default: random.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance, in [0, 100]. What is unguided "
                                                           "depends on the model family (LlamaGen: 1, VAR: 0). "
                                                           "Default: the model's.")
    temperature: float | list[float] = Field(1.0, description="In [0, 2]; 0 is greedy. Next-scale (VAR) models: "
                                                              "also a list, one value per scale.")
    top_k: int | list[int] | None = Field(None, description="At least 0 (0: off); more than the codebook acts as "
                                                            "the codebook. Next-scale (VAR) models: also a list, "
                                                            "one value per scale. Default: the model's.")
    top_p: float | list[float] | None = Field(None, description="In (0, 1] (1: off). Next-scale (VAR) models: also "
                                                                "a list, one value per scale. Default: the model's.")
    strategy: str = Field("raster", description="The decoding order: 'raster' (VAR models: their next-scale "
                                                "order), 'zipar' (with window), 'sjd' (speculative Jacobi "
                                                "decoding), 'zipar_sjd' (ZipAR's rows, each an SJD window) "
                                                "or 'code' (VAR models with a CoDe refiner).")
    window: int | None = Field(None, description="zipar, zipar_sjd: the tokens of the row above a row starts "
                                                 "after; sjd: the tokens verified per forward (default 16). "
                                                 "Longer than useful: the longest useful one.")
    init: str | None = Field(None, description="sjd, zipar_sjd: how drafts start, 'random' (sjd's default) or "
                                               "'horizontal' (zipar_sjd's default).")
    sjd_window: int | None = Field(None, description="zipar_sjd: the tokens each active row verifies per "
                                                     "forward (default 8; 1 is zipar).")
    relaxed_delta: float | None = Field(None, description="sjd: relaxed (LANTERN-style, not exact) acceptance "
                                                          "with this delta.")
    relaxed_neighbours: int | None = Field(None, description="sjd with relaxed_delta: the latent neighbours of a "
                                                             "code that count.")
    group_acceptance: bool | None = Field(None, description="sjd: GSD's group acceptance (not exact): a draft "
                                                            "is tested with the target mass of the codes ranked, "
                                                            "weighted and embedded near it (default false).")
    draft_candidates: int | None = Field(None, description="sjd: candidates for the first draft of each forward, "
                                                           "in 1..8: its siblings are fed beside the chain and "
                                                           "verified by the multi-candidate rule (SJD-PAC's draft "
                                                           "tree, first level; exact). Default 1.")
    draft_steps: int | None = Field(None, description="code: the scales the drafter decodes, before the refiner.")
    coupled: bool | None = Field(None, description="raster, sjd: draw each token from noise fixed per (seed, "
                                                   "position), so that a seed gives the same image in raster "
                                                   "order and with sjd (default false).")
    load_aware: bool | None = Field(None, description="sjd: the window is a ceiling that the scheduler narrows "
                                                      "step by step when extra tokens per forward would cost "
                                                      "throughput; zipar: the window is the most parallel the "
                                                      "scheduler may choose when it admits the image (up to "
                                                      "raster order); zipar_sjd: the scheduler may run the image "
                                                      "as zipar's rows alone or in raster order instead, chosen "
                                                      "when it admits it, and otherwise starts each row only in a "
                                                      "step that gains from it (default false: as given).")
    continue_after_reject: bool | None = Field(None, description="sjd, zipar_sjd: keep verifying the drafts after a rejected "
                                                                 "one (SJD-PAC's adaptive continuation; exact). "
                                                                 "Default false.")
    negative_prompt: str | None = Field(None, description="Text-to-image models only: the text the unconditional "
                                                          "guidance stream is given.")
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT, description="Seconds; images not done by then are "
                                                                          "aborted and the answer is a 408.")

    @model_validator(mode="before")
    @classmethod
    def _not_given(cls, data):
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if k not in cls.model_fields or not (v is None or v == "" and k in EMPTY_IS_DEFAULT)}


class ImagesRequest(DecodingFields):
    """`POST /v1/images/generations`: OpenAI's images request and this plugin's decoding fields."""

    prompt: str | int = Field(description="Text-to-image models: the text. Class-conditional models: a class id, "
                                          "or a name from config.json's class_names.")
    model: str | None = Field(None, description="The served model's name. Default: the served model.")
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST, description="The number of images.")
    size: str = Field("auto", description="'WIDTHxHEIGHT' in pixels, or 'auto': the model's default size "
                                          "(class-conditional models make one size).")
    response_format: Literal["b64_json"] = Field("b64_json", description="Images come back inline.")
    output_format: Literal["png"] = "png"
    stream: bool = Field(False, description="Server-sent events (n = 1): partial images, then the image.")
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES, description="Streamed previews before the image.")
    user: str | None = None
    extra_params: DecodingFields | None = Field(None, description="Decoding fields, vllm-omni style: they win over "
                                                                  "the same fields at the top level.")


def request_schema() -> dict:
    """ImagesRequest's JSON schema for OpenAPI, with extra_params' schema in place (an operation's
    schema cannot point into its own $defs)."""
    schema = ImagesRequest.model_json_schema()
    defs = schema.pop("$defs", {})
    # OpenAI's fields first, then the decoding ones
    schema["properties"] = dict(sorted(schema["properties"].items(), key=lambda f: f[0] in DecodingFields.model_fields))

    def inline(node):
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        node = {k: inline(v) for k, v in node.items() if k != "$ref"}
        return {**inline(defs[ref.rsplit("/", 1)[1]]), **node} if ref else node

    return inline(schema)


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


_JSON_TYPES = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
               "bool_type": "a boolean", "list_type": "a list", "model_type": "an object"}


def _where(error: dict) -> tuple:
    """A pydantic error's loc without its union member tags ('int', 'list[float]', ...): field names,
    list indices and, for an unknown field, its name."""
    loc, fields = error["loc"], ImagesRequest.model_fields
    return tuple(p for i, p in enumerate(loc) if isinstance(p, int) or p in fields
                 or (error["type"] == "extra_forbidden" and i == len(loc) - 1))


def _invalid(error: ValidationError) -> BadRequest:
    """The first field pydantic refused as a BadRequest: param its name (`extra_params.window`), the
    message what it must be."""
    # unknown fields first (often a misspelt one), then the others in the schema's order
    errors = sorted(((_where(e), e) for e in error.errors(include_url=False)),
                    key=lambda pair: pair[1]["type"] != "extra_forbidden")
    first = errors[0][0]
    field = first[:2] if first[0] == "extra_params" else first[:1]
    # A union field has one error per member: take the most specific (an entry of a per-scale list).
    where = max((w for w, _ in errors if w[:len(field)] == field), key=len)
    found = [e for w, e in errors if w == where]
    param = ".".join(p for p in where if isinstance(p, str))[:MAX_STRING]
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where)[1:]
    if found[0]["type"] == "extra_forbidden":
        unknown = [str(w[-1]) for w, e in errors if e["type"] == "extra_forbidden" and w[:-1] == where[:-1]]
        scope = "extra_params" if len(where) > 1 else "request argument(s)"
        return BadRequest(f"unrecognized {scope}: {', '.join(unknown)}"[:MAX_STRING], param)
    if found[0]["type"] == "missing":
        return BadRequest(f"'{name}' is required", param)
    value = short(found[0]["input"])
    if all(e["type"] in _JSON_TYPES for e in found):  # none of the field's JSON types
        return BadRequest(f"'{name}' must be {' or '.join(_JSON_TYPES[e['type']] for e in found)}, got {value}",
                          param)
    message = next(e["msg"] for e in found if e["type"] not in _JSON_TYPES)  # e.g. a bound
    return BadRequest(f"'{name}': {message[0].lower()}{message[1:]}, got {value}", param)


@dataclass(frozen=True)
class ImagesJob:
    prompt: object  # a class id (class-conditional models) or text (text-to-image models)
    n: int
    seed: int | None
    settings: SamplingSettings
    decoding: Decoding
    stream: bool
    partial_images: int
    timeout: float | None = None
    negative_prompt: str | None = None
    size: tuple[int, int] | None = None  # text-to-image models: (width, height)


def parse_class(config, prompt) -> int:
    names = [n.lower() for n in (getattr(config, "class_names", None) or [])]
    text = prompt.strip() if isinstance(prompt, str) else None
    if isinstance(prompt, int) and not isinstance(prompt, bool):
        class_id = prompt
    elif text is not None and text.lstrip("-").isascii() and text.lstrip("-").isdigit():
        class_id = int(text)
    elif text is not None and text.lower() in names:
        class_id = names.index(text.lower())
    elif text is not None:
        hint = f" or a name ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""
        raise BadRequest(f"prompt {short(prompt)} is not a class of this class-conditional model: give a class id "
                         f"0..{config.num_classes - 1}{hint}", "prompt")
    else:
        raise BadRequest(f"'prompt' must be a string (a class id or name), got {short(prompt)}", "prompt")
    if not 0 <= class_id < config.num_classes:
        raise BadRequest(f"class {short(class_id)} is not one of this model's classes (0..{config.num_classes - 1})",
                         "prompt")
    return class_id


def parse_images_request(body, config) -> ImagesJob:
    """Validate an images request: its schema (`ImagesRequest`), then against the model config.
    BadRequest names the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None)
    try:
        request = ImagesRequest.model_validate(body)
    except ValidationError as e:
        raise _invalid(e) from None
    if request.extra_params is not None:  # given there, a field wins over the top level's
        request = request.model_copy(update=request.extra_params.model_dump(exclude_unset=True))
    from vllm_visual_ar.samplers import decoding_problem

    family = family_of(config)
    negative = request.negative_prompt
    if negative is not None and not family.takes_text:
        raise BadRequest("negative_prompt is not supported: this model is class-conditional and takes no text",
                         "negative_prompt")
    size = None
    if family.takes_text:
        prompt = request.prompt
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if text is not None:
                try:
                    check_text(text, name)
                except ValueError as e:
                    raise BadRequest(str(e), name) from None
        try:
            size = family.size(config, parse_size(request.size))
            family.image_layout(config, size)
        except ValueError as e:
            raise BadRequest(str(e), "size") from None
    else:
        prompt = parse_class(config, request.prompt)
        native = f"{config.image_size}x{config.image_size}"
        if request.size not in ("auto", native):
            raise BadRequest(f"size {short(request.size)} is not one this model makes: use {native!r} or 'auto'",
                             "size")
    n = request.n
    try:
        seed = check_seed(request.seed, n)
    except ValueError as e:
        raise BadRequest(str(e), "seed") from None

    def given(name: str, fallback):  # or the model's default
        value = getattr(request, name)
        return family.default(config, name, fallback) if value is None else value

    # top_k, top_p and temperature: one value, or (next-scale models) a list with one per scale.
    top_k = given("top_k", 0)
    if not isinstance(top_k, list):
        top_k = min(top_k, image_layout(config).codebook_size)
    try:
        settings = SamplingSettings(given("guidance_scale", 1.0), request.temperature, top_k, given("top_p", 1.0),
                                    unguided_scale=family.unguided_scale)
    except ValueError as e:
        raise BadRequest(str(e), str(e).split(" ", 1)[0].split("[")[0]) from None
    if problem := per_scale_problem(settings.per_scale, getattr(config, "num_scales", None)):
        raise BadRequest(problem, next(iter(sorted(settings.per_scale))))
    names = ("strategy", "init", "window", "relaxed_delta", "relaxed_neighbours", "draft_steps", "coupled",
             "continue_after_reject", "load_aware", "sjd_window", "group_acceptance", "draft_candidates")
    try:
        decoding = Decoding(request.strategy, **{name: getattr(request, name)
                                                 for name in DECODING_OPTIONS}).fitted(config, size)
    except ValueError as e:
        raise BadRequest(str(e), next((f for f in names if str(e).startswith(f)), "relaxed_delta")) from None
    if problem := decoding_problem(config, decoding):
        raise BadRequest(problem, next((f for f in reversed(names) if f in problem), "strategy"))
    if request.stream and n != 1:
        raise BadRequest("streaming returns one image: use n = 1 with stream = true", "n")
    return ImagesJob(prompt, n, seed, settings, decoding, request.stream, request.partial_images, request.timeout,
                     negative, size)


# -- images --------------------------------------------------------------------------------------
def png_b64(pixels) -> str:
    """uint8 [H, W, C] tensor -> base64 PNG."""
    from PIL import Image

    array = pixels.numpy()
    image = Image.fromarray(array[..., 0], mode="L") if array.shape[-1] == 1 else Image.fromarray(array, mode="RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_pngs(decode, tokens_list: list[list[int]], layout) -> list[str]:
    """Whole images' generated tokens -> base64 PNGs (`decode`: the model family's decoder, given
    the image's codes; `layout`: where they lie among the tokens)."""
    import torch

    from vllm_visual_ar.model_executors.vq import images_to_uint8

    with torch.no_grad():
        pixels = images_to_uint8(decode(layout.codes_of(torch.tensor(tokens_list)), (layout.rows, layout.cols)))
    return [png_b64(p) for p in pixels]


def preview_png(decode, tokens: list[int], layout) -> str:
    """A partial image as a base64 PNG: what the family's decoder draws from the codes so far
    (LlamaGen: the complete rows, the rest black; VAR: the complete scales, coarse to fine)."""
    from vllm_visual_ar.model_executors.vq import images_to_uint8

    codes = [t for i, t in enumerate(tokens) if layout.forced(i) is None]
    return png_b64(images_to_uint8(decode.preview(codes, layout.num_codes, (layout.rows, layout.cols)))[0])


# -- metrics -------------------------------------------------------------------------------------
class _Metrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.images = Counter("vllm_visual_ar:images", "Images generated", ["strategy"])
        self.forwards = Histogram("vllm_visual_ar:image_forward_passes", "Model forward passes per image",
                                  ["strategy"], buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))
        self.tokens_per_forward = Histogram("vllm_visual_ar:image_tokens_per_forward",
                                            "Image tokens per forward pass, per image", ["strategy"],
                                            buckets=(1, 1.5, 2, 3, 4, 6, 8, 12, 16))
        self.latency = Histogram("vllm_visual_ar:image_latency_seconds", "From request to the image's last token",
                                 ["strategy"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.sjd_drafts = Counter("vllm_visual_ar:sjd_draft_tokens", "SJD drafts verified")
        self.sjd_accepted = Counter("vllm_visual_ar:sjd_accepted_tokens", "SJD drafts accepted")
        self.sjd_width = Histogram("vllm_visual_ar:sjd_step_window", "The window (tokens per stream) an SJD "
                                   "forward ran at: the request's, or the load-aware policy's narrower one, "
                                   "cut at the image's end",
                                   buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.zipar_window = Histogram("vllm_visual_ar:zipar_window", "The window a ZipAR image ran at: the "
                                      "request's, or the one the load-aware policy chose when it was admitted",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))

    def observe(self, strategy: str, stats: "ImageRun", seconds: float):
        self.images.labels(strategy).inc()
        self.forwards.labels(strategy).observe(stats.forwards)
        self.tokens_per_forward.labels(strategy).observe(len(stats.codes) / max(stats.forwards, 1))
        self.latency.labels(strategy).observe(seconds)
        if stats.window is not None:
            self.zipar_window.observe(stats.window)
        if stats.draft_tokens:  # strategies that verify drafts (`Strategy.draft_stats`)
            self.sjd_drafts.inc(stats.draft_tokens)
            self.sjd_accepted.inc(stats.accepted_drafts)


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


# -- the engine side -----------------------------------------------------------------------------
@dataclass
class ImageRun:
    codes: list[int]
    forwards: int = 0
    draft_tokens: int = 0     # drafts verified (SJD)
    accepted_drafts: int = 0  # drafts accepted (SJD)
    window: int | None = None  # the window a schedule fixed per image ran at (load-aware ZipAR), when reported


async def generate_codes(engine, config, prompt, settings: SamplingSettings, decoding: Decoding,
                         seed: int | None, on_tokens=None, size=None, negative_prompt=None, tokenizer=None) -> ImageRun:
    """One image through the engine client (codes in raster order, forwards counted from the
    per-step outputs). Both guidance streams are consumed; on_tokens(codes so far) is awaited as
    codes arrive. If this coroutine is cancelled (client gone), vLLM aborts the streams it was reading."""
    from vllm.sampling_params import RequestOutputKind

    from vllm_visual_ar.samplers import strategy_for

    image_id = uuid.uuid4().hex
    streams = []
    for ids, params in image_requests(config, prompt, settings, seed, image_id=image_id, decoding=decoding,
                                      size=size, negative_prompt=negative_prompt, tokenizer=tokenizer):
        params.output_kind = RequestOutputKind.DELTA
        role = params.extra_args["visual_ar"]["role"]
        streams.append((role, engine.generate(ids, params, f"img-{image_id}-{role}")))
    run = ImageRun([])
    codes = run.codes
    draft_stats = strategy_for(config, decoding).draft_stats
    total = image_layout(config, size).num_tokens
    finish = None

    async def follow(role, stream):
        nonlocal finish
        async for out in stream:
            if role == "uncond":
                continue
            new = out.outputs[0].token_ids
            if new:
                if codes:  # not the prompt forward
                    verified, accepted = step_drafts(out) or draft_stats(decoding, total, len(codes), len(new),
                                                                         step_width(out))
                    if (width := step_width(out)) is not None:
                        metrics().sjd_width.observe(width)  # a window per forward
                    if (window := image_window(out)) is not None:
                        run.window = window  # a window per image
                    run.draft_tokens += verified
                    run.accepted_drafts += accepted
                run.forwards += 1
                codes.extend(new)
                if on_tokens is not None:
                    await on_tokens(codes)
            if out.finished:
                finish = out.outputs[0].finish_reason

    tasks = [asyncio.ensure_future(follow(role, stream)) for role, stream in streams]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await engine.abort([f"img-{image_id}-{role}" for role, _ in streams])
    if len(codes) != total:
        raise RuntimeError(f"image ended after {len(codes)} of {total} tokens ({finish})")
    return run


def _size_text(config, job) -> str:
    return f"{job.size[0]}x{job.size[1]}" if job.size is not None else f"{config.image_size}x{config.image_size}"


class ImagesEndpoint:
    """The `vllm.endpoint_plugins` entry: adds the route, loads the model config and VQ decoder."""

    name = "vllm_visual_ar"
    required_tasks = None

    def attach_router(self, app) -> None:
        from fastapi import Request

        from vllm.entrypoints.serve.utils.api_utils import with_cancellation

        # The body is read here, not by FastAPI, so that every bad request is an OpenAI-style 400
        # (FastAPI's own validation answers 422); the schema is declared for /docs and /openapi.json.
        body = {"required": True, "content": {"application/json": {"schema": request_schema()}}}

        @app.post("/v1/images/generations", summary="Create images", openapi_extra={"requestBody": body})
        @with_cancellation
        async def create_images(raw_request: Request):
            return await self._handle(raw_request)

    async def init_state(self, engine_client, state, args) -> None:
        state.visual_ar = None
        if engine_client is None:
            return
        from vllm_visual_ar.families import family_of

        config = engine_client.vllm_config.model_config.hf_config
        try:
            family = family_of(config)
        except ValueError:
            return  # another model: the route answers 400
        model_dir = engine_client.vllm_config.model_config.model
        names = list(getattr(args, "served_model_name", None) or []) + [args.model, model_dir]
        tokenizer = None
        if family.takes_text:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the one vLLM's engine loaded
        state.visual_ar = dict(engine=engine_client, config=config, decode=family.decoder(model_dir), names=names,
                               family=family, tokenizer=tokenizer)
        metrics()

    async def _handle(self, raw_request):
        from fastapi.responses import JSONResponse, StreamingResponse

        served = raw_request.app.state.visual_ar
        try:
            if served is None:
                raise BadRequest("this server's model is not an image model served by vllm-visual-ar", "model")
            raw = await raw_request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise BadRequest(f"the request body is larger than {MAX_BODY_BYTES} bytes", None, 413)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too deep, a number too long
                raise BadRequest(f"the request body is not valid JSON: {short(str(e), 200)}", None) from None
            job = parse_images_request(body, served["config"])
            if body.get("model") not in (None, *served["names"]):
                raise BadRequest(f"the model {short(body['model'])} does not exist", "model", 404, "model_not_found")
            self._check_fits(served, job)
        except BadRequest as e:
            return JSONResponse(e.body(), status_code=e.status)
        if job.stream:
            return StreamingResponse(self._stream(served, job), media_type="text/event-stream")
        created = int(time.time())
        try:
            images = await asyncio.wait_for(asyncio.gather(*(self._one(served, job, i) for i in range(job.n))),
                                            job.timeout)
        except asyncio.TimeoutError:  # wait_for has cancelled the images, which aborts their streams
            return JSONResponse(_timeout(job).body(), status_code=408)
        layout = image_layout(served["config"], job.size)
        pngs = await asyncio.to_thread(decode_pngs, served["decode"], images, layout)
        size = _size_text(served["config"], job)
        tokens = job.n * layout.num_tokens
        return JSONResponse({"created": created, "data": [{"b64_json": p} for p in pngs], "size": size,
                             "output_format": "png", "usage": _usage(tokens)})

    @staticmethod
    def _check_fits(served, job: ImagesJob) -> None:
        """Refuse an image the engine could never schedule (it would otherwise wait for ever)."""
        prompt_tokens = 1
        if served["tokenizer"] is not None:
            from vllm_visual_ar.requests import prompt_pair

            cond, uncond, _ = prompt_pair(served["config"], job.prompt, job.negative_prompt, job.size,
                                          served["tokenizer"])
            prompt_tokens = max(len(cond), len(uncond))
        if problem := image_cannot_fit(served["engine"].vllm_config, served["config"], job.decoding,
                                       job.settings.guided, job.size, prompt_tokens):
            raise BadRequest(problem, "window" if job.decoding.window is not None else None)

    async def _one(self, served, job: ImagesJob, index: int, on_tokens=None) -> list[int]:
        config = served["config"]
        t0 = time.perf_counter()
        seed = None if job.seed is None else job.seed + index
        run = await generate_codes(served["engine"], config, job.prompt, job.settings, job.decoding, seed, on_tokens,
                                   job.size, job.negative_prompt, served["tokenizer"])
        metrics().observe(job.decoding.strategy, run, time.perf_counter() - t0)
        return run.codes

    async def _stream(self, served, job: ImagesJob):
        config, decode = served["config"], served["decode"]
        layout = image_layout(config, job.size)
        size, total = _size_text(config, job), layout.num_tokens
        # Partial image j goes out once (j + 1) / (partial_images + 1) of the image's codes are in, or
        # where the family's decoder places its previews (VAR: after whole scales).
        marks = (decode.preview_marks(job.partial_images) if hasattr(decode, "preview_marks") else
                 [(j + 1) * total // (job.partial_images + 1) for j in range(job.partial_images)])
        queue: asyncio.Queue = asyncio.Queue()

        def event(kind: str, b64: str, **more) -> str:
            payload = {"type": kind, "b64_json": b64, "created_at": int(time.time()), "size": size,
                       "quality": "auto", "background": "opaque", "output_format": "png", **more}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        sent = []

        async def on_tokens(codes):
            while marks and len(codes) >= marks[0] and len(codes) < total:
                mark = marks.pop(0)
                png = await asyncio.to_thread(preview_png, decode, codes[:mark], layout)
                await queue.put(event("image_generation.partial_image", png, partial_image_index=len(sent)))
                sent.append(mark)

        async def produce():
            codes = await self._one(served, job, 0, on_tokens)
            png = (await asyncio.to_thread(decode_pngs, decode, [codes], layout))[0]
            await queue.put(event("image_generation.completed", png, usage=_usage(total)))

        task = asyncio.ensure_future(produce())
        deadline = None if job.timeout is None else asyncio.get_running_loop().time() + job.timeout
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                left = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
                await asyncio.wait([getter, task], timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done() and not task.done():  # past the deadline
                    getter.cancel()
                    yield f"event: error\ndata: {json.dumps(_timeout(job).body())}\n\n"
                    break
                if getter.done():
                    item = getter.result()
                    yield item
                    if item.startswith("event: image_generation.completed"):
                        break
                    continue
                getter.cancel()
                if task.exception() is not None:
                    err = {"error": {"message": str(task.exception()), "type": "server_error", "param": None,
                                     "code": None}}
                    yield f"event: error\ndata: {json.dumps(err)}\n\n"
                    break
        finally:
            task.cancel()  # client gone or done: cancelling aborts the image's streams


def _timeout(job: ImagesJob) -> BadRequest:
    return BadRequest(f"the images were not done within the request's timeout of {job.timeout:g} s; they were "
                      "aborted", "timeout", 408, "timeout", kind="timeout_error")


def _usage(image_tokens: int) -> dict:
    return {"input_tokens": 0, "output_tokens": image_tokens, "total_tokens": image_tokens,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}


"""`POST /v1/images/generations` on vLLM's OpenAI-compatible server (entry point `vllm.endpoint_plugins`).

Request (OpenAI's images API, plus this plugin's decoding fields; unknown fields are a 400):

    {"prompt": "7" | 7 | "seven",      # a class id, or a name from config.json's class_names
     "model": "...", "n": 1, "size": "auto" | "32x32", "response_format": "b64_json",
     "seed": 0, "guidance_scale": 2.0, "temperature": 1.0, "top_k": 32, "top_p": 1.0,
     # VAR models: top_k, top_p, temperature may each be a list, one value per scale (CoDe's way)
     "strategy": "raster" | "zipar" | "sjd", "window": 8, "init": "random" | "horizontal",  # init: SJD
     "relaxed_delta": 0.1, "relaxed_neighbours": 16,     # SJD: relaxed acceptance (not exact)
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
folder) and how codes become pixels. Class-conditional models take no text, so `negative_prompt` is rejected (400) rather than silently
ignored. Validation is total and comes before the engine is touched: every field's JSON type, numbers
finite and in range (seed in [0, 2**32 - 1] for every image of the request, guidance and temperature
at most 100), strings at most 1,000 characters, bodies at most 1 MiB (else 413) and of any shape;
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

from vllm_visual_ar.admission import image_cannot_fit
from vllm_visual_ar.families import image_layout
from vllm_visual_ar.requests import (Decoding, SamplingSettings, check_number, check_seed, check_text,
                                     image_requests, parse_size, per_scale_problem, short)

MAX_IMAGES_PER_REQUEST = 16
MAX_PARTIAL_IMAGES = 3  # as OpenAI's API
MAX_BODY_BYTES = 1 << 20
MAX_STRING = 1000       # characters in any string field (OpenAI's prompt limit for dall-e-2)
MAX_TIMEOUT = 3600.0    # seconds
# Every field and the JSON types it may have; anything else is a 400 before the engine is touched.
FIELD_TYPES = {"prompt": (str, int), "model": (str,), "n": (int,), "size": (str,), "response_format": (str,),
               "output_format": (str,), "seed": (int,), "guidance_scale": (int, float), "temperature": (int, float, list),
               "top_k": (int, list), "top_p": (int, float, list), "strategy": (str,), "window": (int,), "init": (str,),
               "relaxed_delta": (int, float), "relaxed_neighbours": (int,), "extra_params": (dict,),
               "stream": (bool,), "partial_images": (int,), "negative_prompt": (str,), "user": (str,),
               "timeout": (int, float), "draft_steps": (int,)}
KNOWN_FIELDS = set(FIELD_TYPES)
EXTRA_PARAMS = {"seed", "guidance_scale", "temperature", "top_k", "top_p", "strategy", "window", "init",
                "relaxed_delta", "relaxed_neighbours", "negative_prompt", "timeout", "draft_steps"}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
               list: "a list"}


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


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


def _check_types(fields: dict, where: str = "") -> None:
    """JSON null means "not given"; otherwise each field must have one of its types (a bool is not
    a number here) and a string at most MAX_STRING characters."""
    for name, value in fields.items():
        if value is None:
            continue
        types = FIELD_TYPES[name]
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok:
            expected = " or ".join(_TYPE_NAMES[t] for t in types if not (t is int and float in types))
            raise BadRequest(f"'{where}{name}' must be {expected}, got {short(value)}", where + name)
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise BadRequest(f"'{where}{name}' is longer than {MAX_STRING} characters", where + name)


def _int(fields: dict, name: str, default, low: int, high: int | None = None):
    value = fields.get(name)
    if value is None:
        return default
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise BadRequest(f"'{name}' must be {bounds}, got {short(value)}", name)
    return value


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
    """Validate an images request against a model config; BadRequest names the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None)
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"unrecognized request argument(s): {', '.join(unknown)[:MAX_STRING]}", unknown[0][:MAX_STRING])
    _check_types(body)
    extra = body.get("extra_params") or {}
    if unknown := sorted(set(extra) - EXTRA_PARAMS):
        raise BadRequest(f"unrecognized extra_params: {', '.join(unknown)[:MAX_STRING]}",
                         f"extra_params.{unknown[0][:MAX_STRING]}")
    _check_types(extra, "extra_params.")
    fields = {**body, **{k: v for k, v in extra.items() if v is not None}}
    from vllm_visual_ar.families import family_of

    family = family_of(config)
    negative = fields.get("negative_prompt") or None  # "" is "none", as OpenAI clients may send it
    if negative is not None and not family.takes_text:
        raise BadRequest("negative_prompt is not supported: this model is class-conditional and takes no text",
                         "negative_prompt")
    if body.get("prompt") is None:
        raise BadRequest("'prompt' is required", "prompt")
    size = None
    if family.takes_text:
        prompt = body["prompt"]
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if text is not None:
                try:
                    check_text(text, name)
                except ValueError as e:
                    raise BadRequest(str(e), name) from None
        try:
            size = family.size(config, parse_size(fields.get("size") or "auto"))
            family.image_layout(config, size)
        except ValueError as e:
            raise BadRequest(str(e), "size") from None
    else:
        prompt = parse_class(config, body["prompt"])
        size_text = fields.get("size") or "auto"
        native = f"{config.image_size}x{config.image_size}"
        if size_text not in ("auto", native):
            raise BadRequest(f"size {short(size_text)} is not one this model makes: use {native!r} or 'auto'", "size")
    n = _int(fields, "n", 1, 1, MAX_IMAGES_PER_REQUEST)
    response_format = fields.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise BadRequest(f"response_format {short(response_format)} is not supported: images are returned inline "
                         "as 'b64_json'", "response_format")
    if (fields.get("output_format") or "png") != "png":
        raise BadRequest(f"output_format {short(fields['output_format'])} is not supported: use 'png'",
                         "output_format")
    try:
        seed = check_seed(fields.get("seed"), n)
    except ValueError as e:
        raise BadRequest(str(e), "seed") from None
    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.samplers import decoding_problem

    # top_k, top_p and temperature: one value, or (next-scale models) a list with one per scale.
    top_k = fields.get("top_k")
    if not isinstance(top_k, list):
        top_k = min(_int(fields, "top_k", family.default(config, "top_k", 0), 0), image_layout(config).codebook_size)
    guidance = fields.get("guidance_scale")
    top_p = fields.get("top_p", family.default(config, "top_p", 1.0))
    numbers = (family.default(config, "guidance_scale") if guidance is None else guidance, fields.get("temperature", 1.0),
               top_k, 1.0 if top_p is None else top_p)
    try:
        settings = SamplingSettings(*(1.0 if v is None else v for v in numbers),
                                    unguided_scale=family_of(config).unguided_scale)
    except ValueError as e:
        raise BadRequest(str(e), str(e).split(" ", 1)[0].split("[")[0]) from None
    if problem := per_scale_problem(settings.per_scale, getattr(config, "num_scales", None)):
        raise BadRequest(problem, next(iter(sorted(settings.per_scale))))
    strategy = fields.get("strategy") or "raster"
    names = ("strategy", "init", "window", "relaxed_delta", "relaxed_neighbours", "draft_steps")
    try:
        decoding = Decoding(strategy, fields.get("window"), fields.get("init"), fields.get("relaxed_delta"),
                            fields.get("relaxed_neighbours"), fields.get("draft_steps")).fitted(config)
    except ValueError as e:
        raise BadRequest(str(e), next((f for f in names if str(e).startswith(f)), "relaxed_delta")) from None
    if problem := decoding_problem(config, decoding):
        raise BadRequest(problem, next((f for f in reversed(names) if f in problem), "strategy"))
    stream = fields.get("stream") or False
    partial_images = _int(fields, "partial_images", 0, 0, MAX_PARTIAL_IMAGES)
    if stream and n != 1:
        raise BadRequest("streaming returns one image: use n = 1 with stream = true", "n")
    timeout = fields.get("timeout")
    if timeout is not None:
        try:
            timeout = check_number(timeout, "timeout", 0, MAX_TIMEOUT, low_open=True)
        except ValueError as e:
            raise BadRequest(f"{e} (seconds)", "timeout") from None
    return ImagesJob(prompt, n, seed, settings, decoding, stream, partial_images, timeout, negative, size)


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

    def observe(self, strategy: str, stats: "ImageRun", seconds: float):
        self.images.labels(strategy).inc()
        self.forwards.labels(strategy).observe(stats.forwards)
        self.tokens_per_forward.labels(strategy).observe(len(stats.codes) / max(stats.forwards, 1))
        self.latency.labels(strategy).observe(seconds)
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
                    verified, accepted = draft_stats(decoding, total, len(codes), len(new))
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

        @app.post("/v1/images/generations")
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


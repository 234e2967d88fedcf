"""Offline batch API: classes in, PIL images out, on `vllm.LLM`.

    from vllm_visual_ar import ImageGenerator
    gen = ImageGenerator()                      # the embedded MNIST model
    images = gen.generate(classes=[3, 7], n=4, guidance_scale=4.0, seed=0)
    images = gen.generate(classes=[3, 7], strategy="zipar", window=4)   # row-parallel decoding
    images[0].image.save("three.png"); print(images[0].stats)
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import torch

from vllm_visual_ar.engine import engine_kwargs, set_engine_env
from vllm_visual_ar.admission import image_cannot_fit
from vllm_visual_ar.requests import Decoding, SamplingSettings, check_number, check_seed, image_requests, validate_class_id


@dataclass
class ImageStats:
    tokens: int           # image tokens generated
    forward_passes: int   # model forwards this image took (raster: one per token)
    seconds: float        # latency: from submission to this image's last token
    streams: int          # 2 for a guided image (cond + uncond), else 1
    draft_tokens: int = 0     # SJD: drafts verified
    accepted_drafts: int = 0  # SJD: drafts accepted

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forward_passes

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_drafts / self.draft_tokens if self.draft_tokens else None


@dataclass
class GeneratedImage:
    image: "object"        # PIL.Image
    class_id: int
    codes: torch.Tensor    # image codes: [grid, grid] in raster order (LlamaGen), or flat scale by scale (VAR)
    seed: int | None
    stats: ImageStats


def check_generate_args(config, classes, n, seed, guidance_scale, temperature, top_k, top_p,
                        strategy="raster", window=None, init=None, relaxed_delta=None, relaxed_neighbours=None,
                        draft_steps=None):
    """Validate `generate` arguments against a model config (ValueError naming the problem);
    -> (classes as a list, SamplingSettings with the model's defaults filled in, Decoding)."""
    classes = [classes] if isinstance(classes, int) else list(classes)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not classes:
        raise ValueError("classes must name at least one class")
    for c in classes:
        validate_class_id(config, c)
    check_seed(seed, len(classes) * n)
    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.samplers import decoding_problem

    decoding = Decoding(strategy, window, init, relaxed_delta, relaxed_neighbours, draft_steps).fitted(config)
    if problem := decoding_problem(config, decoding):
        raise ValueError(problem)
    if top_p is None:
        top_p = getattr(config, "default_top_p", 1.0)
    settings = SamplingSettings(config.default_guidance_scale if guidance_scale is None else guidance_scale,
                                temperature, config.default_top_k if top_k is None else top_k, top_p,
                                unguided_scale=family_of(config).unguided_scale)
    return classes, settings, decoding


class ImageGenerator:
    def __init__(self, model: str | None = None, max_images_in_flight: int = 16, **engine_overrides):
        from vllm import LLM

        from vllm_visual_ar.families import family_of

        set_engine_env()
        kwargs = engine_kwargs(model, max_images_in_flight, **engine_overrides)
        self.model_dir = kwargs["model"]
        self.family = family_of(self.model_dir)
        self.config = self.family.config(self.model_dir)
        self.layout = self.family.image_layout(self.config)
        self.decode_codes = self.family.decoder(self.model_dir)
        self.llm = LLM(**kwargs)

    def generate(self, classes: list[int] | int, n: int = 1, guidance_scale: float | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None,
                 strategy: str = "raster", window: int | None = None, init: str | None = None,
                 relaxed_delta: float | None = None, relaxed_neighbours: int | None = None,
                 draft_steps: int | None = None, progress: bool = False,
                 timeout: float | None = None) -> list[GeneratedImage]:
        """n images per class, in order (class-major). Image i of the call uses seed + i, so a seed
        gives the same images whatever else is in the batch. guidance_scale and top_k None mean
        the model's `default_guidance_scale` / `default_top_k` (top_p None: its `default_top_p`, or off);
        guidance 1 is unguided (VAR: 0), top_k 0 is off.
        strategy "zipar" with `window` w decodes rows in parallel (`samplers/zipar.py`); "sjd" verifies
        `window` (default 16) drafts per forward, initialised by `init` ("random" or "horizontal";
        `samplers/sjd.py`), with relaxed (LANTERN-style, not exact) acceptance if `relaxed_delta` is set.
        VAR models decode scale by scale; with a CoDe folder, strategy "code" with `draft_steps` N lets
        the drafter decode scales 0..N-1 and the refiner the rest (`samplers/next_scale.py`); guidance 0
        is unguided there (VAR's cfg).
        An image this engine could never schedule is a ValueError before anything is submitted; with
        `timeout` (seconds), the call aborts its images and raises TimeoutError when time is up."""
        classes, settings, decoding = check_generate_args(self.config, classes, n, seed, guidance_scale,
                                                          temperature, top_k, top_p, strategy, window, init,
                                                          relaxed_delta, relaxed_neighbours, draft_steps)
        if timeout is not None:
            timeout = check_number(timeout, "timeout", 0, 1e9, low_open=True)
        if problem := image_cannot_fit(self.llm.llm_engine.vllm_config, self.config, decoding, settings.guided):
            raise ValueError(problem)

        jobs = [(c, None if seed is None else seed + i) for i, c in enumerate(c for c in classes for _ in range(n))]
        tokens, forwards, latency, drafts = self._run(jobs, settings, decoding, progress, timeout)
        codes = torch.tensor(tokens)
        images = self.decode(codes)
        layout = self.layout
        if layout.scale_tokens is None:  # a raster grid; VAR's codes stay flat, scale by scale
            codes = codes.view(-1, layout.rows, layout.cols)
        streams = 2 if settings.guided else 1
        return [GeneratedImage(img, c, codes[i], s, ImageStats(len(tokens[i]), forwards[i], latency[i], streams,
                                                               *drafts[i]))
                for i, ((c, s), img) in enumerate(zip(jobs, images))]

    def _run(self, jobs, settings: SamplingSettings, decoding: Decoding, progress: bool, timeout: float | None):
        """Submit every image, step the engine until all are done. Outputs come as per-step deltas,
        so an image's forward passes are counted, not assumed: one per step that advanced it (a
        ZipAR image advances its raster prefix every step too, see `scheduler.py`)."""
        from tqdm import tqdm
        from vllm.sampling_params import RequestOutputKind

        from vllm_visual_ar.samplers import strategy_for

        draft_stats = strategy_for(self.config, decoding).draft_stats
        engine = self.llm.llm_engine
        owner: dict[str, int] = {}  # request id -> image index, for the stream that carries the image
        submitted: list[str] = []
        tokens: list[list[int]] = [[] for _ in jobs]
        forwards = [0] * len(jobs)
        latency = [0.0] * len(jobs)
        drafts = [[0, 0] for _ in jobs]  # [drafts verified, drafts accepted] per image (SJD)
        bar = tqdm(total=len(jobs) * self.layout.num_tokens, unit="tok", disable=not progress,
                   desc=f"{len(jobs)} images")
        t0 = time.perf_counter()
        try:
            for index, (class_id, seed) in enumerate(jobs):
                image_id = uuid.uuid4().hex
                for prompt, params in image_requests(self.config, class_id, settings, seed, image_id=image_id,
                                                     decoding=decoding):
                    params.output_kind = RequestOutputKind.DELTA
                    role = params.extra_args["visual_ar"]["role"]
                    request_id = f"{image_id}-{role}"
                    engine.add_request(request_id, prompt, params)
                    submitted.append(request_id)
                    if role != "uncond":
                        owner[request_id] = index
            while engine.has_unfinished_requests():
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"{len(jobs)} images not done within {timeout:g} s; aborted")
                for out in engine.step():
                    index = owner.get(out.request_id)
                    if index is None:
                        continue
                    new = out.outputs[0].token_ids
                    if new:
                        if tokens[index]:  # not the prompt forward
                            verified, accepted = draft_stats(decoding, self.layout.num_tokens,
                                                             len(tokens[index]), len(new))
                            drafts[index][0] += verified
                            drafts[index][1] += accepted
                        forwards[index] += 1
                        tokens[index] += new
                        bar.update(len(new))
                    if out.finished:
                        latency[index] = time.perf_counter() - t0
                        if len(tokens[index]) != self.layout.num_tokens:
                            raise RuntimeError(f"image {index} ended after {len(tokens[index])} tokens "
                                               f"({out.outputs[0].finish_reason})")
        except BaseException:
            engine.abort_request(submitted)
            raise
        finally:
            bar.close()
        return tokens, forwards, latency, drafts

    def decode(self, codes: torch.Tensor) -> list:
        """codes [N, image tokens] (or [N, grid, grid]) -> PIL images (grayscale for 1-channel
        tokenizers, else RGB)."""
        from PIL import Image

        from vllm_visual_ar.model_executors.vq import images_to_uint8

        codes = codes.reshape(codes.shape[0], -1)
        pixels = images_to_uint8(torch.cat([self.decode_codes(c) for c in codes.split(64)]))
        if pixels.shape[-1] == 1:
            return [Image.fromarray(p[..., 0].numpy(), mode="L") for p in pixels]
        return [Image.fromarray(p.numpy(), mode="RGB") for p in pixels]

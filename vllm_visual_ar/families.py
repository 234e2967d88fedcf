"""Model families behind one description: what the offline API, the CLI, the endpoint, the plugin
registration and the engine read about a model, instead of one family's config fields.

A family is its config class, its vLLM model class, the layout of an image's tokens in a request
(`ImageLayout`: the grid per resolution, the code ids, row-end and image-end tokens; the scheduler,
runner, strategies, endpoint and offline API read this, never a family's config fields), how a
guidance scale reads (which value means unguided) and how guidance mixes logits, and its image
decoder. Its decoding order is named by the config (`config.decoding`:
None = token by token, where the raster/ZipAR/SJD strategies apply; "next_scale" = VAR's one
forward per scale, `samplers/next_scale.py`). Adding a family is one entry here plus its modules in
`model_executors/`.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass


def load_object(path: str):
    """'module:name' -> the object."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's tokens lie in its request, for one resolution: what the engine (scheduler,
    runner, strategies) reads of a model family instead of its config fields.

    The request's generated tokens are the image: in raster order (token-by-token families) `rows`
    rows of `cols` codes, each row followed by `row_end` when the family writes one (an end-of-line
    token, placed by the engine, never sampled), then `image_end` (tokens placed after the last row);
    a next-scale family (VAR) generates `num_tokens` codes scale by scale instead. Codes are sampled
    among the token ids `image_token_ids` (a contiguous range; the decoder maps them to codebook entries)."""
    rows: int
    cols: int
    image_token_ids: range
    row_end: int | None = None
    image_end: tuple[int, ...] = ()
    scale_tokens: int | None = None  # next-scale families: codes over all scales (rows * cols is the last)

    @property
    def num_codes(self) -> int:
        return self.scale_tokens if self.scale_tokens is not None else self.rows * self.cols

    @property
    def row_stride(self) -> int:
        """Tokens from the start of one row to the next."""
        return self.cols + (self.row_end is not None)

    @property
    def num_tokens(self) -> int:
        """Tokens generated per image (the request's max_tokens)."""
        if self.scale_tokens is not None:
            return self.scale_tokens
        return self.rows * self.row_stride + len(self.image_end)

    @property
    def codebook_size(self) -> int:
        return len(self.image_token_ids)

    def forced(self, index: int) -> int | None:
        """The token the engine places at generated token `index` (an end of line or an image end),
        or None where a code is sampled."""
        if self.scale_tokens is not None:
            return None
        body = self.rows * self.row_stride
        if index >= body:
            return self.image_end[index - body]
        if self.row_end is not None and index % self.row_stride == self.cols:
            return self.row_end
        return None

    def codes_of(self, tokens):
        """Generated tokens [..., num_tokens] -> their codes' token ids [..., rows * cols] (the forced
        tokens dropped), raster order."""
        if self.scale_tokens is not None or (self.row_end is None and not self.image_end):
            return tokens
        body = tokens[..., : self.rows * self.row_stride]
        return body.reshape(*body.shape[:-1], self.rows, self.row_stride)[..., : self.cols].flatten(-2)


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    model_type: str
    config_class: str      # "module:Class" (a transformers PretrainedConfig)
    model_class: str       # "module:Class" (the vLLM model), imported lazily by vLLM
    decoder_loader: str    # "module:function": model_dir -> decode(codes [N, tokens]) -> images [N, C, H, W] in [-1, 1]
    layout: str            # "module:function": (config, size (width, height) or None) -> ImageLayout
    unguided_scale: float  # the guidance_scale that means "no guidance" (one stream per image)
    # "module:function" (cond, uncond, scale) -> guided logits, as the runner mixes token-by-token
    # models; None where the family's own decoding order mixes guidance itself (VAR's ramp).
    guidance_mix: str | None = None
    # Text-to-image families: "module:function" (config, tokenizer, text, negative_prompt or None,
    # size or None) -> (cond prompt ids, uncond prompt ids). None: class-conditional (class tokens).
    text_prompts: str | None = None
    default_size: str | None = None  # text families: "module:function" config -> (width, height) when none is asked
    # Sampling defaults where config.json names none (`default_guidance_scale`, `default_top_k`, ...).
    sampling_defaults: tuple = ()

    @property
    def takes_text(self) -> bool:
        return self.text_prompts is not None

    def prompts(self, config, tokenizer, text: str, negative_prompt: str | None, size):
        return load_object(self.text_prompts)(config, tokenizer, text, negative_prompt, size)

    def config(self, model_dir: str):
        return load_object(self.config_class).from_pretrained(model_dir)

    def image_layout(self, config, size: tuple[int, int] | None = None) -> ImageLayout:
        """The layout of an image of `size` pixels (None: the model's default size); ValueError for
        a size the model does not make. Computed once per config and size."""
        cache = config.__dict__.setdefault("_visual_ar_layouts", {})
        if size not in cache:
            cache[size] = load_object(self.layout)(config, size)
        return cache[size]

    def decoder(self, model_dir: str):
        return load_object(self.decoder_loader)(model_dir)

    def guided(self, guidance_scale: float) -> bool:
        return guidance_scale != self.unguided_scale

    def default(self, config, name: str, fallback=None):
        """The model's default for a sampling setting: config.json's `default_<name>`, else the
        family's, else `fallback`."""
        value = getattr(config, f"default_{name}", None)
        return value if value is not None else dict(self.sampling_defaults).get(name, fallback)

    def size(self, config, size=None):
        """The size an image is made at: the one asked for, else the family's default (None for
        class-conditional models, which make one size)."""
        if size is None and self.takes_text:
            return tuple(load_object(self.default_size)(config))
        return None if size is None else tuple(size)

    def missing_files(self, model_dir: str) -> list[str]:
        """Weight files the folder's config.json calls for that are not there (a CoDe folder also
        needs its refiner's), so a broken folder is refused before an engine starts."""
        from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS

        sharded = os.path.isfile(os.path.join(model_dir, "model.safetensors.index.json"))
        needed = [*([] if sharded else ["model.safetensors"]), VQ_WEIGHTS,
                  *getattr(self.config(model_dir), "extra_weight_files", ())]
        return [f for f in needed if not os.path.isfile(os.path.join(model_dir, f))]


FAMILIES = (
    Family("llamagen", "LlamaGenForClassToImage", "llamagen",
           "vllm_visual_ar.model_executors.llamagen_config:LlamaGenConfig",
           "vllm_visual_ar.model_executors.llamagen:LlamaGenForClassToImage",
           "vllm_visual_ar.model_executors.vq:load_image_decoder",
           "vllm_visual_ar.model_executors.llamagen_config:image_layout", unguided_scale=1.0,
           guidance_mix="vllm_visual_ar.samplers.sampling:cfg_mix"),
    # VAR's cfg t mixes (1 + t) cond - t uncond: 0 is unguided (models/var.py::autoregressive_infer_cfg).
    Family("var", "VARForClassToImage", "var",
           "vllm_visual_ar.model_executors.var_config:VARConfig",
           "vllm_visual_ar.model_executors.var:VARForClassToImage",
           "vllm_visual_ar.model_executors.var_vq:load_image_decoder",
           "vllm_visual_ar.model_executors.var_config:image_layout", unguided_scale=0.0),
)


# Lumina-mGPT: Chameleon's LM, Lumina's prompt template and layout (`chameleon_t2i.py`), Chameleon's
# VQGAN (`chameleon_vq.py`); guidance on raw logits, 1 is unguided.
FAMILIES += (
    Family("lumina", "ChameleonXLLMXForConditionalGeneration", "chameleon",
           "transformers:ChameleonConfig",
           "vllm_visual_ar.model_executors.chameleon:ChameleonXLLMXForConditionalGeneration",
           "vllm_visual_ar.model_executors.chameleon_t2i:load_image_decoder",
           "vllm_visual_ar.model_executors.chameleon_t2i:config_layout", unguided_scale=1.0,
           guidance_mix="vllm_visual_ar.model_executors.chameleon_t2i:guidance_mix",
           text_prompts="vllm_visual_ar.model_executors.chameleon_t2i:config_prompts",
           default_size="vllm_visual_ar.model_executors.chameleon_t2i:default_size",
           # Lumina-mGPT's generate.py / inference_solver: cfg 3.0, top-k 2000 inside the image.
           sampling_defaults=(("guidance_scale", 3.0), ("top_k", 2000), ("top_p", 1.0))),
)


# Emu3-Gen: its LM (`emu3.py`), its prompt format and layout (`emu3_t2i.py`), its vision tokenizer's
# decoder (`emu3_vq.py`); guidance in log-softmax space, 1 is unguided.
FAMILIES += (
    Family("emu3", "Emu3ForCausalLM", "Emu3", "vllm_visual_ar.model_executors.emu3_config:Emu3GenConfig",
           "vllm_visual_ar.model_executors.emu3:Emu3ForCausalLM",
           "vllm_visual_ar.model_executors.emu3_t2i:load_image_decoder",
           "vllm_visual_ar.model_executors.emu3_t2i:config_layout", unguided_scale=1.0,
           guidance_mix="vllm_visual_ar.model_executors.emu3_t2i:guidance_mix",
           text_prompts="vllm_visual_ar.model_executors.emu3_t2i:config_prompts",
           default_size="vllm_visual_ar.model_executors.emu3_t2i:default_size",
           # Emu3's image_generation.py: classifier-free guidance 3.0, top-k 2048.
           sampling_defaults=(("guidance_scale", 3.0), ("top_k", 2048), ("top_p", 1.0))),
)


def family_of(config_or_dir) -> Family:
    """The family of a model config (anything with `architectures`) or of a model folder."""
    if isinstance(config_or_dir, str):
        with open(os.path.join(config_or_dir, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    else:
        archs = getattr(config_or_dir, "architectures", None) or []
    for family in FAMILIES:
        if family.architecture in archs:
            return family
    raise ValueError(f"architecture {archs[0] if archs else None!r} is not one this plugin serves "
                     f"({', '.join(f.architecture for f in FAMILIES)})")


def image_layout(config, size: tuple[int, int] | None = None) -> ImageLayout:
    """The layout of one image of a model config (its family's answer)."""
    return family_of(config).image_layout(config, size)

"""Official LlamaGen release files -> a model folder vLLM loads.

Input: `c2i_*.pt` GPT and `vq_ds16_c2i.pt` tokenizer, each `{"model": state_dict}` (also accepted:
`{"module": ...}`, `{"state_dict": ...}` or a bare state dict) with LlamaGen's key names.
Output folder: `config.json` (architecture LlamaGenForClassToImage, GPT sizes, a `vq` section),
`model.safetensors` (GPT, LlamaGen key names kept) and `vq/model.safetensors` (decoder side of the VQ).
"""
from __future__ import annotations

import os
import re

import torch
from safetensors.torch import save_file

from vllm_visual_ar.model_executors.llamagen_config import GPT_SIZES, LlamaGenConfig
from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS, VQConfig


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return unwrap_state_dict(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a LlamaGen checkpoint: expected {'model': state_dict}")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def gpt_config_from_state(state: dict, image_size: int, downsample: int, vq: VQConfig,
                          gpt_size: str | None = None, num_heads: int | None = None) -> LlamaGenConfig:
    """Sizes from the weights; the head count (not visible in fused wqkv) from the official size
    table, or `num_heads` for other models."""
    if "tok_embeddings.weight" not in state or "cls_embedding.embedding_table.weight" not in state:
        raise ValueError("GPT checkpoint lacks tok_embeddings / cls_embedding.embedding_table: "
                         "only class-conditional (c2i) LlamaGen models are supported")
    codebook_size, dim = state["tok_embeddings.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    if num_heads is None:
        if gpt_size is None:
            matches = [name for name, s in GPT_SIZES.items() if s["dim"] == dim and s["n_layer"] == n_layer]
            if not matches:
                raise ValueError(f"no official GPT size has dim={dim}, n_layer={n_layer}; pass num_heads")
            gpt_size = matches[0]
        if gpt_size not in GPT_SIZES:
            raise ValueError(f"unknown GPT size {gpt_size!r}; one of {sorted(GPT_SIZES)}")
        size = GPT_SIZES[gpt_size]
        if (size["dim"], size["n_layer"]) != (dim, n_layer):
            raise ValueError(f"{gpt_size} does not match the checkpoint (dim={dim}, n_layer={n_layer})")
        num_heads = size["n_head"]
    head_dim = dim // num_heads
    qkv_rows = state["layers.0.attention.wqkv.weight"].shape[0]
    n_kv_head = (qkv_rows // head_dim - num_heads) // 2
    if image_size % downsample:
        raise ValueError(f"image size {image_size} is not a multiple of the VQ downsample {downsample}")
    return LlamaGenConfig(
        hidden_size=dim, num_hidden_layers=n_layer, num_attention_heads=num_heads,
        num_key_value_heads=n_kv_head, intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0],
        codebook_size=codebook_size, num_classes=state["cls_embedding.embedding_table.weight"].shape[0] - 1,
        image_grid=image_size // downsample, image_size=image_size, vq=vq.to_dict())


def vq_config_from_state(state: dict) -> VQConfig:
    """Sizes from the decoder's weights (decoder block i is resolution level n-1-i)."""
    codebook_size, embed_dim = state["quantize.embedding.weight"].shape
    n_levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.conv_blocks\.(\d+)\.", k)))
    n_res = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.conv_blocks\.0\.res\.(\d+)\.", k)))
    widths = [state[f"decoder.conv_blocks.{n_levels - 1 - level}.res.0.conv2.weight"].shape[0]
              for level in range(n_levels)]
    ch = state["encoder.conv_in.weight"].shape[0] if "encoder.conv_in.weight" in state else widths[0]
    return VQConfig(codebook_size=codebook_size, codebook_embed_dim=embed_dim, ch=ch,
                    ch_mult=[w // ch for w in widths], num_res_blocks=n_res - 1,
                    z_channels=state["post_quant_conv.weight"].shape[0],
                    image_channels=state["decoder.conv_out.weight"].shape[0])


def write_model_folder(out_dir: str, config: LlamaGenConfig, gpt_state: dict, vq_state: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    gpt = {k: v.contiguous() for k, v in gpt_state.items() if not k.startswith(("freqs_cis", "causal_mask"))
           and ".kv_cache." not in k}
    vq = {k: v.contiguous() for k, v in vq_state.items()
          if k.startswith(("decoder.", "post_quant_conv.", "quantize.embedding."))}
    save_file(gpt, os.path.join(out_dir, "model.safetensors"))
    os.makedirs(os.path.join(out_dir, "vq"), exist_ok=True)
    save_file(vq, os.path.join(out_dir, VQ_WEIGHTS))
    config.to_json_file(os.path.join(out_dir, "config.json"))
    return out_dir


def convert_llamagen(gpt_path: str, vq_path: str, out_dir: str, image_size: int | None = None,
                     gpt_size: str | None = None, num_heads: int | None = None) -> str:
    for path in (gpt_path, vq_path):
        if not os.path.isfile(path):
            raise ValueError(f"no such file: {path}")
    if image_size is None:
        m = re.search(r"_(\d{2,4})\.pt$", os.path.basename(gpt_path))
        if not m:
            raise ValueError("cannot tell the image size from the GPT file name; pass --image-size")
        image_size = int(m.group(1))
    gpt_state = unwrap_state_dict(torch.load(gpt_path, map_location="cpu", weights_only=True))
    vq_state = unwrap_state_dict(torch.load(vq_path, map_location="cpu", weights_only=True))
    vq_cfg = vq_config_from_state(vq_state)
    if vq_cfg.codebook_size != gpt_state["tok_embeddings.weight"].shape[0]:
        raise ValueError("the GPT and VQ checkpoints disagree on the codebook size")
    config = gpt_config_from_state(gpt_state, image_size, vq_cfg.downsample, vq_cfg, gpt_size, num_heads)
    return write_model_folder(out_dir, config, gpt_state, vq_state)

"""Tiny LlamaGen-format models with random weights, written the way real folders are."""
from __future__ import annotations

import torch

from vllm_visual_ar.model_executors.convert import write_model_folder
from vllm_visual_ar.model_executors.llamagen_config import LlamaGenConfig
from vllm_visual_ar.model_executors.llamagen_reference import LlamaGenReference
from vllm_visual_ar.model_executors.vq import VQConfig, VQModel

TINY_VQ = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                   z_channels=32, image_channels=1)


def tiny_config(grid: int = 8, num_classes: int = 10, **dims) -> LlamaGenConfig:
    dims = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, **dims}
    return LlamaGenConfig(codebook_size=TINY_VQ.codebook_size, num_classes=num_classes, image_grid=grid,
                          image_size=grid * TINY_VQ.downsample, vq=TINY_VQ.to_dict(), **dims)


def random_reference(config: LlamaGenConfig, seed: int = 0) -> LlamaGenReference:
    torch.manual_seed(seed)
    model = LlamaGenReference(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3 if p.shape[0] == config.codebook_size else 0.08)
    return model.eval()


def write_tiny_model(out_dir: str, config: LlamaGenConfig | None = None, seed: int = 0) -> LlamaGenReference:
    config = config or tiny_config()
    model = random_reference(config, seed)
    torch.manual_seed(seed)
    write_model_folder(str(out_dir), config, model.state_dict(), VQModel(TINY_VQ).state_dict())
    return model

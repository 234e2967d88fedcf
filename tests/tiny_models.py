"""Tiny LlamaGen-format models with random weights, written the way real folders are."""
from __future__ import annotations

import torch

from vllm_visual_ar.model_executors.convert import write_model_folder
from vllm_visual_ar.model_executors.llamagen_config import LlamaGenConfig
from vllm_visual_ar.model_executors.llamagen_reference import LlamaGenReference
from vllm_visual_ar.model_executors.vq import VQConfig, VQModel

TINY_VQ = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                   z_channels=32, image_channels=1)


def tiny_config(grid: int = 8, num_classes: int = 10, vq: VQConfig = TINY_VQ, **dims) -> LlamaGenConfig:
    dims = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, **dims}
    return LlamaGenConfig(codebook_size=vq.codebook_size, num_classes=num_classes, image_grid=grid,
                          image_size=grid * vq.downsample, vq=vq.to_dict(), **dims)


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
    write_model_folder(str(out_dir), config, model.state_dict(), VQModel(VQConfig.from_dict(config.vq)).state_dict())
    return model


def write_official_checkpoints(root, config: LlamaGenConfig, seed: int = 0):
    """Random tiny GPT and VQ saved as LlamaGen's release files: `{"model": state_dict}` .pt with
    LlamaGen's key names, the VQ including its encoder and `codebook_used` training buffer."""
    model = random_reference(config, seed)
    torch.manual_seed(seed + 1)
    vq = VQModel(TINY_VQ)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    vq_state = dict(vq.state_dict(), **{"quantize.codebook_used": torch.zeros(65536)})
    gpt_pt, vq_pt = root / f"c2i_tiny_{config.image_size}.pt", root / "vq_tiny.pt"
    torch.save({"model": model.state_dict(), "steps": 1}, gpt_pt)
    torch.save({"model": vq_state}, vq_pt)
    return model, gpt_pt, vq_pt

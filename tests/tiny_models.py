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


# -- VAR ---------------------------------------------------------------------------------------------
TINY_VAR_VQ = dict(codebook_size=32, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=1,
                   using_sa=True, using_mid_sa=True, share_quant_resi=4, quant_resi=0.5)


def tiny_var_config(patch_nums=(1, 2, 3, 4), depth: int = 2, heads: int = 2, **more):
    """Head size 64, as VAR's depth rule gives and vLLM's CPU kernels take."""
    from vllm_visual_ar.model_executors.var_config import VARConfig

    return VARConfig(depth=depth, embed_dim=64 * heads, num_heads=heads, num_classes=10, patch_nums=list(patch_nums),
                     vq=dict(TINY_VAR_VQ), default_guidance_scale=1.5, default_top_k=0, default_top_p=1.0, **more)


def random_var(config, seed: int = 0):
    """A VARReference with random weights large enough that every scale's logits are far from flat."""
    from vllm_visual_ar.model_executors.var_reference import VARReference

    torch.manual_seed(seed)
    model = VARReference(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if name.startswith("head.") or "scale_mul" in name else 0.1)
    return model.eval()


def official_var_state(model) -> dict:
    """The state dict as VAR's own module saves it: with its persistent buffers."""
    n = model.ends[-1]
    state = dict(model.state_dict(), lvl_1L=model.lvl_1L[None].clone(),
                 attn_bias_for_masking=torch.zeros(1, 1, n, n).masked_fill(~model.block_causal_mask(n), -torch.inf))
    for i in range(len(model.blocks)):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(model.config.embed_dim)
    return state


def random_var_vq(config, seed: int = 0):
    from vllm_visual_ar.model_executors.var_vq import MultiScaleVQVAE

    torch.manual_seed(seed + 100)
    vq = MultiScaleVQVAE.from_config(config)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    return vq.eval()


def write_official_var_checkpoints(root, config, refiner_config=None, seed: int = 0):
    """Random tiny VAR (and CoDe refiner) and VQVAE saved as the release files are: plain state dicts
    (`torch.save(model.state_dict())`) with the official names, the VQVAE with its training buffer.
    -> (models, vq, paths)."""
    models = [random_var(config, seed)] + ([random_var(refiner_config, seed + 1)] if refiner_config else [])
    vq = random_var_vq(config, seed)
    vq_state = dict(vq.state_dict(), **{"quantize.ema_vocab_hit_SV": torch.zeros(config.num_scales,
                                                                                 config.codebook_size)})
    paths = [root / f"var_tiny{i}.pth" for i in range(len(models))]
    for model, path in zip(models, paths):
        torch.save(official_var_state(model), path)
    torch.save(vq_state, root / "vae_tiny.pth")
    return models, vq, paths + [root / "vae_tiny.pth"]


def write_tiny_code_folder(root, patch_nums=(1, 2, 3, 4)):
    """A random CoDe pair (drafter depth 3 width 192, refiner depth 2 width 128) on one VQVAE, from
    release-layout files through the plugin's converter -> (folder, drafter, refiner, vq)."""
    from vllm_visual_ar.model_executors.convert import convert_var

    drafter_cfg = tiny_var_config(patch_nums, depth=3, heads=3)
    refiner_cfg = tiny_var_config(patch_nums, depth=2, heads=2)
    (drafter, refiner), vq, (d_pth, r_pth, vae_pth) = write_official_var_checkpoints(root, drafter_cfg, refiner_cfg)
    folder = convert_var(str(d_pth), str(vae_pth), str(root / "converted"), patch_nums=drafter_cfg.patch_nums,
                         refiner_path=str(r_pth))
    return folder, drafter, refiner, vq

"""Official release files -> a model folder vLLM loads.

LlamaGen: `c2i_*.pt` GPT and `vq_ds16_c2i.pt` tokenizer, each `{"model": state_dict}` (also accepted:
`{"module": ...}`, `{"state_dict": ...}` or a bare state dict) with LlamaGen's key names.
Output folder: `config.json` (architecture LlamaGenForClassToImage, GPT sizes, a `vq` section),
`model.safetensors` (GPT, LlamaGen key names kept) and `vq/model.safetensors` (decoder side of the VQ).

VAR / CoDe: `var_d*.pth` (or CoDe's fine-tuned `drafter_N.pth`, same layout) and
`vae_ch160v4096z32.pth`, bare state dicts (`torch.save(model.state_dict())`, loaded strict by the
authors' scripts), plus optionally a CoDe refiner (`var_d16.pth` or `refiner_N.pth`). Output folder:
`config.json` (architecture VARForClassToImage, sizes read from the weights, a `vq` section and,
for CoDe, a `refiner` section), `model.safetensors` (VAR key names, persistent buffers dropped),
`vq/model.safetensors` (the whole VQVAE, its training statistic dropped) and
`refiner/model.safetensors`.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from vllm_visual_ar.model_executors.llamagen_config import GPT_SIZES, LlamaGenConfig
from vllm_visual_ar.model_executors.var_config import DEFAULT_PATCH_NUMS, REFINER_FIELDS, VARConfig
from vllm_visual_ar.model_executors.var_vq import VQ_TRAINING_BUFFERS, MultiScaleVQVAE
from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS, VQConfig


def unwrap_state_dict(obj, what: str = "LlamaGen") -> dict[str, torch.Tensor]:
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return unwrap_state_dict(obj[key], what)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"not a {what} checkpoint: expected a state dict or {{'model': state_dict}}")
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


# -- VAR / CoDe -----------------------------------------------------------------------------------
# Persistent buffers of VAR's modules (scale index per position, the training mask, the zero k
# bias); var_reference.py recomputes them.
VAR_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def strip_var_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in VAR_BUFFERS and not k.endswith(".attn.zero_k_bias")}


def _indices(state: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))})


def var_vq_config_from_state(state: dict) -> dict:
    """The `vq` section from the VQVAE's weights (vqvae.py::VQVAE, basic_vae.py): decoder level i is
    `decoder.up.{i}` (width ch * ch_mult[i]), the phi layout from the quant_resi key names."""
    if "quantize.embedding.weight" not in state or "decoder.conv_out.weight" not in state:
        raise ValueError("VAE checkpoint lacks quantize.embedding / decoder: not VAR's multi-scale VQVAE")
    codebook_size, z_channels = state["quantize.embedding.weight"].shape
    levels = _indices(state, r"decoder\.up\.(\d+)\..*")
    widths = [state[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    ch = state["encoder.conv_in.weight"].shape[0] if "encoder.conv_in.weight" in state else widths[0]
    vq = dict(codebook_size=int(codebook_size), z_channels=int(z_channels), ch=int(ch),
              ch_mult=[w // ch for w in widths],
              num_res_blocks=len(_indices(state, r"decoder\.up\.0\.block\.(\d+)\..*")) - 1,
              using_sa=f"decoder.up.{levels[-1]}.attn.0.qkv.weight" in state,
              using_mid_sa="decoder.mid.attn_1.qkv.weight" in state,
              in_channels=int(state["decoder.conv_out.weight"].shape[0]),
              share_quant_resi=4, quant_resi=0.5, using_znorm=False, default_qresi_counts=0)
    partly = _indices(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight")
    own = _indices(state, r"quantize\.quant_resi\.(\d+)\.weight")
    if partly:
        vq["share_quant_resi"] = len(partly)
    elif "quantize.quant_resi.qresi.weight" in state:
        vq["share_quant_resi"] = 1
    elif own:
        vq["share_quant_resi"], vq["default_qresi_counts"] = 0, len(own)
    else:
        vq["quant_resi"] = 0.0  # no phi weights: phi is the identity
    # quant_resi's value (0.5) and using_znorm are not in the weights: VAR's release values.
    return vq


def var_sizes_from_state(state: dict, num_heads: int | None = None) -> dict:
    """Transformer sizes from VAR weights; the head count from scale_mul_1H11 [1, H, 1, 1], or
    `num_heads` when attn_l2_norm is off (then nothing in the weights shows it)."""
    for key in ("word_embed.weight", "class_emb.weight", "pos_1LC", "pos_start", "lvl_embed.weight",
                "head.weight", "blocks.0.attn.mat_qkv.weight", "blocks.0.ffn.fc1.weight"):
        if key not in state:
            raise ValueError(f"not a VAR checkpoint: no {key}")
    embed_dim = state["word_embed.weight"].shape[0]
    l2 = "blocks.0.attn.scale_mul_1H11" in state
    if l2:
        heads = state["blocks.0.attn.scale_mul_1H11"].shape[1]
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads={num_heads}, but scale_mul_1H11 has {heads} heads")
        num_heads = heads
    elif num_heads is None:
        raise ValueError("attn_l2_norm is off, so the weights do not show the head count: pass num_heads "
                         "(--num-heads)")
    if embed_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the width {embed_dim}")
    return dict(depth=len(_indices(state, r"blocks\.(\d+)\..*")), embed_dim=int(embed_dim),
                num_heads=int(num_heads), mlp_ratio=state["blocks.0.ffn.fc1.weight"].shape[0] / embed_dim,
                shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm=l2)


def check_patch_nums(state: dict, patch_nums) -> list[int]:
    pns = [int(p) for p in patch_nums]
    if len(pns) < 2 or any(p < 1 for p in pns) or any(a >= b for a, b in zip(pns, pns[1:])):
        raise ValueError(f"patch_nums {pns} must be at least two increasing positive sides")
    positions, first = state["pos_1LC"].shape[1], state["pos_start"].shape[1]
    if sum(p * p for p in pns) != positions or pns[0] ** 2 != first or len(pns) != state["lvl_embed.weight"].shape[0]:
        raise ValueError(
            f"patch_nums {pns} ({len(pns)} scales, {sum(p * p for p in pns)} positions) do not fit the "
            f"checkpoint ({state['lvl_embed.weight'].shape[0]} scales, pos_1LC {positions} positions, "
            f"pos_start {first}): pass the schedule it was trained with (--patch-nums)")
    return pns


def var_config_from_state(state: dict, vq: dict, patch_nums=None, num_heads: int | None = None) -> VARConfig:
    sizes = var_sizes_from_state(state, num_heads)
    pns = check_patch_nums(state, DEFAULT_PATCH_NUMS if patch_nums is None else patch_nums)
    if state["head.weight"].shape[0] != vq["codebook_size"] or state["word_embed.weight"].shape[1] != vq["z_channels"]:
        raise ValueError("the VAR and VAE checkpoints disagree on the codebook (size or z_channels)")
    return VARConfig(**sizes, num_classes=state["class_emb.weight"].shape[0] - 1, patch_nums=pns, vq=vq)


def _check_shapes(name: str, model: torch.nn.Module, state: dict, optional: tuple = ()) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{name} weights do not match their config: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]} wrong shape={wrong[:5]}")


def load_var_folder(path: str, device="cpu", dtype=torch.float32):
    """A converted VAR / CoDe folder -> (config, VARReference, MultiScaleVQVAE, refiner or None)."""
    from vllm_visual_ar.model_executors.var_reference import load_var_folder as load

    return load(path, device, dtype)


def write_var_folder(out_dir: str, config: VARConfig, var_state: dict, vq_state: dict,
                     refiner_state: dict | None = None, refiner_config: VARConfig | None = None) -> str:
    """Write a VAR (or, with a refiner, CoDe) folder. The weights are checked against the configs
    (on the meta device: no memory); config.refiner is set from refiner_config."""
    from vllm_visual_ar.model_executors.var_reference import VARReference

    var = {k: v.contiguous() for k, v in strip_var_buffers(var_state).items()}
    vq = {k: v.contiguous() for k, v in vq_state.items() if k not in VQ_TRAINING_BUFFERS}
    with torch.device("meta"):
        _check_shapes("VAR", VARReference(config), var)
        _check_shapes("VAE", MultiScaleVQVAE(config.vq, config.patch_nums), vq, optional=("encoder.", "quant_conv."))
    refiner = None
    if refiner_state is not None:
        if refiner_config is None:
            raise ValueError("a refiner needs its config")
        for field in ("patch_nums", "vq", "num_classes"):
            if getattr(refiner_config, field) != getattr(config, field):
                raise ValueError(f"the drafter and the refiner must share {field}")
        refiner = {k: v.contiguous() for k, v in strip_var_buffers(refiner_state).items()}
        with torch.device("meta"):
            _check_shapes("refiner", VARReference(refiner_config), refiner)
        config.refiner = {f: getattr(refiner_config, f) for f in REFINER_FIELDS}
    os.makedirs(os.path.join(out_dir, "vq"), exist_ok=True)
    save_file(var, os.path.join(out_dir, "model.safetensors"))
    save_file(vq, os.path.join(out_dir, VQ_WEIGHTS))
    if refiner is not None:
        os.makedirs(os.path.join(out_dir, "refiner"), exist_ok=True)
        save_file(refiner, os.path.join(out_dir, "refiner", "model.safetensors"))
    config.to_json_file(os.path.join(out_dir, "config.json"))
    return out_dir


def convert_var(var_path: str, vae_path: str, out_dir: str, patch_nums=None, refiner_path: str | None = None,
                num_heads: int | None = None, refiner_num_heads: int | None = None) -> str:
    """`var_d*.pth` + `vae_ch160v4096z32.pth` (+ a CoDe refiner) -> a converted folder. patch_nums:
    VAR's 256 px schedule unless given (512 px: 1,2,3,4,6,9,13,18,24,32)."""
    for path in (var_path, vae_path, refiner_path):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"no such file: {path}")

    def load(path):
        return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), "VAR")

    vq_state = load(vae_path)
    vq = var_vq_config_from_state(vq_state)
    var_state = load(var_path)
    config = var_config_from_state(var_state, vq, patch_nums, num_heads)
    refiner_state = refiner_config = None
    if refiner_path is not None:
        refiner_state = load(refiner_path)
        refiner_config = var_config_from_state(refiner_state, vq, config.patch_nums, refiner_num_heads)
    return write_var_folder(out_dir, config, var_state, vq_state, refiner_state, refiner_config)


# -- Lumina-mGPT -------------------------------------------------------------------------------------
def convert_lumina(hf_dir: str, vqgan_ckpt: str, vqgan_yaml: str, out: str, target_size: int | None = None,
                   trust_pickle: bool = False) -> str:
    """A Lumina-mGPT release (its Hugging Face folder, e.g. Alpha-VLLM/Lumina-mGPT-7B-768: config.json,
    safetensors shards, tokenizer files) plus Chameleon's VQGAN (`tokenizer/vqgan.ckpt`, `vqgan.yaml`)
    -> a folder the plugin serves: the weights and tokenizer files linked, config.json with the
    architecture Lumina's code names, the tokenizer's vocabulary_map (if the checkpoint lacks it) and
    `target_size` (the resolution the checkpoint was trained for: 512, 768 or 1024; read from the
    folder name when not given), and the VQGAN's decoder under vq/. Returns `out`."""
    from vllm_visual_ar.model_executors.chameleon_vq import convert_chameleon_vq

    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    if target_size is None:
        found = re.search(r"-(\d+)/*$", os.path.abspath(hf_dir))
        if found is None:
            raise ValueError(f"cannot tell the training resolution from {hf_dir!r}: pass target_size (512, 768, 1024)")
        target_size = int(found.group(1))
    if not config.get("vocabulary_map"):
        with open(os.path.join(hf_dir, "tokenizer.json")) as f:
            config["vocabulary_map"] = json.load(f)["model"]["vocab"]
    config.update(architectures=["ChameleonXLLMXForConditionalGeneration"], target_size=int(target_size))
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(hf_dir):
        source, target = os.path.abspath(os.path.join(hf_dir, name)), os.path.join(out, name)
        if name != "config.json" and os.path.isfile(source) and not os.path.exists(target):
            os.symlink(source, target)  # the 7B's shards are 14 GB: linked, not copied
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    convert_chameleon_vq(vqgan_ckpt, vqgan_yaml, out, trust_pickle=trust_pickle)
    return out


# -- Emu3-Gen ------------------------------------------------------------------------------------------
def convert_emu3(model_dir: str, out: str, vision_dir: str | None = None, image_area: int | None = None) -> str:
    """An Emu3-Gen release -> a folder the plugin serves. `model_dir`: the release's LM folder
    (BAAI/Emu3-Gen: flat config, model_type "Emu3") or transformers' layout (BAAI/Emu3-Gen-hf:
    model_type "emu3", the LM under text_config, the vision tokenizer inside); `vision_dir`: the
    vision tokenizer's folder (BAAI/Emu3-VisionTokenizer) when it is not inside. Writes the release's
    flat LM config with architecture Emu3ForCausalLM, the tokenizer's `vocabulary_map` (from
    tokenizer.json: the special and visual tokens the engine places and samples) and `image_area`
    (720 * 720 unless given), links the weights and tokenizer files, and the decoder under vq/."""
    from vllm_visual_ar.model_executors.emu3_t2i import IMAGE_AREA
    from vllm_visual_ar.model_executors.emu3_vq import convert_emu3_vq

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") == "emu3":  # transformers' layout: the LM's config is text_config
        outer = config
        config = dict(outer["text_config"], tie_word_embeddings=outer.get("tie_word_embeddings", False))
        config.setdefault("vocabulary_map", outer.get("vocabulary_map"))
    tokenizer_json = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise ValueError(f"{model_dir} has no tokenizer.json: the release's tiktoken tokenizer is remote code; "
                         "use transformers' Emu3 tokenizer files (as in BAAI/Emu3-Gen-hf)")
    from tokenizers import Tokenizer

    config.update(model_type="Emu3", architectures=["Emu3ForCausalLM"],
                  vocabulary_map=Tokenizer.from_file(tokenizer_json).get_vocab(with_added_tokens=True),
                  image_area=int(image_area or config.get("image_area") or IMAGE_AREA))
    config.pop("auto_map", None)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(model_dir):
        source, target = os.path.abspath(os.path.join(model_dir, name)), os.path.join(out, name)
        if name != "config.json" and os.path.isfile(source) and not os.path.exists(target):
            os.symlink(source, target)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    convert_emu3_vq(vision_dir or model_dir, out)
    return out

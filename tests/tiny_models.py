"""Tiny models of every family with random weights, written the way real folders are."""
from __future__ import annotations

import json
import math
import os

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


# -- Lumina-mGPT (Chameleon) -------------------------------------------------------------------------
CHAMELEON_TINY = dict(n_embed=16, embed_dim=4, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                      attn_resolutions=[8], resolution=8, out_ch=3)


def formula_tensor(shape, salt: int) -> torch.Tensor:
    """Values in [-1, 1) from a fixed formula of (element index, salt): reproducible anywhere."""
    n = math.prod(shape)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    x = torch.sin(i * 12.9898 + salt * 78.233) * 43758.5453
    return (2 * (x - torch.floor(x)) - 1).float().reshape(shape)


def chameleon_yaml(cfg: dict = CHAMELEON_TINY) -> dict:
    """vqgan.yaml in the layout of Chameleon's (`model.params` with ddconfig and a lossconfig)."""
    dd = {k: cfg[k] for k in ("z_channels", "resolution", "ch", "ch_mult", "num_res_blocks", "attn_resolutions")}
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg["embed_dim"], "n_embed": cfg["n_embed"],
        "ddconfig": {"double_z": False, "in_channels": 3, "out_ch": cfg["out_ch"], "dropout": 0.0, **dd},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0}}}}}


def chameleon_release_weights(cfg: dict = CHAMELEON_TINY) -> dict[str, torch.Tensor]:
    """The decoder side of a release state dict for `cfg`, values by `formula_tensor`: weights with
    variance 1 / fan_in, norm scales near 1, small biases, a unit-variance codebook."""
    from vllm_visual_ar.model_executors.chameleon_vq import ChameleonVQConfig, ChameleonVQDecoder

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ChameleonVQDecoder(ChameleonVQConfig.from_dict(cfg)).state_dict().items()}
    state = {}
    for salt, (k, shape) in enumerate(sorted(shapes.items())):
        u = formula_tensor(shape, salt)
        if k == "quantize.embedding.weight":
            state[k] = u * 3 ** 0.5
        elif len(shape) > 1:
            state[k] = u * (3 / math.prod(shape[1:])) ** 0.5
        elif "norm" in k and k.endswith(".weight"):
            state[k] = 1 + 0.2 * u
        else:
            state[k] = 0.1 * u
    return state


def write_chameleon_release(root, cfg: dict = CHAMELEON_TINY):
    """(vqgan.ckpt, vqgan.yaml) as Meta ships them, with encoder, quant_conv and loss weights that the
    converter must drop."""
    import yaml

    state = dict(chameleon_release_weights(cfg))
    state.update({"encoder.conv_in.weight": torch.ones(cfg["ch"], 3, 3, 3), "quant_conv.weight":
                  torch.ones(cfg["embed_dim"], cfg["z_channels"], 1, 1),
                  "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4)})
    ckpt, yml = os.path.join(root, "vqgan.ckpt"), os.path.join(root, "vqgan.yaml")
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, ckpt)
    with open(yml, "w") as f:
        yaml.safe_dump(chameleon_yaml(cfg), f)
    return ckpt, yml


LUMINA_WORDS = ("Generate an image of x according to the following prompt : a red green blue cat dog on "
                "mat at dusk blurry low quality 0 1 2 3 4 5 6 7 8 9 , .").split()


def lumina_vocab(codes: int = CHAMELEON_TINY["n_embed"]) -> dict[str, int]:
    """A Chameleon-shaped vocabulary: <s> <pad> </s> <unk> at 0..3, the image tokens from 4 in name
    order (so token order is not code order, as in the real 8192), <eoss>, <racm3:break>, the
    reserved tokens 8700..8869 (end of turn, end of line, resolution tokens), then words."""
    from vllm_visual_ar.model_executors.chameleon_t2i import IMAGE_CODE_PREFIX

    def name(code):
        return IMAGE_CODE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"

    vocab = {n: i for i, n in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for n in sorted(name(c) for c in range(codes)):
        vocab[n] = len(vocab)
    for n in ["<eoss>", "<racm3:break>"] + [f"<reserved{j:05d}>" for j in range(8700, 8870)]:
        vocab[n] = len(vocab)
    for w in LUMINA_WORDS:
        vocab.setdefault(w, len(vocab))
    return vocab


def write_tiny_lumina_folder(root, target_size: int = 64, seed: int = 0, codes: int = CHAMELEON_TINY["n_embed"]):
    """A tiny Lumina-mGPT release, converted by the plugin (`convert_lumina`), so every test of the
    family also runs the converter: a Hugging Face folder with transformers' Chameleon weights
    (random, 2 layers of width 128, qk-norm, GQA) and a tokenizer, and Chameleon's VQGAN files
    (tiny, `codes` codebook entries). -> (converted folder, transformers model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast

    from vllm_visual_ar.model_executors.convert import convert_lumina

    release = os.path.join(str(root), f"Lumina-mGPT-tiny-{target_size}")
    vocab = lumina_vocab(codes)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\d|[^\w\s]|\n"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in vocab if n.startswith("<")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", sep_token="<reserved08706>").save_pretrained(release)
    config = ChameleonConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             vocabulary_map=vocab, initializer_range=0.2, tie_word_embeddings=False,
                             vq_config=dict(embed_dim=4, num_embeddings=codes, base_channels=32,
                                            channel_multiplier=[1, 2], num_res_blocks=1, resolution=8,
                                            attn_resolutions=[]))
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    model.save_pretrained(release, safe_serialization=True)
    ckpt, yaml_path = write_chameleon_release(str(root), {**CHAMELEON_TINY, "n_embed": codes})
    return convert_lumina(release, ckpt, yaml_path, os.path.join(str(root), "converted")), model


# -- Emu3-Gen -------------------------------------------------------------------------------------------
EMU3_VISUAL = 64
EMU3_WORDS = ("a red green blue cat dog on mat at dusk blurry low quality masterpiece film grained best lowres "
              "bad anatomy text error cropped worst normal jpeg artifacts signature watermark username * 0 1 2 3 4 "
              "5 6 7 8 9 , . ( )").split()


def emu3_vocab() -> dict[str, int]:
    """Words first, then Emu3's special tokens in the release's order (`tokenization_emu3.py`), then
    the visual tokens."""
    vocab = {"[UNK]": 0}
    for w in EMU3_WORDS:
        vocab.setdefault(w, len(vocab))
    for n in (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
              + ["<|image token|>", "<|image start|>", "<|image end|>"]
              + [f"<|visual token {c:06d}|>" for c in range(EMU3_VISUAL)]):
        vocab[n] = len(vocab)
    return vocab


def write_tiny_emu3_folder(root, image_area: int = 64 * 64, seed: int = 0):
    """A tiny Emu3-Gen in transformers' layout (random LM of width 128 with GQA, a random vision
    tokenizer with its BatchNorm statistics, a tokenizer), converted by the plugin (`convert_emu3`).
    -> (converted folder, transformers model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import Emu3Config, Emu3ForConditionalGeneration, PreTrainedTokenizerFast

    from vllm_visual_ar.model_executors.convert import convert_emu3

    release = os.path.join(str(root), "Emu3-Gen-hf")
    vocab = emu3_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\d|[^\w\s]|\n"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in vocab if n.startswith("<|")])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|extra_203|>", eos_token="<|extra_204|>",
                            pad_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(release)
    text = dict(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|extra_203|>"],
                eos_token_id=vocab["<|extra_204|>"], initializer_range=0.2)
    vq = dict(codebook_size=EMU3_VISUAL, embed_dim=4, latent_channels=4, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
              temporal_downsample_factor=1)
    config = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # BatchNorm statistics and norm scales off their defaults
        for name, t in model.model.vqmodel.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                t.normal_(0, 0.1)
            elif t.is_floating_point() and "norm" in name and name.endswith(".weight"):
                t.normal_(1, 0.1)
    model.save_pretrained(release, safe_serialization=True)
    return convert_emu3(release, os.path.join(str(root), "converted"), image_area=image_area), model

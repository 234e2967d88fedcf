"""The image decoders of the text-to-image families: Lumina-mGPT (Chameleon's VQGAN,
model_executors/chameleon_vq.py) and Emu3-Gen (Emu3's vision tokenizer, model_executors/emu3_vq.py).

What each check compares against:
- Chameleon: no independent implementation is installed (transformers' ChameleonVQVAE has no
  decoder; the authors' `chameleon_vae_ori/vqgan.py` is not a dependency). Tiny weights are made by
  a fixed formula (no RNG, so they are the same everywhere) in the release layout (Lightning
  `{"state_dict": ...}` + vqgan.yaml), converted, decoded, and compared with CHAMELEON_EXPECTED: the
  authors' own `VQModel.decode(quantize.get_codebook_entry(...))` on the same weights, computed by
  `scripts/crosscheck_chameleon_vq.py`, which also checks that these weights carry exactly the key
  names and shapes of the authors' state dict. Conversion (config fields, kept/dropped keys, tensors
  unchanged) and the decode API (grid, batch, clamp, preview, uint8) are checked directly.
- Emu3: the decoder reuses transformers' Emu3VQVAE modules, so the reference is an independent
  transformers `Emu3ForConditionalGeneration` (random weights, saved with save_pretrained) and its
  `model.vqmodel.decode` (all 4 frames, then frame 0); ours reads that folder (HF layout) or the
  same weights renamed to the release's names (release layout, renamed by this file's own rules from
  the release's module tree; the cross-check script checks those names against the release's
  `Emu3VisionVQModel`) through `convert_emu3_vq`.
"""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from tiny_models import (CHAMELEON_TINY, chameleon_release_weights, chameleon_yaml, formula_tensor,
                         write_chameleon_release)

# -- Chameleon ------------------------------------------------------------------------------------
CHAMELEON_CODES = [[3, 15, 0, 7, 9, 1]]  # one image, grid (2, 3)
CHAMELEON_GRID = (2, 3)
# The authors' decoder output (lumina_mgpt/model/chameleon_vae_ori/vqgan.py, VQModel.decode of
# quantize.get_codebook_entry) for chameleon_release_weights() and CHAMELEON_CODES, flattened from
# [1, 3, 4, 6]; printed by `scripts/crosscheck_chameleon_vq.py --print-expectation`.
CHAMELEON_EXPECTED = [  # channel-major: 3 channels x 4 rows of 6
    0.06322389, -0.6903753, 0.1478243, 0.2110749, -0.5178611, -0.2954022,
    -0.402651, -0.6719996, -0.3838377, 0.03847443, -0.2542523, 0.3164225,
    -0.3529015, -0.4143147, 0.6107099, 0.5343497, 0.007440962, -0.05882698,
    -0.3045064, 0.07808038, 0.6665917, 0.4797195, 0.5904819, -0.1446696,
    -0.261483, 0.1272941, 0.03859218, 0.3347676, 0.738477, 0.09814499,
    -0.5615635, -0.4909326, -0.1348119, 0.4338481, -0.2587177, -0.3774205,
    0.06346163, 0.06595537, -0.2051363, 0.1690029, -0.1221646, 0.06632869,
    0.2104558, 0.1165153, -0.02498603, -0.2168775, -0.4930319, 0.2349156,
    0.2696209, 0.1570991, 0.7195616, -0.2883688, -1.078411, -0.3569578,
    -0.05675397, 0.5178977, 0.6430509, -0.093155, -0.3846434, -0.9600151,
    -0.1921812, 0.9855771, -0.1226616, -0.3730926, -0.5417589, -0.4528691,
    0.4792984, -0.2666787, 0.1484698, -0.1389727, -0.6600387, -0.09848978,
]


@pytest.fixture(scope="module")
def chameleon_folder(tmp_path_factory):
    from vllm_visual_ar.model_executors.chameleon_vq import convert_chameleon_vq

    root = tmp_path_factory.mktemp("chameleon")
    ckpt, yml = write_chameleon_release(str(root))
    return convert_chameleon_vq(ckpt, yml, str(root / "model"))


def test_chameleon_conversion(chameleon_folder):
    from safetensors.torch import load_file

    with open(os.path.join(chameleon_folder, "vq", "config.json")) as f:
        cfg = json.load(f)
    assert {k: cfg[k] for k in CHAMELEON_TINY} == CHAMELEON_TINY
    assert cfg["resamp_with_conv"] and cfg["attn_type"] == "vanilla" and not cfg["tanh_out"]
    saved = load_file(os.path.join(chameleon_folder, "vq", "model.safetensors"))
    release = chameleon_release_weights()
    assert sorted(saved) == sorted(release)  # encoder, quant_conv, loss dropped; nothing renamed
    assert all(torch.equal(saved[k], release[k]) for k in release)
    # attention where the yaml puts it: level 0 (resolution 8), not the lowest level (4), and mid
    assert any(k.startswith("decoder.up.0.attn.1.") for k in saved)
    assert not any(k.startswith("decoder.up.1.attn.") for k in saved)


def test_chameleon_conversion_refuses_mismatch(tmp_path):
    from vllm_visual_ar.model_executors.chameleon_vq import convert_chameleon_vq

    ckpt, _ = write_chameleon_release(str(tmp_path))
    import yaml

    wrong = chameleon_yaml({**CHAMELEON_TINY, "num_res_blocks": 2})
    with open(tmp_path / "wrong.yaml", "w") as f:
        yaml.safe_dump(wrong, f)
    with pytest.raises(ValueError, match="missing"):
        convert_chameleon_vq(ckpt, str(tmp_path / "wrong.yaml"), str(tmp_path / "out"))


def test_chameleon_decode_matches_authors(chameleon_folder):
    from vllm_visual_ar.model_executors.chameleon_vq import load_image_decoder

    decode = load_image_decoder(chameleon_folder)
    codes = torch.tensor(CHAMELEON_CODES)
    raw = decode.vq.decode_codes(codes.view(1, *CHAMELEON_GRID))
    expected = torch.tensor(CHAMELEON_EXPECTED).view(1, 3, 4, 6)
    assert raw.shape == expected.shape
    assert (raw - expected).abs().max().item() < 1e-4
    assert raw.abs().max() > 1  # so the clamp below is exercised
    assert torch.equal(decode(codes, CHAMELEON_GRID), raw.clamp(-1, 1))


def test_chameleon_decode_api(chameleon_folder):
    from vllm_visual_ar.model_executors.chameleon_vq import load_image_decoder, pixels_to_uint8

    decode = load_image_decoder(chameleon_folder)
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]])
    wide = decode(codes, (2, 6))
    assert wide.shape == (2, 3, 4, 12) and wide.abs().max() <= 1
    # a batch decodes as its images one by one; the grid's rows/cols are not interchangeable
    assert torch.allclose(wide[1:], decode(codes[1:], (2, 6)), atol=1e-5)
    assert decode(codes, (6, 2)).shape == (2, 3, 12, 4)
    square = decode(codes[:, :9])
    assert square.shape == (2, 3, 6, 6)
    with pytest.raises(ValueError):
        decode(codes, (5, 2))
    # preview: complete rows decoded, the rest black
    part = decode.preview(codes[0, :7].tolist(), 12, (2, 6))
    known = decode(torch.tensor([codes[0, :6].tolist() + [codes[0, 0].item()] * 6]), (2, 6))
    assert torch.equal(part[:, :, :2], known[:, :, :2]) and (part[:, :, 2:] == -1).all()
    # Lumina's _pil_from_chw_tensor: clamp, (x + 1) / 2 * 255, truncated
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert pixels_to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


# -- Emu3 -----------------------------------------------------------------------------------------
EMU3_VQ = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
               num_res_blocks=1, attn_resolutions=[1], hidden_size=64, temporal_downsample_factor=4)
# transformers' Emu3VQVAEConfig fields -> the release's Emu3VisionVQConfig names
EMU3_RELEASE_NAMES = {"codebook_size": "codebook_size", "embed_dim": "embed_dim", "latent_channels": "z_channels",
                      "double_latent": "double_z", "in_channels": "in_channels", "out_channels": "out_channels",
                      "temporal_downsample_factor": "temporal_downsample_factor", "base_channels": "ch",
                      "channel_multiplier": "ch_mult", "num_res_blocks": "num_res_blocks",
                      "attn_resolutions": "attn_resolutions"}


def tiny_emu3_hf(seed: int = 0):
    """A tiny transformers Emu3ForConditionalGeneration, its VQ randomised (BatchNorm running
    statistics and norm scales included, so a weight the converter lost would show)."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    cfg = Emu3Config(text_config=text, vq_config=EMU3_VQ, vocabulary_map={"<image>": 1, "<|extra_200|>": 2})
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, t in model.model.vqmodel.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                t.normal_(0, 0.1)
            elif t.is_floating_point() and ("norm" in name and name.endswith(".weight")):
                t.normal_(1, 0.1)
            elif t.is_floating_point() and t.dim() == 1:
                t.normal_(0, 0.1)
            elif name == "quantize.embedding.weight":
                t.normal_(0, 1)
    return model


def hf_to_release_name(key: str) -> str:
    """transformers' Emu3VQVAE decoder-side name -> the release's (emu3/tokenizer/
    modeling_emu3visionvq.py: `Emu3VisionVQDecoder` keeps `mid` and `up` as modules of its own,
    attention blocks own their `norm` and 1x1 convs `q`, `k`, `v`, `proj_out`)."""
    proj = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "proj_out"}
    key = re.sub(r"^decoder\.middle_block\.attn_norm\.", "decoder.middle_block.attn_1.norm.", key)
    key = re.sub(r"\.attn_norms\.(\d+)\.", r".attn.\1.norm.", key)
    key = re.sub(r"\.(attn_1|attn\.\d+)\.(q_proj|k_proj|v_proj|out_proj)\.", lambda m: f".{m[1]}.{proj[m[2]]}.", key)
    key = re.sub(r"^decoder\.middle_block\.", "decoder.mid.", key)
    return re.sub(r"^decoder\.up_block\.up\.", "decoder.up.", key)


def emu3_release_state(model) -> dict[str, torch.Tensor]:
    """The VQ of `model` as the release's Emu3VisionVQModel state dict (encoder and quant_conv kept
    under their own names: the converter has to drop them)."""
    out = {}
    for k, v in model.model.vqmodel.state_dict().items():
        if k.startswith("decoder."):
            name = hf_to_release_name(k)
            if re.search(r"\.(q|k|v|proj_out)\.weight$", name):
                v = v[:, :, None, None]  # linear -> 1x1 conv kernel
            out[name] = v.clone()
        else:
            out[k] = v.clone()
    return out


def write_emu3_release(model, folder: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    vq = model.config.vq_config
    cfg = {"model_type": "Emu3VisionVQ", "architectures": ["Emu3VisionVQModel"], "dropout": 0.0,
           **{rel: getattr(vq, hf) for hf, rel in EMU3_RELEASE_NAMES.items()}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in emu3_release_state(model).items()},
              os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("emu3")
    model = tiny_emu3_hf()
    model.save_pretrained(str(root / "hf"))  # VQ under `vqmodel.` (transformers' "emu3" mapping)
    # the module-tree prefix `model.vqmodel.`, with an LM tensor the converter must leave alone
    os.makedirs(root / "hf_module_names")
    with open(root / "hf" / "config.json") as f, open(root / "hf_module_names" / "config.json", "w") as g:
        g.write(f.read())
    state = {f"model.vqmodel.{k}": v.contiguous() for k, v in model.model.vqmodel.state_dict().items()}
    state["model.text_model.norm.weight"] = torch.ones(32)
    save_file(state, str(root / "hf_module_names" / "model.safetensors"))
    write_emu3_release(model, str(root / "release"))
    return model, root


@pytest.mark.parametrize("layout", ["hf", "hf_module_names", "release"])
def test_emu3_decode_matches_transformers(emu3, layout):
    from vllm_visual_ar.model_executors.emu3_vq import convert_emu3_vq, load_image_decoder

    model, root = emu3
    folder = convert_emu3_vq(str(root / layout), str(root / f"out_{layout}"))
    decode = load_image_decoder(folder)
    codes = torch.randint(0, EMU3_VQ["codebook_size"], (2, 3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.model.vqmodel.decode(codes)  # [N, 3, 3 * 2, 5 * 2]: video frame 0
    raw = decode.vq.decode_codes(codes)
    assert raw.shape == expected.shape == (2, 3, 6, 10)
    assert (raw - expected).abs().max().item() < 1e-5, layout
    assert expected.abs().max() > 1  # so the clamp is exercised
    assert torch.equal(decode(codes.flatten(1), (3, 5)), raw.clamp(-1, 1))
    assert decode(codes.flatten(1)[:, :9]).shape == (2, 3, 6, 6)


def test_emu3_config_and_refusals(emu3, tmp_path):
    from vllm_visual_ar.model_executors.emu3_vq import convert_emu3_vq, pixels_to_uint8, vq_config_from_release

    model, root = emu3
    with open(root / "out_release" / "vq" / "config.json") as f:
        from_release = json.load(f)
    with open(root / "out_hf" / "vq" / "config.json") as f:
        from_hf = json.load(f)
    assert from_release == from_hf  # both layouts give the same Emu3VQVAEConfig fields
    # attention at a level narrower than the last cannot be held by transformers' Emu3VQVAE
    with pytest.raises(ValueError, match="attention at level 0"):
        vq_config_from_release({"ch": 32, "ch_mult": [1, 2], "attn_resolutions": [0, 1]})
    # a weight missing from the release folder is refused, not silently random
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    write_emu3_release(model, str(bad))
    state = load_file(str(bad / "model.safetensors"))
    del state["decoder.mid.attn_1.norm.conv_y.weight"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        convert_emu3_vq(str(bad), str(tmp_path / "out"))
    # Emu3's postprocess: (x + 1) / 2 * 255, clipped, truncated
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert pixels_to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]

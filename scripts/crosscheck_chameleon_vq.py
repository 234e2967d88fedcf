"""Cross-check the text-to-image decoders against the authors' own modules, on tiny random weights:
Lumina-mGPT's Chameleon VQGAN (model_executors/chameleon_vq.py) and, optionally, the release of
Emu3's vision tokenizer (model_executors/emu3_vq.py, whose test compares with transformers' port).

    python scripts/crosscheck_chameleon_vq.py LUMINA_DIR [--emu3 EMU3_DIR] [--print-expectation]

Neither repository is a dependency and nothing of them ships here. Extract their files first:

    git --git-dir=<Alpha-VLLM/Lumina-mGPT> show HEAD:lumina_mgpt/model/chameleon_vae_ori/vqgan.py > LUMINA_DIR/vqgan.py
    git --git-dir=<Alpha-VLLM/Lumina-mGPT> show HEAD:lumina_mgpt/model/chameleon_vae_ori/image_tokenizer.py \
        > LUMINA_DIR/image_tokenizer.py
    git --git-dir=<baaivision/Emu3> show HEAD:emu3/tokenizer/configuration_emu3visionvq.py \
        > EMU3_DIR/configuration_emu3visionvq.py
    git --git-dir=<baaivision/Emu3> show HEAD:emu3/tokenizer/modeling_emu3visionvq.py > EMU3_DIR/modeling_emu3visionvq.py

Chameleon: their `VQModel` is built from a vqgan.yaml written in Chameleon's layout, randomised,
saved as a Lightning checkpoint (`{"state_dict": ...}`, with its encoder and a stand-in loss weight),
loaded back by THEIR `ImageTokenizer(cfg_path, ckpt_path)` and decoded with
`ImageTokenizer.pil_from_img_toks` (PIL image) and `VQModel.decode(get_codebook_entry(...))` (floats);
the same files go through OUR `convert_chameleon_vq` and `load_image_decoder`. Several shapes: the
test's tiny one, attention at every level, no upsampling conv + tanh + attention "none", Chameleon's
own level/width pattern (narrowed), a non-square grid. Also: the weights the test builds by formula
carry exactly their key names and shapes, and their decoder gives the test's CHAMELEON_EXPECTED.

Emu3: their `Emu3VisionVQModel` (random, BatchNorm statistics included) saved with save_pretrained
is the release layout; OUR `convert_emu3_vq` + decoder against THEIR `decode` (3-d codes = images);
and the release-layout decoder names the test derives from transformers' model match theirs.
Tolerances: 1e-5 absolute for Chameleon (outputs of order 1), 1e-5 relative to the largest output
for Emu3 (its random-weight outputs reach ~15); uint8 pixels within 1 level (truncation at a
boundary).
Exits non-zero on a mismatch.
"""
import argparse
import importlib
import os
import sys
import tempfile
import types

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_t2i_decoders as T  # noqa: E402  (the test's weights and expectation)

from vllm_visual_ar.model_executors.chameleon_vq import (  # noqa: E402
    ChameleonVQConfig, ChameleonVQDecoder, convert_chameleon_vq, load_image_decoder, pixels_to_uint8)
from vllm_visual_ar.model_executors.emu3_vq import convert_emu3_vq  # noqa: E402
from vllm_visual_ar.model_executors.emu3_vq import load_image_decoder as load_emu3_decoder  # noqa: E402

failures = []


def check(name: str, ok: bool, detail: str = ""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def import_package(name: str, root: str, modules: list[str]):
    """Their files in `root` as a package `name` (so their relative imports work)."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [root]
    sys.modules[name] = pkg
    return types.SimpleNamespace(**{m: importlib.import_module(f"{name}.{m}") for m in modules})


# -- Chameleon ------------------------------------------------------------------------------------
CHAMELEON_CASES = {
    "tiny (the test's)": (T.CHAMELEON_TINY, {}, (2, 3)),
    "attention at every level, 3 levels": (dict(n_embed=32, embed_dim=8, z_channels=16, ch=32, ch_mult=[1, 2, 2],
                                                num_res_blocks=2, attn_resolutions=[4, 8, 16], resolution=16,
                                                out_ch=3), {}, (3, 4)),
    "no resample conv, tanh_out, attn_type none": (dict(n_embed=16, embed_dim=4, z_channels=8, ch=32, ch_mult=[1, 2],
                                                        num_res_blocks=1, attn_resolutions=[4], resolution=8,
                                                        out_ch=3),
                                                   dict(resamp_with_conv=False, tanh_out=True, attn_type="none"),
                                                   (2, 2)),
    "Chameleon's pattern (ch_mult 1,1,2,2,4; no attention), narrowed": (
        dict(n_embed=64, embed_dim=16, z_channels=16, ch=32, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
             attn_resolutions=[], resolution=512, out_ch=3), {}, (2, 3)),
}


def their_chameleon(L, cfg: dict, extra: dict, seed: int):
    dd = dict(double_z=False, z_channels=cfg["z_channels"], resolution=cfg["resolution"], in_channels=3,
              out_ch=cfg["out_ch"], ch=cfg["ch"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["num_res_blocks"],
              attn_resolutions=cfg["attn_resolutions"], dropout=0.0, **extra)
    torch.manual_seed(seed)
    model = L.vqgan.VQModel(ddconfig=dd, n_embed=cfg["n_embed"], embed_dim=cfg["embed_dim"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "quantize.embedding.weight":
                p.normal_(0, 1)
            elif p.dim() > 1:
                p.normal_(0, (1 / p[0].numel()) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)
    return model, dd


def write_their_files(model, cfg: dict, dd: dict, root: str):
    import yaml

    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.ones(2, 3, 4, 4)
    ckpt, yml = os.path.join(root, "vqgan.ckpt"), os.path.join(root, "vqgan.yaml")
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    params = {"embed_dim": cfg["embed_dim"], "n_embed": cfg["n_embed"], "ddconfig": dd,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}
    with open(yml, "w") as f:
        yaml.safe_dump({"model": {"params": params}}, f)
    return ckpt, yml


def crosscheck_chameleon(lumina_dir: str, print_expectation: bool):
    L = import_package("lumina_vae", lumina_dir, ["vqgan", "image_tokenizer"])
    for i, (name, (cfg, extra, grid)) in enumerate(CHAMELEON_CASES.items()):
        model, dd = their_chameleon(L, cfg, extra, seed=i)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, yml = write_their_files(model, cfg, dd, tmp)
            tok = L.image_tokenizer.ImageTokenizer(cfg_path=yml, ckpt_path=ckpt, device="cpu")  # their loader
            ours = load_image_decoder(convert_chameleon_vq(ckpt, yml, os.path.join(tmp, "out")))
            gen = torch.Generator().manual_seed(100 + i)
            rows, cols = grid
            for n in range(2):
                codes = torch.randint(0, cfg["n_embed"], (rows * cols,), generator=gen)
                vq = tok._vq_model
                with torch.no_grad():
                    entry = vq.quantize.get_codebook_entry(codes, (1, rows, cols, cfg["embed_dim"]))
                    theirs = vq.decode(entry)
                raw = ours.vq.decode_codes(codes.view(1, rows, cols))
                err = (raw - theirs).abs().max().item()
                check(f"chameleon {name}: decode, image {n}", raw.shape == theirs.shape and err < 1e-5,
                      f"shape {tuple(raw.shape)} max|ours - theirs| = {err:.2e} (max|theirs| "
                      f"{theirs.abs().max().item():.2f})")
                pil = np.asarray(tok.pil_from_img_toks(codes, rows, cols))
                mine = pixels_to_uint8(ours(codes[None], grid))[0].numpy()
                diff = np.abs(pil.astype(int) - mine.astype(int))
                check(f"chameleon {name}: uint8 pixels, image {n}", pil.shape == mine.shape and diff.max() <= 1,
                      f"{pil.shape}, {int((diff > 0).sum())} of {diff.size} values differ (max {diff.max()})")
    # the test's formula weights: their key names and shapes, and their output (CHAMELEON_EXPECTED)
    model, _ = their_chameleon(L, T.CHAMELEON_TINY, {}, seed=0)
    theirs_dec = {k: v.shape for k, v in model.state_dict().items() if k.startswith(("quantize.", "post_quant_conv.",
                                                                                     "decoder."))}
    test_state = T.chameleon_release_weights()
    check("chameleon: the test's release weights carry their decoder key names and shapes",
          {k: v.shape for k, v in test_state.items()} == theirs_dec, f"({len(theirs_dec)} tensors)")
    missing, unexpected = model.load_state_dict(test_state, strict=False)
    check("chameleon: the test's weights load into their VQModel", not unexpected
          and all(k.startswith(("encoder.", "quant_conv.")) for k in missing))
    codes = torch.tensor(T.CHAMELEON_CODES)
    rows, cols = T.CHAMELEON_GRID
    with torch.no_grad():
        theirs = model.decode(model.quantize.get_codebook_entry(codes.flatten(), (1, rows, cols,
                                                                                  T.CHAMELEON_TINY["embed_dim"])))
    if print_expectation:
        print("CHAMELEON_EXPECTED = [" + ", ".join(f"{v:.7g}" for v in theirs.flatten().tolist()) + "]")
    if T.CHAMELEON_EXPECTED is not None:
        err = (theirs.flatten() - torch.tensor(T.CHAMELEON_EXPECTED)).abs().max().item()
        check("chameleon: their decoder gives the test's CHAMELEON_EXPECTED", err < 1e-5, f"max diff {err:.2e}")
    with torch.device("meta"):
        ours_keys = set(ChameleonVQDecoder(ChameleonVQConfig.from_dict(T.CHAMELEON_TINY)).state_dict())
    check("chameleon: our decoder's names are theirs", ours_keys == set(theirs_dec))


# -- Emu3 -----------------------------------------------------------------------------------------
EMU3_CASES = {
    "tiny (the test's shape)": (dict(codebook_size=16, embed_dim=4, z_channels=4, ch=32, ch_mult=[1, 2],
                                     num_res_blocks=1, attn_resolutions=[1]), (3, 5)),
    "release pattern (ch_mult 1,2,2,4, attention at level 3), narrowed": (
        dict(codebook_size=64, embed_dim=4, z_channels=4, ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=2,
             attn_resolutions=[3]), (2, 3)),
}


def crosscheck_emu3(emu3_dir: str):
    E = import_package("emu3_release_tok", emu3_dir, ["configuration_emu3visionvq", "modeling_emu3visionvq"])
    for i, (name, (cfg, grid)) in enumerate(EMU3_CASES.items()):
        torch.manual_seed(i)
        model = E.modeling_emu3visionvq.Emu3VisionVQModel(E.configuration_emu3visionvq.Emu3VisionVQConfig(**cfg))
        model.eval()
        with torch.no_grad():
            for k, t in model.state_dict().items():
                if k.endswith("running_var"):
                    t.uniform_(0.5, 1.5)
                elif k.endswith("running_mean"):
                    t.normal_(0, 0.1)
                elif t.is_floating_point() and "norm" in k and k.endswith("weight"):
                    t.normal_(1, 0.1)
                elif t.is_floating_point() and t.dim() == 1:
                    t.normal_(0, 0.1)
                elif k == "quantize.embedding.weight":
                    t.normal_(0, 1)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(os.path.join(tmp, "release"))
            ours = load_emu3_decoder(convert_emu3_vq(os.path.join(tmp, "release"), os.path.join(tmp, "out")))
        codes = torch.randint(0, cfg["codebook_size"], (2, *grid), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            theirs = model.decode(codes)
        raw = ours.vq.decode_codes(codes)
        err, scale = (raw - theirs).abs().max().item(), theirs.abs().max().item()
        check(f"emu3 {name}: decode", raw.shape == theirs.shape and err / scale < 1e-5,
              f"shape {tuple(raw.shape)} max|ours - theirs| = {err:.2e}, relative to max|theirs| ({scale:.2f}) "
              f"{err / scale:.1e}")
    # the test's release layout (derived from transformers' model) has their names and shapes
    hf = T.tiny_emu3_hf()
    decoder_side = ("decoder.", "quantize.", "post_quant_conv.")
    test_release = {k: v.shape for k, v in T.emu3_release_state(hf).items() if k.startswith(decoder_side)}
    vq = hf.config.vq_config
    rel_cfg = {rel: getattr(vq, hf_name) for hf_name, rel in T.EMU3_RELEASE_NAMES.items()}
    theirs = E.modeling_emu3visionvq.Emu3VisionVQModel(E.configuration_emu3visionvq.Emu3VisionVQConfig(**rel_cfg))
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items() if k.startswith(decoder_side)}
    check("emu3: the test's release-layout decoder names and shapes are the release's", test_release == theirs_shapes,
          f"({len(theirs_shapes)} tensors; only in test: {sorted(set(test_release) - set(theirs_shapes))[:3]}, "
          f"only in theirs: {sorted(set(theirs_shapes) - set(test_release))[:3]})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lumina_dir")
    ap.add_argument("--emu3", help="folder with the release's configuration_/modeling_emu3visionvq.py")
    ap.add_argument("--print-expectation", action="store_true", help="print the test's CHAMELEON_EXPECTED")
    args = ap.parse_args()
    crosscheck_chameleon(args.lumina_dir, args.print_expectation)
    if args.emu3:
        crosscheck_emu3(args.emu3)
    print("all checks passed" if not failures else f"{len(failures)} FAILED: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

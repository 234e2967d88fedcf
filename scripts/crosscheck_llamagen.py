"""Cross-check against LlamaGen's own code, on random weights: the reference GPT (full-sequence
logits, guided and unguided greedy generate) and the VQ tokenizer (decode, encode).

    python scripts/crosscheck_llamagen.py /path/to/LlamaGen-checkout

LlamaGen is not a dependency and nothing of it ships here: point this at a checkout of
FoundationVision/LlamaGen (it imports autoregressive/models/{gpt,generate}.py,
tokenizer/tokenizer_image/vq_model.py and utils/drop_path.py). Exits non-zero on a mismatch.
"""
import os
import sys

import torch

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "LlamaGen")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from autoregressive.models.generate import generate as llamagen_generate  # noqa: E402
from autoregressive.models.gpt import ModelArgs, Transformer  # noqa: E402
from tiny_models import random_reference, tiny_config  # noqa: E402
from tokenizer.tokenizer_image import vq_model as llamagen_vq  # noqa: E402

from vllm_visual_ar.model_executors.llamagen_reference import generate  # noqa: E402
from vllm_visual_ar.model_executors.vq import VQConfig, VQModel  # noqa: E402

failures = []


def check(name: str, ok: bool, detail: str = ""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def check_gpt(grid: int, **dims):
    cfg = tiny_config(grid=grid, **dims)
    ours = random_reference(cfg, seed=3)
    theirs = Transformer(ModelArgs(
        dim=cfg.hidden_size, n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads,
        vocab_size=cfg.codebook_size, num_classes=cfg.num_classes, block_size=grid * grid, cls_token_num=1,
        class_dropout_prob=0.1, token_dropout_p=0, resid_dropout_p=0, ffn_dropout_p=0)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    codes = torch.randint(0, cfg.codebook_size, (3, grid * grid))
    labels = torch.tensor([1, 4, cfg.num_classes])
    with torch.no_grad():
        a = ours(labels, codes[:, :-1])
        b, _ = theirs(codes[:, :-1], labels, input_pos=torch.arange(grid * grid))
    err = ((a - b).abs().max() / b.abs().max()).item()
    check(f"GPT grid {grid} logits", err <= 1e-5, f"(max relative error {err:.1e})")
    for scale in (4.0, 1.0):
        with torch.no_grad():
            theirs.setup_caches(max_batch_size=6, max_seq_length=1 + grid * grid, dtype=torch.float32)
            expected = llamagen_generate(theirs, torch.tensor([1, 4, 7]), grid * grid, cfg_scale=scale,
                                         cfg_interval=-1, temperature=1.0, top_k=1, top_p=1.0)
            got = generate(ours, [1, 4, 7], guidance_scale=scale, top_k=1).codes
        check(f"GPT grid {grid} greedy generate, guidance {scale}", torch.equal(expected, got))


def check_vq():
    cfg = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32)
    ours = VQModel(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.1)
    theirs = llamagen_vq.VQModel(llamagen_vq.ModelArgs(
        codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=32))
    # LlamaGen's VQModel fixes ch=128 and num_res_blocks=2; rebuild its halves at our sizes.
    theirs.encoder = llamagen_vq.Encoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32)
    theirs.decoder = llamagen_vq.Decoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32)
    theirs.load_state_dict(dict(ours.state_dict(), **{"quantize.codebook_used": theirs.quantize.codebook_used}))
    theirs.eval()
    codes = torch.randint(0, 64, (2, 8, 8))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        err = (ours.decode_codes(codes) - theirs.decode_code(codes.flatten(), [2, 8, 8, 8])).abs().max().item()
        same_codes = torch.equal(ours.encode(images)[1], theirs.encode(images)[2][2].view(2, 8, 8))
    check("VQ decode", err <= 1e-5, f"(max abs error {err:.1e})")
    check("VQ encode codes", same_codes)


if __name__ == "__main__":
    torch.manual_seed(0)
    check_gpt(8, hidden_size=128, num_hidden_layers=2, num_attention_heads=2)
    check_gpt(16, hidden_size=256, num_hidden_layers=3, num_attention_heads=4)
    check_vq()
    sys.exit(1 if failures else 0)

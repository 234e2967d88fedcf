"""Lumina-mGPT's Chameleon decoder (`model_executors/chameleon.py`) in vLLM's stock engine, against
transformers' `ChameleonForConditionalGeneration` on tiny random folders: logits and greedy tokens
equal HF's `lm_head(model.model(...))` (HF's image-token mask bypassed, as image generation needs),
and Lumina-mGPT's per-rank qk-norm layout loads to the same model as HF's expanded one."""
import json

import pytest
import torch
from conftest import raw_logits, rel_err
from safetensors.torch import load_file, save_file

ARCH = "ChameleonXLLMXForConditionalGeneration"
VOCAB, IMAGE_TOKENS = 320, range(64, 320)  # ids 64.. are named as image tokens (IMGIMG...)
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 32      # head size 32: the smallest vLLM's CPU attention takes
MP = 2                                    # "training ranks" of the per-rank qk-norm layout
PROMPTS = [[1, 5, 9, 200, 17], [1, 3], [1, 70, 71, 72, 300, 2, 8, 150, 33]]
NEW_TOKENS = 12


def tiny_hf_config(swin_norm: bool = False, tie_word_embeddings: bool = False):
    from transformers import ChameleonConfig

    vocabulary_map = {f"<tok{i}>": i for i in range(IMAGE_TOKENS.start)}
    vocabulary_map["<image>"] = 4
    for i in IMAGE_TOKENS:  # HF's naming: IMGIMG + the VQ index in letters A-J for digits + Z
        vocabulary_map["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i - 64)) + "Z"] = i
    return ChameleonConfig(
        vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, model_parallel_size=MP,
        swin_norm=swin_norm, tie_word_embeddings=tie_word_embeddings, vocabulary_map=vocabulary_map,
        vq_config=dict(embed_dim=8, num_embeddings=256, latent_channels=8, resolution=32, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[]))


def random_hf_model(swin_norm: bool = False, tie_word_embeddings: bool = False, seed: int = 0):
    """HF model with weights far from flat; the qk-norm gamma/beta are drawn per training rank
    ([MP, head_dim]) and widened as transformers' converter does (repeat_interleave), so each
    block of heads has its own. -> (model, {qk-norm name: stored [MP, head_dim]})."""
    from transformers import ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(tiny_hf_config(swin_norm, tie_word_embeddings)).eval()
    per_rank = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.vqmodel."):
                continue
            if "_norm." in name and name.split(".")[-2] in ("q_norm", "k_norm"):
                stored = torch.randn(MP, HEAD_DIM) * 0.3 + (1.0 if name.endswith("weight") else 0.0)
                per_rank[name] = stored
                p.copy_(stored.repeat_interleave(p.shape[0] // MP, dim=0))
            elif "layernorm" in name or name == "model.norm.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.5 if name in ("lm_head.weight", "model.embed_tokens.weight") else 0.08)
    return model, per_rank


def write_folder(model, folder, per_rank: dict | None = None) -> str:
    """save_pretrained (safetensors), config.json naming Lumina-mGPT's architecture and carrying its
    extra keys. per_rank: the folder as Lumina-mGPT's release writes it instead: those qk-norm
    tensors stored per training rank ([ranks, head_dim]), and RoPE as the older transformers that
    wrote them spell it (top-level rope_theta / rope_scaling, no rope_parameters)."""
    model.save_pretrained(folder, safe_serialization=True)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(architectures=[ARCH], z_loss_weight=1e-5, mask_image_logits=True, dropout=0.05)
    if per_rank:
        rope = cfg.pop("rope_parameters")
        assert rope["rope_type"] == "default"
        cfg.update(rope_theta=rope["rope_theta"], rope_scaling=None)
        (weights_file,) = folder.glob("*.safetensors")
        state = load_file(weights_file)
        assert all(state[name].shape[0] in (HEADS, KV_HEADS) for name in per_rank)
        state.update({name: t.contiguous() for name, t in per_rank.items()})
        save_file(state, weights_file, metadata={"format": "pt"})
    cfg_path.write_text(json.dumps(cfg))
    return str(folder)


_ALIVE = []  # engines live until the session ends: closing an in-process engine tears down vLLM's
#            process-wide parallel state under other test modules' engines (see conftest's make_generator)


def make_llm(folder: str):
    from vllm import LLM

    # No tokenizer (prompts are token ids); raw logits come back as logprobs over the whole vocabulary.
    _ALIVE.append(LLM(model=folder, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                      max_model_len=128, max_num_seqs=8, max_num_batched_tokens=256, seed=0,
                      enable_prefix_caching=False, max_logprobs=VOCAB, logprobs_mode="raw_logits",
                      num_gpu_blocks_override=16))  # a small cache: engines live for the session
    return _ALIVE[-1]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """{variant: (engine, HF reference)}: HF-expanded qk-norm, Lumina per-rank qk-norm (same model),
    and the swin_norm (post-norm) variant, which also ties lm_head to the embeddings."""
    root = tmp_path_factory.mktemp("chameleon")
    model, per_rank = random_hf_model()
    swin, _ = random_hf_model(swin_norm=True, tie_word_embeddings=True, seed=1)
    return {
        "hf": (make_llm(write_folder(model, root / "hf")), model),
        "per_rank": (make_llm(write_folder(model, root / "per_rank", per_rank)), model),
        "swin": (make_llm(write_folder(swin, root / "swin")), swin),
    }


def run(llm, prompts, n=NEW_TOKENS):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=VOCAB, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), raw_logits(o, VOCAB)) for o in outs]


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), VOCAB]: lm_head(model.model(...)), i.e. without HF's image-token mask."""
    return model.lm_head(model.model(input_ids=torch.tensor([ids])).last_hidden_state)[0]


def hf_greedy(model, prompt: list[int], n=NEW_TOKENS) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def results(engines):
    return {name: run(llm, PROMPTS) for name, (llm, _) in engines.items()}


@pytest.mark.parametrize("variant", ["hf", "swin"])
def test_logits_and_greedy_tokens_equal_hf(results, engines, variant):
    model = engines[variant][1]
    for prompt, (tokens, logits) in zip(PROMPTS, results[variant]):
        assert not logits.isnan().any()
        expected = hf_logits(model, prompt + tokens)[len(prompt) - 1: -1]
        assert rel_err(logits, expected) <= 1e-4
        assert tokens == hf_greedy(model, prompt)


def test_image_tokens_are_not_masked(results, engines):
    """HF's own forward sets image-token logits to min; ours keeps them: the random model's greedy
    runs sample image tokens, and HF's masked forward would not."""
    tokens = [t for toks, _ in results["hf"] for t in toks]
    assert any(t in IMAGE_TOKENS for t in tokens)
    model = engines["hf"][1]
    with torch.no_grad():
        masked = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert (masked[list(IMAGE_TOKENS)] == torch.finfo(masked.dtype).min).all()


def test_per_rank_qk_norm_loads_as_expanded(results):
    for (tok_a, log_a), (tok_b, log_b) in zip(results["hf"], results["per_rank"]):
        assert tok_a == tok_b
        assert rel_err(log_b, log_a) <= 1e-5


def test_expansion_is_repeat_interleave():
    """A row per training rank serves a contiguous block of heads (Lumina-mGPT's
    `ChameleonLayerNorm.repeat_param`), not heads r, r + ranks, ... (torch.repeat)."""
    from vllm_visual_ar.model_executors.chameleon import expand_per_rank

    stored = torch.arange(2.0)[:, None].expand(2, 3)
    assert expand_per_rank(stored, 4)[:, 0].tolist() == [0, 0, 1, 1]
    row = torch.randn(1, 3)  # Lumina-mGPT-7B's layout: one rank, [1, head_dim]
    assert torch.equal(expand_per_rank(row, 4), row.expand(4, 3))
    full = torch.randn(4, 3)  # transformers' layout: already one row per head
    assert torch.equal(expand_per_rank(full, 4), full)
    with pytest.raises(ValueError):
        expand_per_rank(torch.ones(3, 3), 4)

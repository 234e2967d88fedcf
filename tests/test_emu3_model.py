"""The Emu3 LM in vLLM's engine against transformers' Emu3ForConditionalGeneration (text model +
lm_head), from tiny random models written in both folder layouts the plugin reads:
- "hf": transformers' (`save_pretrained`: config with text_config/vq_config, LM weights under
  `text_model.model.*` / `text_model.lm_head`, VQ-VAE weights under `vqmodel.*`), served under the
  plugin's architecture name `Emu3GenForConditionalGeneration` through `hf_overrides`;
- "release": the original release's (flat config, model_type "Emu3", an auto_map into remote code
  that must not be needed; `model.*` / `lm_head` weights in two shards with an index), served as
  `Emu3ForCausalLM`;
- "release-linear-tied": the release layout with linear rope scaling and tied embeddings (no
  lm_head in the checkpoint), against a transformers model configured the same way.
One engine per folder, started once for the module; each answers all prompts greedily with the raw
logits of every generated position.
"""
import json

import pytest
import torch
from conftest import raw_logits, rel_err
from safetensors.torch import save_file

VOCAB = 300
N_VISUAL = 64  # visual tokens sit at the top of the vocabulary, as in Emu3
MAX_TOKENS = 12
PROMPTS = [[1, 5, 17, 42], [1, 236, 250, 299, 7, 200, 201], [1, 3]]
# head_dim 32 (vLLM's CPU attention has no kernel for 16); 4 query heads over 2 KV heads.
TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, attention_dropout=0.1,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.1)  # larger than the default 0.02, so greedy choices are not near-ties
THETA = 1e6  # the release's rope_theta
LINEAR = {"type": "linear", "factor": 2.0}
VQ = dict(codebook_size=N_VISUAL, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
          num_res_blocks=1, attn_resolutions=[], hidden_size=32, temporal_downsample_factor=1)
HF_ARCH = "Emu3GenForConditionalGeneration"
LAYOUTS = ["hf", "release", "release-linear-tied"]

_ENGINES = []  # kept alive to the end of the session, as conftest's make_generator does


def make_reference(seed: int, rope_scaling: dict | None = None, tie: bool = False):
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vocabulary_map = {f"<t{i}>": i for i in range(VOCAB - N_VISUAL)}
    vocabulary_map.update({"<|extra_200|>": 200, "<image>": 201})
    vocabulary_map.update({f"<|visual token{j:06d}|>": VOCAB - N_VISUAL + j for j in range(N_VISUAL)})
    rope = {"rope_type": "default", "rope_theta": THETA}
    if rope_scaling is not None:
        rope = {"rope_type": rope_scaling["type"], "factor": rope_scaling["factor"], "rope_theta": THETA}
    torch.manual_seed(seed)
    config = Emu3Config(text_config=dict(TEXT, rope_parameters=rope, tie_word_embeddings=tie), vq_config=VQ,
                        vocabulary_map=vocabulary_map, tie_word_embeddings=tie)
    model = Emu3ForConditionalGeneration(config).eval()
    assert (model.lm_head.weight is model.model.text_model.embed_tokens.weight) == tie
    return model


@pytest.fixture(scope="module")
def references():
    base = make_reference(0)
    return {"hf": base, "release": base, "release-linear-tied": make_reference(1, LINEAR, tie=True)}


def release_config(rope_scaling: dict | None = None, tie: bool = False) -> dict:
    """config.json as the release writes it (fields of its configuration_emu3.Emu3Config)."""
    return dict(
        architectures=["Emu3ForCausalLM"], model_type="Emu3",
        auto_map={"AutoConfig": "configuration_emu3.Emu3Config",
                  "AutoModelForCausalLM": "modeling_emu3.Emu3ForCausalLM"},
        vocab_size=VOCAB, hidden_size=TEXT["hidden_size"], intermediate_size=TEXT["intermediate_size"],
        num_hidden_layers=TEXT["num_hidden_layers"], num_attention_heads=TEXT["num_attention_heads"],
        num_key_value_heads=TEXT["num_key_value_heads"], hidden_act="silu",
        max_position_embeddings=TEXT["max_position_embeddings"], initializer_range=TEXT["initializer_range"],
        rms_norm_eps=TEXT["rms_norm_eps"], use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        img_token_id=201, boi_token_id=202, eoi_token_id=203, eol_token_id=200, eof_token_id=204,
        image_area=262144, pretraining_tp=1, tie_word_embeddings=tie, rope_theta=THETA,
        rope_scaling=rope_scaling, attention_dropout=0.1, torch_dtype="float32", transformers_version="4.44.0")


def write_release(folder, reference, config: dict):
    """The LM weights of `reference` under the release's names, in two shards with an index."""
    folder.mkdir()
    weights = {}
    for name, tensor in reference.state_dict().items():
        if name.startswith("model.text_model."):
            weights["model." + name[len("model.text_model."):]] = tensor.clone()
        elif name.startswith("lm_head.") and not config["tie_word_embeddings"]:
            weights[name] = tensor.clone()
    assert len(weights) == 2 + 9 * TEXT["num_hidden_layers"] + (not config["tie_word_embeddings"])
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, shard in shards.items():
        save_file({n: weights[n] for n in shard}, str(folder / file))
        weight_map.update({n: file for n in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def folders(references, tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3")
    references["hf"].save_pretrained(root / "hf")
    return {"hf": root / "hf",
            "release": write_release(root / "release", references["release"], release_config()),
            "release-linear-tied": write_release(root / "release-linear-tied", references["release-linear-tied"],
                                                 release_config(LINEAR, tie=True))}


def make_engine(folder, **kwargs):
    from vllm import LLM

    llm = LLM(model=str(folder), skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=64,
              max_num_seqs=4, max_logprobs=VOCAB, logprobs_mode="raw_logits", seed=0,
              num_gpu_blocks_override=16, **kwargs)  # a small cache: engines live for the session
    _ENGINES.append(llm)
    return llm


@pytest.fixture(scope="module")
def engine_outputs(folders):
    """{layout: greedy outputs of PROMPTS with the raw logits of every generated position}."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False,
                            logprobs=VOCAB)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outputs = {}
    for layout, folder in folders.items():
        overrides = {"hf_overrides": {"architectures": [HF_ARCH]}} if layout == "hf" else {}
        outputs[layout] = make_engine(folder, **overrides).generate(prompts, params, use_tqdm=False)
    return outputs


def reference_logits(ref, ids: list[int]) -> torch.Tensor:
    """[len(ids), VOCAB]: transformers' text model + lm_head."""
    with torch.no_grad():
        hidden = ref.model.text_model(input_ids=torch.tensor([ids])).last_hidden_state
        return ref.lm_head(hidden)[0]


def reference_greedy(ref, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(MAX_TOKENS):
        last = reference_logits(ref, ids)[-1]
        top2 = last.topk(2).values
        assert (top2[0] - top2[1]) > 1e-4 * last.abs().max(), "near-tie: the comparison would be fragile"
        ids.append(int(last.argmax()))
    return ids[len(prompt):]


def test_checkpoint_layouts_name_the_same_lm_weights(references, folders):
    """transformers' in-memory names, its saved names and the release's names load the same
    parameters; the VQ-VAE's weights are skipped."""
    from safetensors import safe_open

    from vllm_visual_ar.model_executors.emu3 import our_weight_name

    with safe_open(str(folders["hf"] / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    memory = list(references["hf"].state_dict())
    release = [n.replace("model.text_model.", "model.") for n in memory if n.startswith("model.text_model.")]
    release.append("lm_head.weight")
    assert [our_weight_name(n) for n in release] == release
    assert any(n.startswith("text_model.model.") for n in saved)  # transformers 5 writes the hub layout
    for names in (saved, memory):
        lm = sorted(n for n in map(our_weight_name, names) if n is not None)
        assert lm == sorted(release)
        assert all(our_weight_name(n) is None for n in names if "vqmodel." in n)
    assert "model.embed_tokens.weight" in release


@pytest.mark.parametrize("layout", LAYOUTS)
def test_engine_logits_equal_transformers_logits(engine_outputs, references, layout):
    for prompt, output in zip(PROMPTS, engine_outputs[layout]):
        generated = list(output.outputs[0].token_ids)
        assert len(generated) == MAX_TOKENS
        got = raw_logits(output, VOCAB)
        assert not got.isnan().any()
        expected = reference_logits(references[layout], prompt + generated[:-1])[len(prompt) - 1:]
        assert rel_err(got, expected) <= 1e-4, (layout, prompt)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_generation_equals_transformers_loop(engine_outputs, references, layout):
    for prompt, output in zip(PROMPTS, engine_outputs[layout]):
        assert list(output.outputs[0].token_ids) == reference_greedy(references[layout], prompt), (layout, prompt)

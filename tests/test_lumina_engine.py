"""Lumina-mGPT text-to-image through vLLM's engine (raster order), against the plain-PyTorch loop
over transformers' Chameleon (`model_executors/t2i_reference.py`), token for token: text prompts
built with the folder's tokenizer, guidance with the unconditional image header or a negative
prompt, end-of-line and image-end tokens placed by the engine, several sizes, decoding to pixels."""
import pytest
import torch
from conftest import t2i_reference
from tiny_models import CHAMELEON_TINY, write_tiny_lumina_folder

from vllm_visual_ar.model_executors import chameleon_t2i as lumina

GREEDY = dict(top_k=1)
PIXELS_PER_CODE = 2 ** (len(CHAMELEON_TINY["ch_mult"]) - 1)  # the tiny VQGAN's (the real one: 16)


@pytest.fixture(scope="module")
def tiny_lumina(tmp_path_factory):
    return write_tiny_lumina_folder(tmp_path_factory.mktemp("lumina"))


@pytest.fixture(scope="module")
def lumina_generator(tiny_lumina, make_generator):
    return make_generator(tiny_lumina[0], max_images_in_flight=4)


def lumina_cfg(cond, uncond, scale):
    """Lumina-mGPT's guidance, written out here (`inference_solver.py`'s CFG processor: raw logits)."""
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_text_to_image_equals_reference(lumina_generator, tiny_lumina, guidance_scale):
    prompts = ["a red cat on a mat", "a blue dog at dusk"]
    images = lumina_generator.generate(prompts=prompts, guidance_scale=guidance_scale, **GREEDY)
    for image, text in zip(images, prompts):
        layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, guidance_scale)
        assert (layout.rows, layout.cols) == (4, 4)  # 64 px at 16 px per code
        assert image.prompt == text and image.class_id is None
        assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
        assert image.stats.tokens == layout.num_tokens == 4 * 5 + 1  # an end of line per row, the image end
        assert image.image.size == (4 * PIXELS_PER_CODE, 4 * PIXELS_PER_CODE)
    assert not torch.equal(images[0].codes, images[1].codes)  # the text matters


def test_negative_prompt_and_size(lumina_generator, tiny_lumina):
    text = "a green cat"
    plain = lumina_generator.generate(prompts=[text], guidance_scale=3.0, **GREEDY)[0]
    negative = lumina_generator.generate(prompts=[text], guidance_scale=3.0, negative_prompt="blurry low quality",
                                         **GREEDY)[0]
    layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, 3.0,
                                     negative_prompt="blurry low quality")
    assert torch.equal(negative.codes.flatten(), layout.codes_of(expected))
    assert not torch.equal(plain.codes, negative.codes)
    wide = lumina_generator.generate(prompts=[text], guidance_scale=3.0, size="128x32", **GREEDY)[0]
    layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, 3.0, size=(128, 32))
    assert (layout.rows, layout.cols) == (2, 8) and wide.codes.shape == (2, 8)
    assert torch.equal(wide.codes.flatten(), layout.codes_of(expected))
    assert wide.image.size == (8 * PIXELS_PER_CODE, 2 * PIXELS_PER_CODE)


def test_engine_places_end_of_line_and_image_end(lumina_generator, tiny_lumina):
    """Through plain `LLM.generate` with the documented request format: every row ends with the
    end-of-line token and the image with <eoss>, whatever the model's logits."""
    from vllm_visual_ar.requests import SamplingSettings, image_requests

    gen = lumina_generator
    reqs = image_requests(gen.config, "a cat", SamplingSettings(guidance_scale=3.0, temperature=1.0, top_k=0),
                          seed=3, tokenizer=gen.tokenizer)
    out = gen.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    tokens = out[0].outputs[0].token_ids
    layout = gen.layout
    vocab = lumina.vocab_of(gen.config)
    for i, t in enumerate(tokens):
        assert t == layout.forced(i) if layout.forced(i) is not None else t in vocab.code_ids
    assert tokens[-1] == vocab.image_end and tokens[layout.cols] == vocab.end_of_line
    assert list(out[1].outputs[0].token_ids) == list(tokens)  # both streams carry the image


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[""]), "prompt must be non-empty"), (dict(classes=[1]), "text-to-image"),
    (dict(prompts=["a cat"], size="100x100"), "allowed"), (dict(prompts=["a cat"], size="big"), "size"),
    (dict(prompts=["a cat"], negative_prompt=""), "negative_prompt"),
    (dict(prompts=["a cat"], strategy="zipar", window=2), "text-to-image"),
    (dict(prompts=["cat " * 2000]), "max_model_len|longer"),
])
def test_bad_text_to_image_input(lumina_generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lumina_generator.generate(**kwargs)
    assert lumina_generator.generate(prompts=["a cat"], **GREEDY)[0].stats.tokens == lumina_generator.layout.num_tokens


def test_cli_converts_and_generates_from_text(tmp_path, tiny_lumina):
    """`convert lumina` from the release files, then `generate --prompt --size` in its own process."""
    import os
    import subprocess
    import sys

    from vllm_visual_ar.cli import main

    release = [d for d in os.listdir(os.path.dirname(tiny_lumina[0])) if d.startswith("Lumina-mGPT")][0]
    root = os.path.dirname(tiny_lumina[0])
    out = str(tmp_path / "converted")
    assert main(["convert", "lumina", "--hf", os.path.join(root, release), "--vqgan-ckpt",
                 os.path.join(root, "vqgan.ckpt"), "--vqgan-yaml", os.path.join(root, "vqgan.yaml"),
                 "--out", out]) == 0
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    done = subprocess.run([sys.executable, "-m", "vllm_visual_ar.cli", "generate", "--model", out, "--prompt",
                           "a red cat", "--prompt", "a blue dog", "--size", "128x32", "--n", "1", "--seed", "0",
                           "--out", str(tmp_path / "images")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "images")) == ["grid.png", "prompt0_0.png", "prompt1_0.png"]
    bad = subprocess.run([sys.executable, "-m", "vllm_visual_ar.cli", "generate", "--model", out, "--classes", "3",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "--prompt" in bad.stderr

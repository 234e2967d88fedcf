"""Emu3-Gen text-to-image through vLLM's engine (raster order), against the plain-PyTorch loop over
transformers' Emu3 (`model_executors/t2i_reference.py`), token for token: its prompt format with
the positive suffix, the release's negative prompt as uncond (or the user's), guidance in
log-softmax space, end-of-line after every row and EOF, image end, EOS placed by the engine, two
aspect ratios, decoding with its vision tokenizer."""
import pytest
import torch
from conftest import t2i_reference
from tiny_models import write_tiny_emu3_folder


GREEDY = dict(top_k=1)


@pytest.fixture(scope="module")
def tiny_emu3(tmp_path_factory):
    return write_tiny_emu3_folder(tmp_path_factory.mktemp("emu3"))


@pytest.fixture(scope="module")
def emu3_generator(tiny_emu3, make_generator):
    return make_generator(tiny_emu3[0], max_images_in_flight=4)


def emu3_cfg(cond, uncond, scale):
    """Emu3's guidance, written out here (transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor:
    log-softmax space)."""
    c, u = cond.log_softmax(-1), uncond.log_softmax(-1)
    return u + scale * (c - u)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_emu3_equals_reference(emu3_generator, tiny_emu3, guidance_scale):
    prompts = ["a red cat on a mat", "a blue dog at dusk"]
    images = emu3_generator.generate(prompts=prompts, guidance_scale=guidance_scale, **GREEDY)
    for image, text in zip(images, prompts):
        layout, expected = t2i_reference(emu3_generator, tiny_emu3[1], emu3_cfg, text, guidance_scale)
        assert (layout.rows, layout.cols) == (8, 8)  # 64 x 64 px at 8 px per visual token
        assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
        assert image.stats.tokens == layout.num_tokens == 8 * 9 + 3  # EOL per row; EOF, image end, EOS
    assert not torch.equal(images[0].codes, images[1].codes)


def test_emu3_negative_prompt_ratio_and_placed_tokens(emu3_generator, tiny_emu3):
    from vllm_visual_ar.model_executors import emu3_t2i
    from vllm_visual_ar.requests import SamplingSettings, image_requests

    gen, text = emu3_generator, "a green cat"
    negative = gen.generate(prompts=[text], guidance_scale=3.0, negative_prompt="blurry low quality", **GREEDY)[0]
    layout, expected = t2i_reference(gen, tiny_emu3[1], emu3_cfg, text, 3.0,
                                     negative_prompt="blurry low quality")
    assert torch.equal(negative.codes.flatten(), layout.codes_of(expected))
    wide_size = emu3_t2i.resolutions(64 * 64)[emu3_t2i.RATIOS.index("16:9")]
    wide = gen.generate(prompts=[text], guidance_scale=3.0, size=wide_size, **GREEDY)[0]
    layout, expected = t2i_reference(gen, tiny_emu3[1], emu3_cfg, text, 3.0, size=wide_size)
    assert layout.cols > layout.rows and wide.codes.shape == (layout.rows, layout.cols)
    assert torch.equal(wide.codes.flatten(), layout.codes_of(expected))
    reqs = image_requests(gen.config, "a cat", SamplingSettings(guidance_scale=3.0, temperature=1.0, top_k=0),
                          seed=2, tokenizer=gen.tokenizer)
    tokens = gen.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)[0].outputs[0].token_ids
    vocab = emu3_t2i.vocab_of(gen.config)
    assert list(tokens[-3:]) == [vocab.end_of_frame, vocab.image_end, vocab.eos]
    assert all(t == gen.layout.forced(i) if gen.layout.forced(i) is not None else t in vocab.image_token_ids
               for i, t in enumerate(tokens))


@pytest.mark.parametrize("strategy,window,guidance_scale", [("zipar", 3, 3.0), ("zipar", 5, 1.0),
                                                            ("sjd", 6, 3.0), ("sjd", 16, 1.0),
                                                            ("zipar_sjd", 3, 3.0), ("zipar_sjd", 2, 1.0)])
def test_zipar_and_sjd_on_emu3(emu3_generator, tiny_emu3, strategy, window, guidance_scale):
    """ZipAR equals the ZipAR loop over transformers' Emu3 (the authors ship no Emu3 code: the Lumina
    rule, an end of line per row, applies as is), ZipAR x SJD (an SJD window of 4 per row) its loop,
    greedy SJD greedy raster. The three tokens after the last row are placed, never sampled or
    rejected."""
    from vllm_visual_ar.samplers.zipar import forward_passes

    text = "a blue cat at dusk"
    sjd_window = 4 if strategy == "zipar_sjd" else None
    image = emu3_generator.generate(prompts=[text], guidance_scale=guidance_scale, strategy=strategy, window=window,
                                    sjd_window=sjd_window, **GREEDY)[0]
    layout, expected, forwards = t2i_reference(emu3_generator, tiny_emu3[1], emu3_cfg, text, guidance_scale,
                                               window=window if strategy != "sjd" else None, sjd_window=sjd_window,
                                               forwards=True)
    assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
    if strategy != "sjd":
        assert image.stats.forward_passes == forwards
    if strategy == "zipar":
        assert forwards == forward_passes(layout.rows, layout.cols, window, row_end=True)
    assert image.stats.forward_passes < layout.num_tokens

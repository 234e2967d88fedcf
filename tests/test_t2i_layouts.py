"""Text-to-image request layouts of Lumina-mGPT (Chameleon vocabulary) and Emu3-Gen: sizes, the
image's token layout, cond/uncond prompt ids and the guidance mix, on tiny tokenizers built here
(every special token of the family, at the real vocabularies' relative positions) and on name -> id
maps with the real ids. Cross-checked against transformers' `ChameleonImageVocabularyMapping`,
`ChameleonProcessor`, `Emu3Processor(return_for_image_generation=True)` and
`UnbatchedClassifierFreeGuidanceLogitsProcessor`, and against the original releases' rules (restated
in the helpers below). No engine, no model."""
import random
import re

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vllm_visual_ar.model_executors import chameleon_t2i as lumina
from vllm_visual_ar.model_executors import emu3_t2i as emu3

WORD = r"[A-Za-z]+|\d|[^\w\s]|\n"  # words, single digits (as Qwen/Emu3), punctuation, newlines


def _word_level(vocab: dict, specials: list[str], unk: str) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _words(*texts: str) -> list[str]:
    seen = {}
    for text in texts:
        for w in re.findall(WORD, text):
            seen.setdefault(w, None)
    return list(seen) + [str(d) for d in range(10)]


CAPTION = "a cat on a mat, at dusk."
NEGATIVE = "blurry, low quality."

# ---- Lumina-mGPT / Chameleon -------------------------------------------------------------------

N_CODES = 120  # names with one, two and three letters, so name order differs from code order


def code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def chameleon_vocab() -> dict[str, int]:
    """<s> <pad> </s> <unk> at 0..3, the image tokens from 4 in name order (a BPE vocabulary's, so
    code != id - 4), <eoss>, <racm3:break>, reserved tokens keeping their relative spacing
    (<reserved08707> renamed <image>, as transformers' converter does), then text words."""
    vocab = {n: i for i, n in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for name in sorted(code_name(c) for c in range(N_CODES)):
        vocab[name] = len(vocab)
    vocab["<eoss>"] = len(vocab)
    vocab["<racm3:break>"] = len(vocab)
    for j in range(8700, 8870):
        vocab["<image>" if j == 8707 else f"<reserved{j:05d}>"] = len(vocab)
    template = lumina.PROMPT_TEMPLATE.format(width=0, height=0, prompt="")
    for w in _words(template, CAPTION, NEGATIVE, "x"):
        vocab.setdefault(w, len(vocab))
    return vocab


def chameleon_tokenizers():
    """(tokenizers.Tokenizer, transformers tokenizer): BOS added by the post-processor, sep =
    <reserved08706> (what transformers' Chameleon converter sets, `sep_token_id = 8710`)."""
    vocab = chameleon_vocab()
    specials = [n for n in vocab if n.startswith("<") and n != "<"]
    tok = _word_level(vocab, specials, "<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", sep_token="<reserved08706>")
    return tok, hf


def lumina_rule(layout, k: int) -> str:
    """`MultiModalLogitsProcessor` (lumina_mgpt/inference_solver.py), generated token k = 1, 2, ...
    after the width token: 'eol', 'end' or 'code'."""
    w, h = layout.cols, layout.rows
    if k % (w + 1) == 0:
        return "eol"
    if k == (w + 1) * h + 1:
        return "end"
    return "code"


def layout_sequence(layout) -> list[str]:
    """The roles of the generated tokens as the layout places them."""
    seq = []
    for _ in range(layout.rows):
        seq += ["code"] * layout.cols + (["eol"] if layout.row_end is not None else [])
    return seq + ["end"] * len(layout.image_end)


def test_lumina_resolutions_and_grid():
    assert [len(lumina.resolutions(t)) for t in (512, 768, 1024)] == [49, 73, 97]
    for target in (512, 768, 1024):
        sizes = lumina.resolutions(target)
        assert (target, target) in sizes
        budget = (target // 32) ** 2
        for w, h in sizes:
            assert w % 32 == 0 and h % 32 == 0 and (w // 32) * (h // 32) <= budget and max(w, h) <= 4 * min(w, h)
    assert lumina.resolutions(768)[0] == (1536, 384) and lumina.resolutions(768)[-1] == (384, 1536)
    assert lumina.grid((768, 768), 768) == (48, 48)
    assert lumina.grid((1536, 384), 768) == (24, 96)  # rows = height / 16, cols = width / 16
    assert lumina.grid((1024, 576), 768) == (36, 64)


@pytest.mark.parametrize("size,target", [((256, 256), 512), ((1024, 512), 768), ((800, 800), 768),
                                         ((768, 768), 512), ("768x768", 768), ((768,), 768)])
def test_lumina_bad_size(size, target):
    with pytest.raises(ValueError, match=r"allowed width x height: .*\b%dx%d\b" % (target, target)):
        lumina.grid(size, target)
    _, hf = chameleon_tokenizers()
    for call in (lambda: lumina.image_layout(hf, size, target), lambda: lumina.prompt_ids(hf, CAPTION, size, target),
                 lambda: lumina.uncond_ids(hf, None, size, target)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="multiple of 32"):
        lumina.resolutions(500)


def test_lumina_code_mapping_matches_transformers():
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    tok, hf = chameleon_tokenizers()
    vocab = chameleon_vocab()
    mapping = ChameleonImageVocabularyMapping(vocab)
    for source in (hf, tok, vocab):
        v = lumina.LuminaVocab.of(source)
        assert list(v.image_token_ids) == mapping.image_tokens == list(range(4, 4 + N_CODES))
        assert {t: int(v.bpe2img[t - v.image_token_ids.start]) for t in v.image_token_ids} == mapping.bpe2img
        assert torch.equal(v.img2bpe, mapping.img2bpe_mapping_tensor.long())
        assert torch.equal(v.img2bpe[v.bpe2img], torch.arange(v.image_token_ids.start, v.image_token_ids.stop))
        assert not torch.equal(v.bpe2img, torch.arange(N_CODES))  # a real permutation is exercised
        assert int(v.img2bpe[12]) == vocab[code_name(12)] and int(v.bpe2img[vocab[code_name(12)] - 4]) == 12
        assert (v.bos, v.image_end, v.image_start) == (0, vocab["<eoss>"], vocab["<racm3:break>"])
        assert (v.end_of_turn, v.end_of_line) == (vocab["<reserved08706>"], vocab["<reserved08799>"])


def test_lumina_vocab_errors():
    vocab = chameleon_vocab()
    gap = dict(vocab)
    gap[code_name(3)] = max(vocab.values()) + 1  # one image token moved away: ids not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        lumina.LuminaVocab.of(gap)
    missing = {n: i for n, i in vocab.items() if n != "<reserved08799>"}
    with pytest.raises(ValueError, match="reserved08799"):
        lumina.LuminaVocab.of(missing)


@pytest.mark.parametrize("size", [(128, 128), (256, 64), (96, 160)])
def test_lumina_layout(size):
    tok, hf = chameleon_tokenizers()
    vocab = chameleon_vocab()
    layout = lumina.image_layout(hf, size, target_size=128)
    w, h = size
    assert (layout.rows, layout.cols) == (h // 16, w // 16)
    assert layout.image_token_ids == range(4, 4 + N_CODES)
    assert layout.row_end == vocab["<reserved08799>"] and layout.image_end == (vocab["<eoss>"],)
    assert layout.num_tokens == layout.rows * (layout.cols + 1) + 1
    roles = layout_sequence(layout)
    assert roles == [lumina_rule(layout, k) for k in range(1, len(roles) + 1)]
    # decode_image: latent dims are 2 * (resolution token - base); here base = id of <reserved08800>
    header = lumina.uncond_ids(hf, None, size, target_size=128)
    base = vocab["<reserved08800>"]
    assert (2 * (header[1] - base), 2 * (header[2] - base)) == (layout.rows, layout.cols)


def test_lumina_real_ids():
    """The released vocabulary's ids (Lumina-mGPT's and ZipAR's hard-coded 4..8195, 8196, 8197, 8710,
    8803, 8804 + n): a name -> id map holding the names at those ids."""
    rng = random.Random(0)
    codes = list(range(8192))
    rng.shuffle(codes)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 8196, "<racm3:break>": 8197}
    vocab.update({code_name(c): 4 + i for i, c in enumerate(codes)})
    vocab.update({f"<reserved{j:05d}>": j + 4 for j in range(8194, 9000) if j != 8707})
    layout = lumina.image_layout(vocab, (768, 768), 768)
    assert layout.image_token_ids == range(4, 8196)
    assert (layout.row_end, layout.image_end, layout.num_tokens) == (8803, (8196,), 2353)
    # with the 3 header tokens and the closing 8710: SJD's "Steps: 2357" for Lumina-mGPT 768
    assert 3 + layout.num_tokens + 1 == 2357
    v = lumina.LuminaVocab.of(vocab)
    assert (v.end_of_turn, v.image_start) == (8710, 8197)
    assert v.image_header((1024, 576), 768) == [8197, 8804 + 18, 8804 + 32]
    assert lumina.image_layout(vocab, (512, 512), 512).num_tokens == 32 * 33 + 1


def lumina_original_prompt(tokenizer, text: str, width: int, height: int) -> list[int]:
    """What Lumina-mGPT feeds: `MMConvItemProcessor.process_item` = [bos] + encode(conversation,
    no special tokens), the conversation being the human turn + `Conversation.sep_token`, the
    human turn the template of generate.py / the README."""
    q = f"Generate an image of {width}x{height} according to the following prompt:\n{text}"
    return [tokenizer.bos_token_id] + tokenizer.encode(q + "<reserved08706>", add_special_tokens=False)


@pytest.mark.parametrize("size", [(128, 128), (256, 64)])
def test_lumina_prompt_ids(size):
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
    from transformers.models.chameleon.processing_chameleon import ChameleonProcessor

    tok, hf = chameleon_tokenizers()
    vocab = chameleon_vocab()
    w, h = size
    header = [vocab["<racm3:break>"], vocab[f"<reserved{8800 + h // 32:05d}>"],
              vocab[f"<reserved{8800 + w // 32:05d}>"]]
    cond = lumina.prompt_ids(hf, CAPTION, size, target_size=128)
    assert cond == lumina_original_prompt(hf, CAPTION, w, h) + header
    assert "\n" in hf.convert_ids_to_tokens(cond) and cond[0] == 0
    assert lumina.prompt_ids(tok, CAPTION, size, target_size=128) == cond  # a bare tokenizers.Tokenizer
    # transformers' ChameleonProcessor (BOS from the tokenizer, sep appended "for chat mode")
    processor = ChameleonProcessor(ChameleonImageProcessorPil(), hf)
    text = f"Generate an image of {w}x{h} according to the following prompt:\n{CAPTION}"
    assert torch.as_tensor(processor(text=text)["input_ids"][0]).tolist() + header == cond
    # Lumina's CFG uncond: the cond sequence from its last image start on, once start/h/w are there
    start = max(i for i, t in enumerate(cond) if t == vocab["<racm3:break>"])
    assert lumina.uncond_ids(hf, None, size, target_size=128) == cond[start:] == header
    v = lumina.LuminaVocab.of(hf)
    assert lumina.uncond_ids(hf, NEGATIVE, size, 128, vocab=v) == lumina.prompt_ids(hf, NEGATIVE, size, 128, vocab=v)
    assert lumina.uncond_ids(hf, NEGATIVE, size, 128)[-4:] == [vocab["<reserved08706>"], *header]


# ---- Emu3 -------------------------------------------------------------------------------------

N_VISUAL = 64
EMU3_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
                 + ["<|image token|>", "<|image start|>", "<|image end|>"]
                 + [f"<|visual token {c:06d}|>" for c in range(N_VISUAL)])
TINY_AREA = 64 * 64  # 1:1 -> 8x8 visual tokens


def emu3_vocab() -> dict[str, int]:
    """Text words first, then the specials in the release's order (from SPECIAL_START_ID there)."""
    vocab = {"[UNK]": 0}
    for w in _words(CAPTION, NEGATIVE, emu3.POSITIVE_PROMPT, emu3.NEGATIVE_PROMPT, "*"):
        vocab.setdefault(w, len(vocab))
    for s in EMU3_SPECIALS:
        vocab[s] = len(vocab)
    return vocab


def emu3_tokenizers():
    vocab = emu3_vocab()
    tok = _word_level(vocab, EMU3_SPECIALS, "[UNK]")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|extra_203|>", eos_token="<|extra_204|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|extra_0|>", "boi_token": "<|image start|>",
                              "eoi_token": "<|image end|>", "image_wrapper_token": "<|image token|>",
                              "eof_token": "<|extra_201|>"})
    return tok, hf


def emu3_processor():
    from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor
    from transformers.models.emu3.processing_emu3 import Emu3Processor

    _, hf = emu3_tokenizers()
    return Emu3Processor(Emu3ImageProcessor(), hf)


def emu3_rule(layout, offset: int) -> str:
    """`Emu3PrefixConstrainedLogitsHelper` (emu3/mllm/utils_emu3.py), offset from <|image token|>."""
    w, h = layout.cols, layout.rows
    if offset % (w + 1) == 0:
        return "eol"
    if offset in ((w + 1) * h + 1, (w + 1) * h + 2, (w + 1) * h + 3):
        return "end"
    return "code"


def test_emu3_grid():
    processor = emu3_processor()
    assert emu3.grid("1:1") == (90, 90) and emu3.grid("16:9") == (68, 120) and emu3.grid("4:3") == (78, 104)
    for area in (emu3.IMAGE_AREA, TINY_AREA, 512 * 512):
        for ratio in emu3.RATIOS + ("21:9", "1:4", "7:5"):
            assert emu3.grid(ratio, area) == processor.calculate_generate_size(ratio, area, 8)
    assert emu3.grid((720, 720)) == (90, 90) and emu3.grid((960, 544)) == (68, 120)
    assert (720, 720) in emu3.resolutions() and (960, 544) in emu3.resolutions()
    for w, h in emu3.resolutions():
        assert emu3.grid((w, h)) == (h // 8, w // 8)
    assert emu3.grid((512, 512), 512 * 512) == (64, 64)
    assert emu3.grid((64, 64), TINY_AREA) == (8, 8)


@pytest.mark.parametrize("size", ["16x9", "0:1", "a:b", "1:0", (512, 512), (721, 720), (720,), (720.0, 720.0)])
def test_emu3_bad_size(size):
    with pytest.raises(ValueError, match=r"1:1"):
        emu3.grid(size)
    _, hf = emu3_tokenizers()
    for call in (lambda: emu3.image_layout(hf, size), lambda: emu3.prompt_ids(hf, CAPTION, size),
                 lambda: emu3.uncond_ids(hf, None, size), lambda: emu3.uncond_ids(hf, None, size, image_header=False)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="1:1"):
        emu3.grid("1:1000000", TINY_AREA)  # a zero-width grid


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "3:4"])
def test_emu3_layout(ratio):
    tok, hf = emu3_tokenizers()
    vocab = emu3_vocab()
    for source in (hf, tok, vocab):
        layout = emu3.image_layout(source, ratio, TINY_AREA)
        assert (layout.rows, layout.cols) == emu3.grid(ratio, TINY_AREA)
        first = vocab["<|visual token 000000|>"]
        assert layout.image_token_ids == range(first, first + N_VISUAL)
        assert layout.row_end == vocab["<|extra_200|>"]
        assert layout.image_end == (vocab["<|extra_201|>"], vocab["<|image end|>"], vocab["<|extra_204|>"])
        assert layout.num_tokens == layout.rows * (layout.cols + 1) + 3
        roles = layout_sequence(layout)
        assert roles == [emu3_rule(layout, k) for k in range(1, len(roles) + 1)]
    v = emu3.Emu3Vocab.of(hf)
    assert torch.equal(v.img2bpe[v.bpe2img], torch.arange(v.image_token_ids.start, v.image_token_ids.stop))
    assert emu3.image_layout(hf, "1:1", TINY_AREA).num_tokens == 75


def test_emu3_real_ids():
    vocab = {s: 151643 + i for i, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
                                                 + [f"<|extra_{i}|>" for i in range(205)]
                                                 + ["<|image token|>", "<|image start|>", "<|image end|>"]
                                                 + [f"<|visual token {c:06d}|>" for c in range(32768)])}
    assert max(vocab.values()) + 1 == 184622  # Emu3-Gen's vocab_size
    v = emu3.Emu3Vocab.of(vocab)
    assert (v.bos, v.eos, v.end_of_line, v.end_of_frame) == (151849, 151850, 151846, 151847)
    assert (v.image_token, v.image_start, v.image_end) == (151851, 151852, 151853)
    layout = emu3.image_layout(vocab, "1:1")
    assert layout.image_token_ids == range(151854, 184622)
    assert (layout.row_end, layout.image_end) == (151846, (151847, 151853, 151850))
    assert layout.num_tokens == 8193  # SJD's "Steps: 8193" for Emu3-Gen 720


def test_emu3_vocab_errors():
    vocab = emu3_vocab()
    swapped = dict(vocab)
    a, b = "<|visual token 000001|>", "<|visual token 000002|>"
    swapped[a], swapped[b] = vocab[b], vocab[a]
    with pytest.raises(ValueError, match="contiguous"):
        emu3.Emu3Vocab.of(swapped)
    with pytest.raises(ValueError, match="image token"):
        emu3.Emu3Vocab.of({n: i for n, i in vocab.items() if n != "<|image token|>"})


@pytest.mark.parametrize("ratio", ["1:1", "16:9"])
def test_emu3_prompt_ids_match_transformers(ratio):
    processor = emu3_processor()
    tok, hf = emu3_tokenizers()
    vocab = emu3_vocab()

    def hf_ids(text, **kw):
        return processor(text=text, ratio=ratio, image_area=TINY_AREA, **kw)["input_ids"][0]

    cond = emu3.prompt_ids(hf, CAPTION, ratio, TINY_AREA)
    # image_generation.py: prompt + POSITIVE_PROMPT, then the processor's mode 'G' wrapping
    assert cond == hf_ids(CAPTION + emu3.POSITIVE_PROMPT, return_for_image_generation=True)
    rows, cols = emu3.grid(ratio, TINY_AREA)
    tail = [vocab["<|image start|>"], *[vocab[c] for c in f"{rows}*{cols}"], vocab["<|image token|>"]]
    assert cond[0] == vocab["<|extra_203|>"] and cond[-len(tail):] == tail
    assert emu3.prompt_ids(tok, CAPTION, ratio, TINY_AREA) == cond
    assert emu3.prompt_ids(hf, CAPTION, ratio, TINY_AREA, positive_suffix=None) == hf_ids(
        CAPTION, return_for_image_generation=True)
    # the release's uncond: its negative prompt through the same processor call
    release = emu3.uncond_ids(hf, None, ratio, TINY_AREA)
    assert release == hf_ids(emu3.NEGATIVE_PROMPT, return_for_image_generation=True)
    assert release[-len(tail):] == tail and "[UNK]" not in hf.convert_ids_to_tokens(release)
    # transformers' model doc: a bare negative prompt
    assert emu3.uncond_ids(hf, None, ratio, TINY_AREA, image_header=False) == hf_ids(emu3.NEGATIVE_PROMPT)
    assert emu3.uncond_ids(hf, NEGATIVE, ratio, TINY_AREA) == hf_ids(NEGATIVE, return_for_image_generation=True)
    assert emu3.uncond_ids(hf, "", ratio, TINY_AREA) == [vocab["<|extra_203|>"], *tail]  # caption dropped


# ---- guidance ---------------------------------------------------------------------------------

def test_guidance_mixes():
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor
    from transformers.modeling_outputs import CausalLMOutputWithPast

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 50, generator=g) * 4, torch.randn(3, 50, generator=g) * 4
    scale = torch.tensor([[3.0], [1.0], [7.5]])
    assert torch.allclose(lumina.guidance_mix(cond, uncond, scale), uncond + scale * (cond - uncond))

    for s in (3.0, 1.0, 0.0):
        class Uncond(torch.nn.Module):  # stands in for the model's uncond forward
            def forward(self, input_ids, **kw):
                return CausalLMOutputWithPast(logits=uncond[:, None, :])

        reference = UnbatchedClassifierFreeGuidanceLogitsProcessor(s, Uncond(), torch.tensor([[1, 2, 3]] * 3))
        expected = reference(torch.tensor([[1, 2, 3]] * 3), cond.clone())
        assert torch.allclose(emu3.guidance_mix(cond, uncond, s), expected, atol=1e-5)
    mixed = emu3.guidance_mix(cond, uncond, scale)
    assert torch.allclose(mixed[0], emu3.guidance_mix(cond[:1], uncond[:1], 3.0)[0])
    # the two conventions give the same distribution, over the whole row or a column slice of it
    for cols in (slice(None), slice(10, 40)):
        a = lumina.guidance_mix(cond[:, cols], uncond[:, cols], scale).softmax(-1)
        b = emu3.guidance_mix(cond[:, cols], uncond[:, cols], scale).softmax(-1)
        c = emu3.guidance_mix(cond, uncond, scale)[:, cols].softmax(-1)
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)

"""Emu3-Gen text-to-image requests: sizes, prompt ids, image token layout, guidance convention.

Sources read (ids and names below were checked there):
- baaivision/Emu3 @f6ea9aa: `image_generation.py` (positive suffix, negative prompt, CFG 3.0, top-k
  2048, processor order), `emu3/mllm/processing_emu3.py` (`Emu3Processor.__call__` mode 'G',
  `calculate_generate_size`), `emu3/mllm/utils_emu3.py` (`Emu3PrefixConstrainedLogitsHelper`),
  `emu3/mllm/tokenization_emu3.py` (token names, `SPECIAL_START_ID`), `emu3/mllm/configuration_emu3.py`
  (ids, `image_area`), `emu3/tokenizer/modeling_emu3visionvq.py` (`spatial_scale_factor`),
  `emu3/train/datasets.py` (training layout, `null_prompt_prob`), `replicate_demo/predict_gen.py`.
- transformers 5.19 `models/emu3/processing_emu3.py` (`Emu3Processor(..., return_for_image_generation=
  True)`), `generation/logits_process.py::UnbatchedClassifierFreeGuidanceLogitsProcessor`, and the
  model doc `docs/source/en/model_doc/emu3.md` (its generation example).

Tokens (by name, looked up in the tokenizer; "real id" from `configuration_emu3.py`'s defaults and
`tokenization_emu3.py`'s order: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0..204|>`,
then the vision-token file, from `SPECIAL_START_ID` = 151643):

  role                       name                              real id
  pad                        `<|endoftext|>`                   151643
  end of line (every row)    `<|extra_200|>`                   151846 (eol_token_id)
  end of frame               `<|extra_201|>`                   151847 (eof_token_id)
  BOS                        `<|extra_203|>`                   151849 (bos_token_id)
  EOS                        `<|extra_204|>`                   151850 (eos_token_id)
  image token (before codes) `<|image token|>`                 151851 (img_token_id)
  image start                `<|image start|>`                 151852 (boi_token_id)
  image end                  `<|image end|>`                   151853 (eoi_token_id)
  visual token c             `<|visual token {c:06d}|>`        151854 + c, c < 32768 (vocab_size 184622)

The release's constraint takes the visual tokens as `range(id(000000), id(codebook_size - 1) + 1)`
(`Emu3Processor.build_const_helper`); transformers parses each name (`Emu3ImageVocabularyMapping`).
`Emu3Vocab.of` reads every name and checks that code c is token first + c.

Request layout, for a grid of H rows and W columns:
- cond prompt: `BOS + caption + " masterpiece, film grained, best quality." + <|image start|> +
  "{H}*{W}" + <|image token|>` (`image_generation.py` appends `POSITIVE_PROMPT`; mode 'G' of the
  release's processor, and transformers' `return_for_image_generation=True`, add the rest; "H*W" is
  plain text, height first; no chat template). Encoded piecewise here: the same ids, as the
  tokenizer splits text at special tokens before its model runs.
- generated (`image_layout`): H rows of W visual tokens, each row followed by EOL (the last row too),
  then EOF, `<|image end|>`, EOS: H * (W + 1) + 3 tokens (8193 at 90x90).
  `Emu3PrefixConstrainedLogitsHelper` counts the offset from `<|image token|>` (first generated
  token = 1): offset % (W+1) == 0 -> EOL, (W+1)H + 1 -> EOF, +2 -> EOI, +3 -> EOS, else visual tokens.
- uncond prompt: the release wraps its fixed negative prompt like a cond prompt without the positive
  suffix: `BOS + NEGATIVE_PROMPT + <|image start|> + "{H}*{W}" + <|image token|>`
  (`processor(text=NEGATIVE_PROMPT, mode='G', ...)`), run as its own sequence (own cache, positions
  from 0). transformers' model doc instead passes a bare `BOS + negative prompt`
  (`processor(text=neg_prompt)`, no image header): `uncond_ids(..., image_header=False)`. An empty
  negative prompt gives `BOS + header`, the caption-dropped form Emu3 trains with (`null_prompt_prob`).

Sizes: the vision tokenizer downsamples by 2 ** (len(ch_mult) - 1) = 8 (ch_mult [1, 2, 2, 4];
transformers' processor hard-codes 8). The release asks for an aspect ratio "W:H" at a fixed area,
`image_area` = 720 * 720 = 518400 in Emu3-Gen's config: H = round(h * sqrt(area / (w * h)) / 8), and
likewise W (Python's round; 1:1 -> 90x90, 16:9 -> 68x120, 4:3 -> 78x104). Any ratio is accepted
(issue #23: only the ratio is controllable). A size in pixels is accepted when it is what the
processor computes for its own aspect ratio at that area.

Guidance (`guidance_mix`): transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor`, in
log-softmax space: `lsm(u) + s * (lsm(c) - lsm(u))` (with s == 1 it returns lsm(c) and runs no uncond
forward). It differs from Lumina's raw `u + s(c - u)` by a constant per row, so after softmax, top-k
or temperature both give the same distribution; restricted to the visual-token columns (the runner
mixes those only) the result also differs only by a per-row constant. Order in `image_generation.py`:
CFG, then the prefix constraint, then transformers' warpers (temperature if not 1, then top-k 2048).
Defaults: `SAMPLING_DEFAULTS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vllm_visual_ar.families import ImageLayout
from vllm_visual_ar.model_executors.chameleon_t2i import text_ids, token_id, vocabulary

BOS = "<|extra_203|>"
EOS = "<|extra_204|>"
PAD = "<|endoftext|>"
END_OF_LINE = "<|extra_200|>"
END_OF_FRAME = "<|extra_201|>"
IMAGE_TOKEN = "<|image token|>"
IMAGE_START = "<|image start|>"
IMAGE_END = "<|image end|>"
VISUAL_TOKEN = "<|visual token {:06d}|>"

# The release's prompt decorations (image_generation.py, gradio_demo.py, replicate_demo/predict_gen.py).
POSITIVE_PROMPT = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                   "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                   "username, blurry.")

IMAGE_AREA = 720 * 720  # Emu3-Gen config.image_area
SPATIAL_FACTOR = 8      # pixels per visual token, each way
# Aspect ratios listed by `resolutions`; any "W:H" is accepted.
RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16")
SAMPLING_DEFAULTS = {"guidance_scale": 3.0, "top_k": 2048, "temperature": 1.0}


# ---- sizes ----------------------------------------------------------------------------------------

def _ratio_grid(width: int, height: int, image_area: int) -> tuple[int, int]:
    """(rows, cols) as `Emu3Processor.calculate_generate_size` computes them, same float steps."""
    target = (image_area / (width * height)) ** 0.5
    return int(round(height * target / SPATIAL_FACTOR)), int(round(width * target / SPATIAL_FACTOR))


def resolutions(image_area: int = IMAGE_AREA, ratios=RATIOS) -> list[tuple[int, int]]:
    """(width, height) in pixels that the release's processor computes for `ratios` at `image_area`."""
    return [(cols * SPATIAL_FACTOR, rows * SPATIAL_FACTOR) for rows, cols in (grid(r, image_area) for r in ratios)]


def grid(size: str | tuple[int, int] = "1:1", image_area: int = IMAGE_AREA) -> tuple[int, int]:
    """A "W:H" aspect ratio, or a (width, height) in pixels -> (rows, cols) of visual tokens.

    A pixel size must be one the processor produces: multiples of 8 whose ratio, at `image_area`,
    yields that same grid (720x720 and 960x544 at the default area). ValueError otherwise."""
    if not isinstance(image_area, int) or image_area <= 0:
        raise ValueError(f"image_area must be a positive number of pixels, got {image_area!r}")
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", size)
        if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
            rows, cols = _ratio_grid(int(m.group(1)), int(m.group(2)), image_area)
            if rows >= 1 and cols >= 1:
                return rows, cols
        raise ValueError(f"Emu3 size {size!r}: expected an aspect ratio 'W:H' of positive integers whose "
                         f"grid at image_area={image_area} is at least 1x1 (e.g. {', '.join(RATIOS)})")
    try:
        width, height = size
        ok = (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
              and width % SPATIAL_FACTOR == 0 and height % SPATIAL_FACTOR == 0
              and _ratio_grid(width, height, image_area) == (height // SPATIAL_FACTOR, width // SPATIAL_FACTOR))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        listed = ", ".join(f"{w}x{h} ({r})" for (w, h), r in zip(resolutions(image_area), RATIOS))
        raise ValueError(f"Emu3 cannot generate a (width, height) of {size!r} at image_area={image_area}: "
                         f"allowed are the sizes its processor computes for an aspect ratio, e.g. {listed}; "
                         f"or pass the ratio 'W:H'")
    return height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


# ---- vocabulary -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Emu3Vocab:
    """The ids of one Emu3 vocabulary that a text-to-image request uses."""
    bos: int
    eos: int
    pad: int
    end_of_line: int
    end_of_frame: int
    image_token: int
    image_start: int
    image_end: int
    image_token_ids: range  # visual token c is image_token_ids.start + c

    @property
    def bpe2img(self) -> torch.Tensor:
        """[K] long: code of token id image_token_ids.start + i (the identity for Emu3)."""
        return torch.arange(len(self.image_token_ids), dtype=torch.long)

    @property
    def img2bpe(self) -> torch.Tensor:
        """[K] long: token id of code c."""
        return torch.arange(self.image_token_ids.start, self.image_token_ids.stop, dtype=torch.long)

    @classmethod
    def of(cls, source) -> "Emu3Vocab":
        """From a tokenizer or a name -> id mapping (an Emu3Config's `vocabulary_map`). Build it once."""
        if isinstance(source, Emu3Vocab):
            return source
        pattern = re.compile(r"<\|visual token (\d{6})\|>")
        visual = {int(m.group(1)): int(i) for n, i in vocabulary(source).items()
                  if isinstance(n, str) and (m := pattern.fullmatch(n))}
        if not visual:  # the release's tiktoken tokenizer lists only its BPE ranks in get_vocab()
            c = 0
            while True:
                try:
                    visual[c] = token_id(source, VISUAL_TOKEN.format(c))
                except ValueError:
                    break
                c += 1
        if not visual:
            raise ValueError("the vocabulary has no visual tokens ('<|visual token 000000|>' ...)")
        first = visual.get(0)
        if first is None or sorted(visual) != list(range(len(visual))) or any(
                visual[c] != first + c for c in visual):
            raise ValueError("visual tokens are not codes 0..K-1 at contiguous ascending ids")
        return cls(bos=token_id(source, BOS), eos=token_id(source, EOS), pad=token_id(source, PAD),
                   end_of_line=token_id(source, END_OF_LINE), end_of_frame=token_id(source, END_OF_FRAME),
                   image_token=token_id(source, IMAGE_TOKEN), image_start=token_id(source, IMAGE_START),
                   image_end=token_id(source, IMAGE_END), image_token_ids=range(first, first + len(visual)))


# ---- the request ----------------------------------------------------------------------------------

def image_layout(source, size: str | tuple[int, int] = "1:1", image_area: int = IMAGE_AREA) -> ImageLayout:
    """The generated tokens of one image: rows x (cols visual tokens + EOL), then EOF, EOI, EOS."""
    rows, cols = grid(size, image_area)
    vocab = Emu3Vocab.of(source)
    return ImageLayout(rows=rows, cols=cols, image_token_ids=vocab.image_token_ids, row_end=vocab.end_of_line,
                       image_end=(vocab.end_of_frame, vocab.image_end, vocab.eos))


def _header(tokenizer, vocab: Emu3Vocab, size, image_area: int) -> list[int]:
    rows, cols = grid(size, image_area)
    return [vocab.image_start, *text_ids(tokenizer, f"{rows}*{cols}"), vocab.image_token]


def prompt_ids(tokenizer, text: str, size: str | tuple[int, int] = "1:1", image_area: int = IMAGE_AREA,
               positive_suffix: str | None = POSITIVE_PROMPT, vocab: Emu3Vocab | None = None) -> list[int]:
    """The cond request's prompt: BOS, caption + positive suffix (None or "" for none), image header."""
    vocab = Emu3Vocab.of(vocab if vocab is not None else tokenizer)
    header = _header(tokenizer, vocab, size, image_area)
    return [vocab.bos, *text_ids(tokenizer, text + (positive_suffix or "")), *header]


def uncond_ids(tokenizer, negative_prompt: str | None = None, size: str | tuple[int, int] = "1:1",
               image_area: int = IMAGE_AREA, image_header: bool = True,
               vocab: Emu3Vocab | None = None) -> list[int]:
    """The uncond request's prompt: BOS, the negative prompt (the release's `NEGATIVE_PROMPT` when
    None), and the image header as the release has it (`image_header=False`: transformers' doc form)."""
    vocab = Emu3Vocab.of(vocab if vocab is not None else tokenizer)
    header = _header(tokenizer, vocab, size, image_area) if image_header else []
    if not image_header:
        grid(size, image_area)  # still validate the size
    text = NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    return [vocab.bos, *text_ids(tokenizer, text), *header]


def guidance_mix(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Emu3's guidance: lsm(uncond) + scale * (lsm(cond) - lsm(uncond)), lsm = log_softmax over the
    last dim in float32; `scale` a float or a [N, 1] tensor."""
    c = torch.log_softmax(cond.float(), dim=-1)
    u = torch.log_softmax(uncond.float(), dim=-1)
    return u + scale * (c - u)


# ---- the family interface (`vllm_visual_ar/families.py`) -----------------------------------------
# A converted Emu3-Gen folder's config.json is the release's flat LM config (`convert emu3`), plus
# the tokenizer's `vocabulary_map` (so the engine finds the special and visual tokens without the
# tokenizer) and `image_area` (720 * 720 for Emu3-Gen).

def vocab_of(config) -> Emu3Vocab:
    """The config's vocabulary ids (computed once per config)."""
    if "_emu3_vocab" not in config.__dict__:
        if not getattr(config, "vocabulary_map", None):
            raise ValueError("an Emu3 config.json needs the tokenizer's vocabulary_map (`vllm-visual-ar convert emu3`)")
        config.__dict__["_emu3_vocab"] = Emu3Vocab.of(config.vocabulary_map)
    return config.__dict__["_emu3_vocab"]


def image_area_of(config) -> int:
    return int(getattr(config, "image_area", None) or IMAGE_AREA)


def default_size(config) -> tuple[int, int]:
    """The square image at the model's area."""
    rows, cols = grid("1:1", image_area_of(config))
    return cols * SPATIAL_FACTOR, rows * SPATIAL_FACTOR


def config_layout(config, size) -> ImageLayout:
    return image_layout(vocab_of(config), tuple(size) if size is not None else default_size(config),
                        image_area_of(config))


def config_prompts(config, tokenizer, text: str, negative_prompt: str | None, size) -> tuple[list[int], list[int]]:
    vocab, area = vocab_of(config), image_area_of(config)
    return (prompt_ids(tokenizer, text, tuple(size), area, vocab=vocab),
            uncond_ids(tokenizer, negative_prompt, tuple(size), area, vocab=vocab))


def load_image_decoder(model_dir: str, device: str = "cpu"):
    """Visual token ids [N, rows * cols] and the grid -> RGB images in [-1, 1]: token - first visual
    token is the codebook index, through Emu3's vision tokenizer."""
    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.model_executors import emu3_vq

    start = vocab_of(family_of(model_dir).config(model_dir)).image_token_ids.start
    vq = emu3_vq.load_image_decoder(model_dir, device)

    def decode(tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return vq(torch.as_tensor(tokens, dtype=torch.long) - start, grid)

    def preview(codes: list[int], total: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return vq.preview([t - start for t in codes], total, grid)

    decode.to_uint8, decode.preview = vq.to_uint8, preview
    return decode

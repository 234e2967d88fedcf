"""Lumina-mGPT text-to-image requests (Chameleon vocabulary): sizes, prompt ids, image token layout,
guidance convention.

Sources read (ids and names below were checked there; nothing is downloaded at run time):
- Alpha-VLLM/Lumina-mGPT @104abe4: `lumina_mgpt/data/item_processor.py` (`FlexARItemProcessor`:
  token names, `get_n_grids_token`, `generate_crop_size_list`, `process_image`, `decode_image`),
  `lumina_mgpt/data/convertsation.py` (`Conversation`), `xllmx/data/item_processor.py`
  (`MMConvItemProcessor.process_item`), `xllmx/model/tokenizer.py` (`Tokenizer.encode`),
  `lumina_mgpt/inference_solver.py` (CFG, constraint and top-k processors, `GenerationConfig`),
  `lumina_mgpt/generate_examples/generate.py` and the README (the prompt template),
  `lumina_mgpt/model/chameleon_vae_ori/vocab.py` (`VocabInfo`, `VocabTranslation`),
  `lumina_mgpt/model/chameleon/convert_chameleon_weights_to_hf.py` (`sep_token_id = 8710`).
- transformers 5.19 `models/chameleon/modeling_chameleon.py::ChameleonImageVocabularyMapping` (the
  same name-based code <-> token mapping as Meta's `VocabTranslation`).
- ThisisBillhe/ZipAR @2a5695c `Lumina-mGPT-ZipAR/lumina_mgpt/model/chameleon/modeling_chameleon.py`,
  which hard-codes the numeric ids 8197, 8803, 8196 and 8710 of the names below.

Tokens (by name; every id is looked up in the tokenizer, never hard-coded here; "real id" is the id in
the released 65536-token Chameleon vocabulary, as Lumina-mGPT's and ZipAR's code hard-code it):

  role                          name                      real id
  BOS                           `<s>`                     0 (`VocabInfo.bos_id`; ZipAR's uncond row starts with 0)
  image codes                   `IMGIMG...`               4..8195 (`MultiModalLogitsProcessor.image_token_list`)
  image end                     `<eoss>`                  8196
  image start                   `<racm3:break>`           8197
  end of turn / generation EOS  `<reserved08706>`         8710 (`Conversation.sep_token`; `eos_token_id=[8710]`)
  end of line (after each row)  `<reserved08799>`         8803 (`FlexARItemProcessor.new_line_token`)
  resolution, n = pixels / 32   `<reserved{8800+n:05d}>`  8804 + n (`get_n_grids_token`; `decode_image`:
                                                          `tokens[0] - 8804`)

Image codes: the tokens whose names start with "IMGIMG". A name encodes its VQGAN codebook index in
letters (drop "IMGIMG" and the last character, then A..J -> 0..9; `VocabTranslation.bpe2img`,
`ChameleonImageVocabularyMapping.bpe2img`), so token id -> code is a permutation defined by the names,
not by id order. `LuminaVocab` holds both directions as tensors. (Meta's `convert_bpe2img` sorts keys
and values separately, which is right only for a monotone mapping; Lumina's `decode_image` uses the
`bpe2img` dict, as we do.)

Request layout (a (width, height) size in pixels, both multiples of 32; "/ 32" and "/ 16" below are the
resolution unit and `code_pixels`, see "Sizes"):
- cond prompt: `[<s>] + text("Generate an image of {W}x{H} according to the following prompt:\\n{caption}")
  + [<reserved08706>] + [<racm3:break>, res(H/32), res(W/32)]`. The first part is Lumina's
  conversation with one human turn and an empty assistant turn (`Conversation.process` appends the
  separator to the human message; `process_item` prepends the tokenizer's BOS and encodes without
  special tokens). The original then lets the model *sample* the image start and the height and width
  tokens (nothing constrains them before an image opens; text top-k 10); we append them to the prompt,
  so the size is the one asked for (Lumina-mGPT-2.0 issue #11: its model emitted 60x144 latents
  for a 512x512 request).
- generated (`image_layout`): H/16 rows of W/16 codes, each row followed by the EOL token (the last row
  too), then `<eoss>`: rows * (cols + 1) + 1 tokens (2353 at 768x768). `MultiModalLogitsProcessor`
  counts k = 1, 2, ... from the first code: k % (cols+1) == 0 forces EOL, k == (cols+1)*rows + 1 forces
  `<eoss>`, every other k allows the image codes only. The original then goes on sampling text (top-k
  10) until `<reserved08706>` ends generation; training puts it right after `<eoss>` (the assistant
  turn is the image followed by the separator), and ZipAR appends EOL, `<eoss>`, 8710 itself after the
  last code and stops. The image is complete at `<eoss>`, where our layout ends.
- uncond prompt: `[<racm3:break>, res(H/32), res(W/32)]` and nothing else: no BOS, no text.
  `LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor` starts once two tokens follow
  the last image start (i.e. when predicting the first code) and feeds `input_ids[:, idx(start):]` to
  the model with a fresh cache (positions 0, 1, 2), then each chosen token. This matches the shared
  notes (`t2i.md` section 3.1). A negative prompt is our extension (Lumina has none): it is wrapped
  exactly like a cond prompt.

Sizes: the VQGAN downsamples by 16 (`decode_image`: latent = 2 * grids, grids of 32 px); the prompt's
text names the size in pixels, the resolution tokens count 32-px grids. Training crops every image to
the nearest of `generate_crop_size_list((target // 32) ** 2, 32)` (`var_center_crop`), target being the
checkpoint's (README: 7B-512, 7B-768, 7B-768-Omni, 7B-1024, 34B-512): the (w, h) grids on the staircase
w * h <= (target/32)^2 with aspect ratio at most 4 (49 sizes at 512, 73 at 768, 97 at 1024). Generation
itself checks nothing; `resolutions` / `grid` refuse other sizes (Lumina-mGPT issue #20: "The model
was not trained at 256x256").

A `SizeRule` carries these three facts for one checkpoint (the functions below take it, or a bare
`target_size` for Lumina's own rule). Besides `target_size`, a converted folder's config.json may set
two fields for checkpoints with another VQGAN (none of Lumina's releases sets them):
- `code_pixels` (default 16): the VQGAN's downsampling, pixels per code side. The resolution unit
  stays two codes, as Lumina's 32 px for 16: unit = 2 * code_pixels, so a side of P pixels is
  P / code_pixels codes and resolution token `<reserved{8800 + P / unit:05d}>`; sizes must be
  multiples of the unit. The prompt's text still names pixels ("Generate an image of 32x32 ...").
- `sizes` (default: the staircase above, computed with that unit): a list of [width, height] in
  pixels, the only sizes the checkpoint was trained at and the only ones allowed.
The embedded `t2i-mnist` (a 2x-downsampling VQGAN, 32x32 and 24x40 digits) sets both.

Guidance (`guidance_mix`): raw logits, `uncond + s * (cond - uncond)` (the CFG processor above), for
every position of the image (EOL and `<eoss>` positions are forced afterwards anyway); s == 1 skips the
uncond forward. Processor order in `FlexARInferenceSolver.create_logits_processor`: CFG, then the
image constraint, then top-k (`image_top_k` inside an image, default 2000), then transformers'
temperature warper (appended after user processors; a positive temperature does not change the top-k
set, so the order of the last two is immaterial). Defaults: `SAMPLING_DEFAULTS`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from vllm_visual_ar.families import ImageLayout

BOS = "<s>"
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
END_OF_TURN = "<reserved08706>"
END_OF_LINE = "<reserved08799>"
IMAGE_CODE_PREFIX = "IMGIMG"
PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"

GRID_PIXELS = 32  # one resolution-token unit ("patch_size" in FlexARItemProcessor)
CODE_PIXELS = 16  # VQGAN downsampling: one code per 16x16 pixels
RELEASED_TARGET_SIZES = (512, 768, 1024)
MAX_ASPECT_RATIO = 4.0
# The README's 768 example uses cfg 4.0; create_logits_processor's default (and ZipAR's, SJD's) is 3.0.
SAMPLING_DEFAULTS = {"guidance_scale": 3.0, "top_k": 2000, "temperature": 1.0}


def resolution_token(grids: int) -> str:
    """The name of the token for a side of `grids` * 32 pixels (`FlexARItemProcessor.get_n_grids_token`)."""
    return f"<reserved{8800 + grids:05d}>"


# ---- tokenizer access, shared with emu3_t2i -------------------------------------------------------
# A "vocabulary source" is a transformers tokenizer, a `tokenizers.Tokenizer`, or a name -> id mapping
# (e.g. a transformers config's `vocabulary_map`); only tokenizers can encode text.

def vocabulary(source) -> Mapping[str, int]:
    """Every name -> id the source knows, added/special tokens included."""
    if isinstance(source, Mapping):
        return source
    if hasattr(source, "convert_tokens_to_ids"):  # transformers
        return source.get_vocab()
    return source.get_vocab(with_added_tokens=True)  # tokenizers.Tokenizer


def token_id(source, name: str) -> int:
    """The id of one token name; ValueError if the vocabulary lacks it (never the unknown token)."""
    if isinstance(source, Mapping):
        found = source.get(name)
    elif hasattr(source, "convert_tokens_to_ids"):
        found = source.convert_tokens_to_ids(name)
        if found is not None and source.convert_ids_to_tokens(found) != name:
            found = None  # mapped to the unknown token
    else:
        found = source.token_to_id(name)
    if found is None:
        raise ValueError(f"the tokenizer's vocabulary has no token {name!r}")
    return int(found)


def text_ids(tokenizer, text: str) -> list[int]:
    """`text` encoded without the tokenizer's own special tokens (no BOS/EOS added)."""
    if isinstance(tokenizer, Mapping):
        raise TypeError("prompt ids need a tokenizer, not a vocabulary mapping")
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoded, "ids", encoded))


# ---- sizes ----------------------------------------------------------------------------------------

def resolutions(target_size: int = 768, max_ratio: float = MAX_ASPECT_RATIO,
                grid_pixels: int = GRID_PIXELS) -> list[tuple[int, int]]:
    """The (width, height) pixel sizes a Lumina-mGPT model trained at `target_size` (512, 768 or 1024
    for the released checkpoints; any positive multiple of `grid_pixels` for other models) was
    trained on; `grid_pixels` is the resolution unit (32 for Lumina's VQGAN, see `SizeRule`).

    Same set and order as `generate_crop_size_list((target_size // 32) ** 2, 32, max_ratio)`: that
    function walks the staircase of grids (w, h) with w * h <= budget, w from the budget down to 1 and
    h rising as far as the budget allows at each w, so at width w it visits every h from
    max(1, budget // (w + 1)) to budget // w; it keeps those with max/min <= max_ratio."""
    if not isinstance(target_size, int) or target_size <= 0 or target_size % grid_pixels:
        raise ValueError(f"target_size must be a positive multiple of {grid_pixels} pixels, got {target_size!r}")
    budget = (target_size // grid_pixels) ** 2
    sizes = []
    for w in range(budget, 0, -1):
        for h in range(max(1, budget // (w + 1)), budget // w + 1):
            if max(w, h) / min(w, h) <= max_ratio:
                sizes.append((w * grid_pixels, h * grid_pixels))
    return sizes


@dataclass(frozen=True)
class SizeRule:
    """How one checkpoint maps pixels to codes and which sizes it makes (module docstring, "Sizes"):
    `target_size` its training resolution, `code_pixels` its VQGAN's downsampling (the resolution
    unit is two codes), `sizes` the (width, height) list it was trained at, or None for Lumina's
    staircase at `target_size`."""
    target_size: int = 768
    code_pixels: int = CODE_PIXELS
    sizes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if isinstance(self.code_pixels, bool) or not isinstance(self.code_pixels, int) or self.code_pixels <= 0:
            raise ValueError(f"code_pixels must be a positive integer, got {self.code_pixels!r}")
        if self.sizes is not None:
            sizes = tuple((int(w), int(h)) for w, h in self.sizes)
            if not sizes or any(w <= 0 or h <= 0 or w % self.unit or h % self.unit for w, h in sizes):
                raise ValueError(f"sizes must be [width, height] pairs of positive multiples of {self.unit} "
                                 f"pixels (2 x code_pixels), got {self.sizes!r}")
            object.__setattr__(self, "sizes", sizes)

    @property
    def unit(self) -> int:
        """Pixels per resolution-token unit: two codes (Lumina's 32 for its 16)."""
        return 2 * self.code_pixels

    def allowed(self) -> list[tuple[int, int]]:
        return list(self.sizes) if self.sizes is not None else resolutions(self.target_size, grid_pixels=self.unit)


def size_rule(target_size: "int | SizeRule" = 768) -> SizeRule:
    """A `SizeRule` as given, or Lumina's rule (16 px per code, the staircase) at a target size."""
    return target_size if isinstance(target_size, SizeRule) else SizeRule(target_size)


def grid(size: tuple[int, int], target_size: "int | SizeRule" = 768) -> tuple[int, int]:
    """(width, height) in pixels -> (rows, cols) of VQGAN codes; ValueError for a size the model at
    `target_size` (or `SizeRule`) was not trained on (the message lists the allowed ones)."""
    rule = size_rule(target_size)
    allowed = rule.allowed()
    try:
        width, height = (int(v) for v in size)
        ok = (width, height) == tuple(size) and (width, height) in allowed
    except (TypeError, ValueError):
        ok = False
    if not ok:
        listed = ", ".join(f"{w}x{h}" for w, h in allowed)
        raise ValueError(f"Lumina-mGPT ({rule.target_size}) cannot generate a (width, height) of {size!r}; "
                         f"allowed width x height: {listed}")
    return height // rule.code_pixels, width // rule.code_pixels


# ---- vocabulary -----------------------------------------------------------------------------------

def code_of_name(name: str) -> int:
    """VQGAN code of an image token name ("IMGIMG" + letters A..J for digits + one last character)."""
    letters = name[len(IMAGE_CODE_PREFIX):-1]
    if not name.startswith(IMAGE_CODE_PREFIX) or not letters or any(c not in "ABCDEFGHIJ" for c in letters):
        raise ValueError(f"{name!r} is not a Chameleon image token name")
    return int("".join(str(ord(c) - ord("A")) for c in letters))


@dataclass(frozen=True, eq=False)
class LuminaVocab:
    """The ids of one Chameleon/Lumina vocabulary that a text-to-image request uses."""
    bos: int
    image_start: int
    image_end: int
    end_of_turn: int
    end_of_line: int
    image_token_ids: range                     # the image tokens: contiguous ids
    bpe2img: torch.Tensor               # [K] long: code of token id image_token_ids.start + i
    img2bpe: torch.Tensor               # [K] long: token id of code c
    resolution_ids: dict[int, int] = field(default_factory=dict)  # grids -> id of resolution_token(grids)

    @classmethod
    def of(cls, source) -> "LuminaVocab":
        """From a tokenizer or a name -> id mapping (a ChameleonConfig's `vocabulary_map`). Build it
        once and pass it to the functions below: it reads the whole vocabulary."""
        if isinstance(source, LuminaVocab):
            return source
        vocab = vocabulary(source)
        images = sorted((i, code_of_name(n)) for n, i in vocab.items() if n.startswith(IMAGE_CODE_PREFIX))
        if not images:
            raise ValueError("the vocabulary has no image tokens (names starting with 'IMGIMG')")
        ids = [i for i, _ in images]
        codes = torch.tensor([c for _, c in images], dtype=torch.long)
        image_token_ids = range(ids[0], ids[-1] + 1)
        if ids != list(image_token_ids):
            raise ValueError(f"image token ids are not contiguous ({ids[0]}..{ids[-1]}, {len(ids)} tokens)")
        if sorted(codes.tolist()) != list(range(len(ids))):
            raise ValueError(f"image token names do not encode the codes 0..{len(ids) - 1} once each")
        img2bpe = torch.empty_like(codes)
        img2bpe[codes] = torch.arange(image_token_ids.start, image_token_ids.stop, dtype=torch.long)
        pattern = re.compile(r"<reserved(\d{5})>")
        resolution_ids = {}
        for name, i in vocab.items():
            m = pattern.fullmatch(name)
            if m and int(m.group(1)) > 8800:
                resolution_ids[int(m.group(1)) - 8800] = int(i)
        return cls(bos=token_id(vocab, BOS), image_start=token_id(vocab, IMAGE_START),
                   image_end=token_id(vocab, IMAGE_END), end_of_turn=token_id(vocab, END_OF_TURN),
                   end_of_line=token_id(vocab, END_OF_LINE), image_token_ids=image_token_ids, bpe2img=codes,
                   img2bpe=img2bpe, resolution_ids=resolution_ids)

    def resolution_id(self, grids: int) -> int:
        if grids not in self.resolution_ids:
            raise ValueError(f"the vocabulary has no resolution token {resolution_token(grids)!r}")
        return self.resolution_ids[grids]

    def image_header(self, size: tuple[int, int], target_size: "int | SizeRule" = 768) -> list[int]:
        """[image start, height token, width token] for a (width, height) size."""
        rule = size_rule(target_size)
        grid(size, rule)
        width, height = size
        return [self.image_start, self.resolution_id(height // rule.unit), self.resolution_id(width // rule.unit)]


# ---- the request ----------------------------------------------------------------------------------

def image_layout(source, size: tuple[int, int], target_size: "int | SizeRule" = 768) -> ImageLayout:
    """The generated tokens of one (width, height) image: rows x (cols codes + EOL), then `<eoss>`."""
    rows, cols = grid(size, target_size)
    vocab = LuminaVocab.of(source)
    return ImageLayout(rows=rows, cols=cols, image_token_ids=vocab.image_token_ids, row_end=vocab.end_of_line,
                       image_end=(vocab.image_end,))


def prompt_ids(tokenizer, text: str, size: tuple[int, int], target_size: "int | SizeRule" = 768,
               vocab: LuminaVocab | None = None) -> list[int]:
    """The cond request's prompt: BOS, the templated caption, end of turn, then the image start and
    resolution tokens the original leaves to the model (see the module docstring).

    The caption is encoded on its own and the end-of-turn id appended, where Lumina encodes
    `caption + "<reserved08706>"` as one string: the same ids, because the tokenizer splits text at
    added tokens before its model runs."""
    vocab = LuminaVocab.of(vocab if vocab is not None else tokenizer)
    header = vocab.image_header(size, target_size)
    width, height = size
    caption = PROMPT_TEMPLATE.format(width=width, height=height, prompt=text)
    return [vocab.bos, *text_ids(tokenizer, caption), vocab.end_of_turn, *header]


def uncond_ids(tokenizer, negative_prompt: str | None, size: tuple[int, int], target_size: "int | SizeRule" = 768,
               vocab: LuminaVocab | None = None) -> list[int]:
    """The uncond request's prompt: Lumina's `[image start, height, width]` when `negative_prompt` is
    None; a negative prompt (not in Lumina-mGPT) is wrapped like a cond prompt."""
    if negative_prompt is not None:
        return prompt_ids(tokenizer, negative_prompt, size, target_size, vocab)
    vocab = LuminaVocab.of(vocab if vocab is not None else tokenizer)
    return vocab.image_header(size, target_size)


def guidance_mix(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Lumina-mGPT's guidance on raw logits: uncond + scale * (cond - uncond); `scale` a float or a
    [N, 1] tensor. Mixing only the code columns (as the runner does) gives the same values there."""
    return uncond + scale * (cond - uncond)


# ---- the family interface (`vllm_visual_ar/families.py`) -----------------------------------------
# A converted Lumina-mGPT folder's config.json is the checkpoint's (a ChameleonConfig whose
# `vocabulary_map` is the tokenizer's vocabulary), plus `target_size`: the resolution the checkpoint
# was trained for (Alpha-VLLM/Lumina-mGPT-7B-768: 768), which sets its allowed sizes, and optionally
# `code_pixels` and `sizes` (module docstring, "Sizes").

def vocab_of(config) -> LuminaVocab:
    """The config's vocabulary ids (computed once per config)."""
    if "_lumina_vocab" not in config.__dict__:
        if not getattr(config, "vocabulary_map", None):
            raise ValueError("a Lumina-mGPT config.json needs the tokenizer's vocabulary_map")
        config.__dict__["_lumina_vocab"] = LuminaVocab.of(config.vocabulary_map)
    return config.__dict__["_lumina_vocab"]


def target_size_of(config) -> int:
    return int(getattr(config, "target_size", None) or 768)


def size_rule_of(config) -> SizeRule:
    """The config's `SizeRule`: `target_size`, `code_pixels` (default 16) and `sizes` (default None)."""
    sizes = getattr(config, "sizes", None)
    return SizeRule(target_size_of(config), int(getattr(config, "code_pixels", None) or CODE_PIXELS),
                    None if sizes is None else tuple(tuple(s) for s in sizes))


def default_size(config) -> tuple[int, int]:
    """The checkpoint's training resolution, square (the first of its `sizes` if the square is not
    among them)."""
    rule = size_rule_of(config)
    square = (rule.target_size,) * 2
    return square if rule.sizes is None or square in rule.sizes else rule.sizes[0]


def config_layout(config, size) -> ImageLayout:
    return image_layout(vocab_of(config), tuple(size if size is not None else default_size(config)),
                        size_rule_of(config))


def config_prompts(config, tokenizer, text: str, negative_prompt: str | None, size) -> tuple[list[int], list[int]]:
    vocab, rule = vocab_of(config), size_rule_of(config)
    return (prompt_ids(tokenizer, text, tuple(size), rule, vocab),
            uncond_ids(tokenizer, negative_prompt, tuple(size), rule, vocab))


def load_image_decoder(model_dir: str, device: str = "cpu"):
    """Code token ids [N, rows * cols] (the image's codes, end-of-line tokens dropped) and the grid
    -> RGB images in [-1, 1] (rows * code_pixels high): the tokens' codebook indices (`bpe2img`)
    through Chameleon's VQGAN."""
    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.model_executors import chameleon_vq

    vocab = vocab_of(family_of(model_dir).config(model_dir))
    vq = chameleon_vq.load_image_decoder(model_dir, device)

    def decode(tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        return vq(vocab.bpe2img[tokens - vocab.image_token_ids.start], grid)

    def preview(codes: list[int], total: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The code tokens so far -> the image with its complete rows, the rest black."""
        return vq.preview([int(vocab.bpe2img[t - vocab.image_token_ids.start]) for t in codes], total, grid)

    decode.to_uint8, decode.preview = vq.to_uint8, preview
    return decode

"""Engine-free pieces: sampling filters, 2D RoPE layout, checkpoint conversion, VQ round trip."""
import json
import pytest
import torch
from tiny_models import TINY_VQ, tiny_config, write_official_checkpoints

from vllm_visual_ar.model_executors.convert import convert_llamagen
from vllm_visual_ar.model_executors.llamagen_reference import rope_2d_table
from vllm_visual_ar.model_executors.vq import load_vq
from vllm_visual_ar.samplers.sampling import cfg_mix, filter_top_k_top_p, sample


def test_cfg_mix_is_llamagen_guidance():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(cfg_mix(cond, uncond, 4.0), torch.tensor([[5.0, -3.0]]))
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_top_k_top_p(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, then 0.8 crosses: keep both
    assert (~torch.isinf(filter_top_k_top_p(logits, top_p=0.4))).sum() == 1  # never empty
    assert sample(logits, top_k=1).item() == 0


def test_rope_2d_rotates_by_row_then_column_with_zero_prefix():
    cfg = tiny_config(grid=8)
    table = rope_2d_table(cfg)
    assert table.shape == (1 + 64, cfg.head_dim // 2)
    assert torch.equal(table[0], torch.zeros_like(table[0]))  # class token: q and k zeroed
    quarter, half = cfg.head_dim // 4, cfg.head_dim // 2
    r, c = 3, 5
    freqs = torch.tensor([10000.0 ** (-2 * i / half) for i in range(quarter)])
    expected = torch.polar(torch.ones(half), torch.cat([r * freqs, c * freqs]))
    assert torch.allclose(table[1 + r * 8 + c], expected, atol=1e-5)


def test_official_layout_converts_to_a_loadable_folder(tmp_path):
    config = tiny_config(grid=8)
    _, gpt_pt, vq_pt = write_official_checkpoints(tmp_path, config)
    out = convert_llamagen(str(gpt_pt), str(vq_pt), str(tmp_path / "out"), num_heads=2)
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written["architectures"] == ["LlamaGenForClassToImage"]
    assert (written["codebook_size"], written["num_classes"], written["image_grid"]) == (64, 10, 8)
    assert written["vocab_size"] == 64 + 10 + 1
    assert written["vq"]["ch_mult"] == TINY_VQ.ch_mult and written["vq"]["num_res_blocks"] == 1
    vq = load_vq(out)
    images = vq.decode_codes(torch.randint(0, 64, (2, 8, 8)))
    assert images.shape == (2, 1, 16, 16)


def test_converter_rejects_unknown_sizes_and_files(tmp_path):
    config = tiny_config(grid=8)
    _, gpt_pt, vq_pt = write_official_checkpoints(tmp_path, config)
    with pytest.raises(ValueError, match="num_heads"):
        convert_llamagen(str(gpt_pt), str(vq_pt), str(tmp_path / "a"))  # not an official size
    with pytest.raises(ValueError, match="does not match"):
        convert_llamagen(str(gpt_pt), str(vq_pt), str(tmp_path / "b"), gpt_size="GPT-B")
    with pytest.raises(ValueError, match="no such file"):
        convert_llamagen(str(tmp_path / "missing.pt"), str(vq_pt), str(tmp_path / "c"), num_heads=2)


def test_official_gpt_sizes_are_configurable():
    from vllm_visual_ar.model_executors.llamagen import kernel_head_dim
    from vllm_visual_ar.model_executors.llamagen_config import GPT_SIZES, LlamaGenConfig

    for name, s in GPT_SIZES.items():
        cfg = LlamaGenConfig(hidden_size=s["dim"], num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                             image_grid=24)
        assert cfg.vocab_size == 16384 + 1001
        assert cfg.max_position_embeddings == 1 + 576 + 24
    assert kernel_head_dim(64) == 64 and kernel_head_dim(100) == 112  # GPT-3B is padded for the kernels
    assert LlamaGenConfig(hidden_size=1280).intermediate_size == 3584  # XL: find_multiple(3413, 256)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.9), (0.0, 0, 1.0)])
def test_sample_rows_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    """The engine's batched ZipAR sampler: the exponential race over the temperature/top-k/top-p
    filtered distribution, per row; a chi-square test against the exact probabilities."""
    from scipy.stats import chisquare

    from vllm_visual_ar.samplers.sampling import filter_top_k_top_p, sample_rows

    logits = torch.randn(12, generator=torch.Generator().manual_seed(1)) * 2
    n = 40000
    rows = logits.expand(n, -1)
    torch.manual_seed(0)
    drawn = sample_rows(rows, torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p))
    counts = torch.bincount(drawn, minlength=12).double()
    if temperature == 0:
        assert (drawn == logits.argmax()).all()
        return
    probs = filter_top_k_top_p(logits / temperature, top_k, top_p).softmax(-1).double()
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * n
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3


def test_sample_rows_follows_each_rows_generator():
    from vllm_visual_ar.samplers.sampling import sample_rows

    logits = torch.zeros(6, 50)
    settings = (torch.ones(6), torch.zeros(6, dtype=torch.long), torch.ones(6))

    def draw(seed_a, seed_b):
        return sample_rows(logits, *settings, [(slice(0, 3), torch.Generator().manual_seed(seed_a)),
                                               (slice(3, 6), torch.Generator().manual_seed(seed_b))])

    assert torch.equal(draw(1, 2), draw(1, 2))
    assert torch.equal(draw(1, 2)[:3], draw(1, 9)[:3]) and not torch.equal(draw(1, 2)[3:], draw(1, 9)[3:])


def test_image_layouts_of_the_class_to_image_families():
    from tiny_models import tiny_config, tiny_var_config

    from vllm_visual_ar.families import ImageLayout, image_layout

    llamagen = tiny_config(grid=8)
    layout = image_layout(llamagen)
    assert (layout.rows, layout.cols, layout.image_token_ids, layout.num_tokens) == (8, 8, range(llamagen.codebook_size), 64)
    assert image_layout(llamagen) is layout  # computed once per config
    var = tiny_var_config()
    assert image_layout(var).num_tokens == var.num_image_tokens == 30 and image_layout(var).rows == 4
    with pytest.raises(ValueError, match="not one this model makes"):
        image_layout(llamagen, (llamagen.image_size * 2, llamagen.image_size * 2))
    # a text-to-image layout: an end-of-line token after each row and two tokens after the image
    t2i = ImageLayout(3, 4, range(100, 164), row_end=7, image_end=(8, 9))
    assert (t2i.row_stride, t2i.num_tokens, t2i.num_codes, t2i.codebook_size) == (5, 17, 12, 64)


def test_bench_accel_checks_the_targets_on_its_table():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_accel import targets
    from common import markdown_table

    header = ["decoding", "forwards/image", "vs raster", "tokens/forward", "draft acceptance",
              "images/s, 1 in flight", "speed-up (range)", "speed-up / step compression",
              "images/s, 16 in flight", "speed-up (range)", "class agreement (200 images)", "Fréchet distance"]

    def row(name, compression, share, loaded, agreement=0.92, frechet=18.5):
        return [name, "-", "-", f"{compression:.2f}", "-", "1", "1.00x (1-1)", f"{share:.2f}", "1",
                f"{loaded:.2f}x (0.9-1.1)", f"{agreement:.3f}", f"{frechet:.2f}"]

    def check(loaded, hybrid):
        table = markdown_table(header, [row("raster", 1, 1, 1.02), row("SJD L=64 + coupled", 4.5, 0.86, 0.5),
                                        row("SJD L=64, load-aware", 1, 1.5, loaded),
                                        row("ZipAR w=4 x SJD L=16 (lossy)", hybrid, 0.9, 0.4, 0.91, 18.6)])
        return {line.split(" | ")[0].strip("| ")[:12]: line.split(" | ")[-1].strip(" |")
                for line in targets(table, 0.3).splitlines()[2:]}

    met = check(1.01, 5.2)
    assert met == {"lossless row": "met", "ZipAR x SJD ": "met", "latency gain": "met", "load-aware: ": "met"}
    missed = check(0.96, 3.5)
    assert missed["load-aware: "] == "missed by 0.04 at worst (SJD L=64, load-aware, 16 in flight)"
    assert missed["ZipAR x SJD "] == "missed by 1.50x (3.50x of 5x)"

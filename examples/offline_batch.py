"""Offline batch generation with the plugin's Python API (runs as is on the embedded model).

    python examples/offline_batch.py [--model DIR] [--out examples_out]
"""
import argparse
import os

if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="converted model folder (default: embedded MNIST model)")
    ap.add_argument("--out", default="examples_out")
    args = ap.parse_args()

    from vllm_visual_ar import ImageGenerator

    generator = ImageGenerator(args.model, max_images_in_flight=16)
    # A guided batch at the model's default guidance, and an unguided one, in the same engine.
    guided = generator.generate(classes=[3, 7], n=4, seed=0, progress=True)
    unguided = generator.generate(classes=[3, 7], n=2, guidance_scale=1.0, seed=100)
    os.makedirs(args.out, exist_ok=True)
    for name, images in (("guided", guided), ("unguided", unguided)):
        for i, result in enumerate(images):
            result.image.save(os.path.join(args.out, f"{name}_{result.class_id}_{i}.png"))
        stats = images[0].stats
        print(f"{name}: {len(images)} images, {stats.tokens} tokens and {stats.forward_passes} forward passes "
              f"each, slowest {max(r.stats.seconds for r in images):.2f} s")

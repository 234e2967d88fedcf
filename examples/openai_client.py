"""Images from a running `vllm-visual-ar serve` with the official `openai` client (runs as is).

    vllm-visual-ar serve --port 8000 &          # the embedded MNIST model; about 30 s to healthy
    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--out examples_out]
"""
import argparse
import base64
import os

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
ap.add_argument("--out", default="examples_out")
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)

client = OpenAI(base_url=args.base_url, api_key="unused")  # vLLM checks no key unless started with --api-key
model = client.models.list().data[0].id

# Four sevens in raster order; the plugin's own fields travel in extra_body.
result = client.images.generate(model=model, prompt="seven", n=4, size="32x32", response_format="b64_json",
                                extra_body={"seed": 0, "guidance_scale": 2.0})
for i, image in enumerate(result.data):
    with open(os.path.join(args.out, f"seven_{i}.png"), "wb") as f:
        f.write(base64.b64decode(image.b64_json))

# The same with ZipAR row-parallel decoding (window 8: 144 forward passes per image instead of 256).
result = client.images.generate(model=model, prompt="3", n=4,
                                extra_body={"seed": 0, "strategy": "zipar", "window": 8})
for i, image in enumerate(result.data):
    with open(os.path.join(args.out, f"three_zipar_{i}.png"), "wb") as f:
        f.write(base64.b64decode(image.b64_json))

# Streaming: two previews as rows of codes complete, then the image.
for event in client.images.generate(model=model, prompt="eight", stream=True, partial_images=2,
                                    extra_body={"seed": 1}):
    name = (f"eight_partial_{event.partial_image_index}.png" if event.type == "image_generation.partial_image"
            else "eight.png")
    with open(os.path.join(args.out, name), "wb") as f:
        f.write(base64.b64decode(event.b64_json))
    print(event.type, "->", name)
print("wrote", os.path.abspath(args.out))

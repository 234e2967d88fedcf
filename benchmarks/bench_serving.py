"""The HTTP server under load: images/s and latency at 1, 8 and 32 concurrent clients, beside the
offline engine (`ImageGenerator`) making the same images in the same run.

    python benchmarks/bench_serving.py [--clients 1 8 32] [--images-per-client 4] [--strategy raster|zipar --window W]

Each client sends one-image requests (guided, the model's defaults) back to back. Latency is per
request, from sending to the full response (PNG included). The offline row generates the same
number of images with the same number in flight, in vLLM's default two-process mode as the server
uses. Prints a table and writes benchmarks/results/serving.md.
"""
import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import markdown_table, write_results  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def load(url: str, clients: int, per_client: int, body: dict) -> tuple[float, list[float]]:
    import httpx

    latencies: list[float] = []

    async def client(index: int, http):
        for j in range(per_client):
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/images/generations",
                                json=dict(body, prompt=str((index + j) % 10), seed=index * 1000 + j))
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        return time.perf_counter() - t0, latencies


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--images-per-client", type=int, default=4)
    ap.add_argument("--strategy", default="raster")
    ap.add_argument("--window", type=int, default=None)
    args = ap.parse_args()
    decoding = {"strategy": args.strategy, **({"window": args.window} if args.window else {})}

    from vllm_visual_ar.launch import running_server

    rows = []
    with running_server(os.path.join(tempfile.mkdtemp(), "server.log")) as url:
        asyncio.run(load(url, 2, 1, decoding))  # warm-up
        for clients in args.clients:
            seconds, latencies = asyncio.run(load(url, clients, args.images_per_client, decoding))
            images = clients * args.images_per_client
            rows.append([clients, images, f"{images / seconds:.2f}", f"{percentile(latencies, 50):.2f}",
                         f"{percentile(latencies, 95):.2f}"])
            print(rows[-1], flush=True)

    # The offline engine, same images, after the server is gone (2 cores: never both at once).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from vllm_visual_ar.generator import ImageGenerator

    engine = ImageGenerator(max_images_in_flight=max(args.clients))
    engine.generate([0, 1], seed=0, **decoding)  # warm-up
    offline = {}
    for clients in args.clients:
        classes = [i % 10 for i in range(clients)]
        t0 = time.perf_counter()
        for j in range(args.images_per_client):  # `clients` images in flight at a time, as the clients keep it
            engine.generate(classes, seed=j, **decoding)
        offline[clients] = clients * args.images_per_client / (time.perf_counter() - t0)
        print("offline", clients, f"{offline[clients]:.2f}", flush=True)
    for row in rows:
        row += [f"{offline[row[0]]:.2f}", f"{float(row[2]) / offline[row[0]]:.2f}x"]

    table = markdown_table(["concurrent clients", "images", "images/s (server)", "p50 latency s", "p95 latency s",
                            "images/s (offline engine)", "server / offline"], rows)
    print(table)
    notes = (f"Embedded model, guided at its defaults, decoding {decoding}; one image per request, each client "
             "sending its next request when the last returns. Server: `vllm-visual-ar serve` (vLLM's OpenAI server, "
             "engine in its own process) on the same 2-core machine as the clients. Offline: `ImageGenerator` with "
             "the same number of images in flight, in rounds (so slightly less continuous than the clients), also "
             "with vLLM's engine in a second process.")
    print("wrote", write_results("serving", "Images endpoint under load vs the offline engine", table, notes))


if __name__ == "__main__":
    main()

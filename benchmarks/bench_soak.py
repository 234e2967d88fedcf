"""Soak: the HTTP server through rounds of mixed load, hang-ups and bad input; nothing may stall,
leak KV or grow memory.

    python benchmarks/bench_soak.py [--rounds 5] [--concurrent 64]

Each round sends, all at once: `--concurrent` image requests mixing raster, ZipAR and SJD (guided
and not, one or two images), plus clients that hang up mid-stream (a streamed request closed after
its first partial image, a plain one dropped after 0.3 s), plus requests that ask for a window too
large for the server's step budget; then a burst of malformed requests. After each round it waits
for the engine to go idle and reads KV usage (vLLM's `vllm:kv_cache_usage_perc`) and the resident
memory of the server (API process plus engine process). Prints a table and writes
benchmarks/results/soak.md.
"""
import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import markdown_table, write_results  # noqa: E402

STEP_TOKENS = 384  # the server's step budget (a guided SJD window over 192 can never run)
MIXES = [{}, {"strategy": "zipar", "window": 4}, {"strategy": "zipar", "window": 8}, {"strategy": "sjd", "window": 8},
         {"strategy": "sjd", "window": 16, "init": "horizontal"}, {"strategy": "sjd", "window": 10**9,
                                                                   "guidance_scale": 1.0},
         {"strategy": "sjd", "window": 10**9}]
BAD = ['{"prompt": "7", "seed": 1180591620717411303424}', '{"prompt": "7", "guidance_scale": NaN}',
       '{"prompt": "7", "guidance_scale": 1e999}', "[" * 50_000 + "]" * 50_000, '{"prompt": "\u00b2"}',
       '{"prompt": "7", "window": 3}', '{"prompt": "7", "strategy": "sjd", "window": 0}', '{"prompt": 7.5}',
       '{"prompt": "7", "n": 1000}', '{"prompt": "7", "extra_params": []}', "not json", "",
       '{"prompt": "7", "timeout": -1}', '{"prompt": "' + "7" * 5000 + '"}', '{"prompt": "7", "seed": 4294967295, "n": 2}']


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def server_rss_mib(port: int) -> float:
    """Resident memory of the server process (found by its --port) and its children (the engine)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "serve" in cmd and str(port) in cmd:
            procs = [p] + p.children(recursive=True)
            return sum(q.memory_info().rss for q in procs if q.is_running()) / 2**20
    return float("nan")


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def wait_idle(http, url: str, limit: float = 60) -> tuple[float, float]:
    """-> (seconds until no request runs or waits, KV usage then)."""
    t0 = time.perf_counter()
    while True:
        text = (await http.get(f"{url}/metrics")).text
        busy = metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")
        if busy == 0 or time.perf_counter() - t0 > limit:
            return time.perf_counter() - t0, metric(text, "vllm:kv_cache_usage_perc")
        await asyncio.sleep(0.2)


async def one_round(url: str, round_index: int, concurrent: int) -> dict:
    import httpx

    latencies, completed, refused, other = [], 0, 0, []

    async def image(http, i: int):
        nonlocal completed, refused
        body = {"prompt": str(i % 10), "seed": round_index * 1000 + i, "guidance_scale": [1.0, 2.0, 3.0][i % 3],
                "n": 1 + (i % 4 == 0), **MIXES[i % len(MIXES)]}
        t0 = time.perf_counter()
        r = await http.post(f"{url}/v1/images/generations", json=body)
        if r.status_code == 200 and len(r.json()["data"]) == body["n"]:
            completed += 1
            latencies.append(time.perf_counter() - t0)
        elif r.status_code == 400 and "can never be scheduled" in r.text:
            refused += 1
        else:
            other.append((r.status_code, r.text[:200]))

    async def hang_up_streaming(http, i: int):
        body = dict(prompt=str(i), stream=True, partial_images=3, strategy="sjd", window=8)
        async with http.stream("POST", f"{url}/v1/images/generations", json=body) as r:
            async for chunk in r.aiter_text():
                if "partial_image" in chunk:
                    break  # leave mid-image

    async def hang_up_plain(i: int):
        async with httpx.AsyncClient(timeout=0.3) as quick:
            try:
                await quick.post(f"{url}/v1/images/generations", json=dict(prompt=str(i), n=8, guidance_scale=2.0))
            except httpx.TimeoutException:
                pass

    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(image(http, i) for i in range(concurrent)),
                             *(hang_up_streaming(http, i) for i in range(4)), *(hang_up_plain(i) for i in range(4)))
        wall = time.perf_counter() - t0
        bad_4xx = 0
        for raw in BAD:
            r = await http.post(f"{url}/v1/images/generations", content=raw,
                                headers={"Content-Type": "application/json"})
            bad_4xx += 400 <= r.status_code < 500 and "error" in r.json()
        idle_s, kv = await wait_idle(http, url)
    return dict(asked=concurrent, completed=completed, refused=refused, other=other, wall=wall, idle=idle_s, kv=kv,
                p50=percentile(latencies, 50), p95=percentile(latencies, 95), bad=bad_4xx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=64)
    args = ap.parse_args()

    from vllm_visual_ar.launch import running_server

    rows, problems = [], []
    with running_server(os.path.join(tempfile.mkdtemp(), "server.log"),
                        extra_args=("--max-num-batched-tokens", str(STEP_TOKENS))) as url:
        port = int(url.rsplit(":", 1)[1])
        asyncio.run(one_round(url, -1, 8))  # warm-up: first-use costs are not a leak
        rss_start = server_rss_mib(port)
        print(f"server RSS after warm-up: {rss_start:.0f} MiB", flush=True)
        for k in range(args.rounds):
            res = asyncio.run(one_round(url, k, args.concurrent))
            rss = server_rss_mib(port)
            problems += res["other"]
            rows.append([k + 1, res["asked"], res["completed"], res["refused"], f"{res['bad']}/{len(BAD)}",
                         f"{res['p50']:.2f}", f"{res['p95']:.2f}", f"{res['wall']:.1f}", f"{res['idle']:.1f}",
                         f"{res['kv']:.4f}", f"{rss:.0f}", f"{rss - rss_start:+.0f}"])
            print(rows[-1], flush=True)

    table = markdown_table(["round", "image requests", "completed", "refused at once (can never fit)",
                            "bad inputs answered 4xx", "p50 latency s", "p95 latency s", "round wall s",
                            "s to idle after", "KV usage after", "server RSS MiB", "RSS vs warm-up MiB"], rows)
    print(table)
    if problems:
        print("unexpected answers:", json.dumps(problems[:10], indent=1))
    notes = (f"Embedded model, `vllm-visual-ar serve --max-num-batched-tokens {STEP_TOKENS}` on the same 2-core "
             f"machine as the clients. Per round, at once: {args.concurrent} image requests cycling through raster, "
             "ZipAR w=4 and w=8, SJD w=8, SJD w=16 horizontal, SJD with window 10**9 unguided and SJD with window "
             "10**9 at the round's guidance, guidance 1/2/3, every "
             "fourth with n=2; 4 streamed requests closed after their first partial image; 4 requests of 8 guided "
             f"images dropped after 0.3 s; then {len(BAD)} malformed requests. A guided SJD image with window 10**9 "
             "acts as a 256-token window, which needs 512 tokens per step: more than the server's budget, so it "
             "is refused at once (400) instead of stalling the queue; unguided it runs. 'completed' counts "
             "requests answered with all their images; the rest of the requests are exactly the refused ones"
             + (f"; unexpected answers: {problems[:3]}" if problems else "") + ". RSS is the API server process "
             "plus its engine process, after the round's work is done.")
    print("wrote", write_results("soak", "Soak: mixed load, hang-ups and bad input, round after round", table, notes))


if __name__ == "__main__":
    main()

"""Run `vllm-visual-ar serve` as a child process and wait until it is healthy (tests, benchmarks)."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(log_path: str, model: str | None = None, extra_args: tuple[str, ...] = (),
                   startup_timeout: float = 180):
    """Yields the base URL (http://127.0.0.1:PORT). The engine runs as a separate process, as for a user."""
    import httpx

    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    argv = [sys.executable, "-m", "vllm_visual_ar.cli", "serve", *([model] if model else []),
            "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + startup_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited with {proc.returncode}: {log.read()[-3000:]}")
                if time.time() > deadline:
                    raise RuntimeError(f"server not healthy after {startup_timeout} s (log: {log_path})")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

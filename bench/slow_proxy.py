#!/usr/bin/env python3
"""An HTTP reverse proxy that makes a local registry look far away: a fixed delay per request and
a shared bandwidth cap, with no kernel help (tc netem is not available on our machines).

    .venv/bin/python bench/slow_proxy.py --upstream http://127.0.0.1:5000 --port 5100 \\
        --delay 20ms --rate 20Mbit

Every request waits ``delay`` before it is forwarded (the round trip a distant registry costs);
response bodies then flow through one token bucket of ``rate`` shared by all connections (the
link). Redirects and headers pass through unchanged. It runs as its own process so that it does
not share a GIL with the client being measured; :func:`start` / :func:`stop` manage one from
Python. It prints ``listening PORT`` when ready, and its request/byte counts on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

from aiohttp import ClientSession, ClientTimeout, web


def parse_rate(text: str) -> float:
    """``20Mbit`` / ``100mbit`` / ``12.5M`` (bytes) / ``0`` → bytes per second (0 = unlimited)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)(bit|b)?\s*", text.lower())
    if not m:
        raise ValueError(f"bad rate {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return value / 8 if m.group(3) == "bit" else value


def parse_delay(text: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s)?\s*", text.lower())
    if not m:
        raise ValueError(f"bad delay {text!r}")
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


class Bucket:
    """A token bucket shared by every response body."""

    def __init__(self, rate: float, burst: float = 64 * 1024):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)


async def serve(upstream: str, port: int, delay: float, rate: float) -> None:
    bucket = Bucket(rate)
    session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=None, sock_read=60))
    counts = {"requests": 0, "bytes": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        counts["requests"] += 1
        await asyncio.sleep(delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        async with session.request(
            request.method,
            upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            out_headers = {
                k: v
                for k, v in up.headers.items()
                if k.lower() not in ("transfer-encoding", "content-encoding", "connection")
            }
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            async for chunk in up.content.iter_chunked(16 * 1024):
                await bucket.take(len(chunk))
                counts["bytes"] += len(chunk)
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    print(f"requests {counts['requests']} bytes {counts['bytes']}", flush=True)
    await session.close()
    await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(upstream: str, *, delay: str = "20ms", rate: str = "0") -> tuple[subprocess.Popen[str], str]:
    """Start a proxy process in front of ``upstream``; returns it and its ``host:port``."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--upstream",
            upstream,
            "--port",
            str(port),
            "--delay",
            delay,
            "--rate",
            rate,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("listening"):
        proc.kill()
        raise RuntimeError("slow proxy did not start")
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen[str]) -> str:
    """Stop a proxy; returns its ``requests N bytes M`` line."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return out.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:5000")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", default="20ms", help="added to every request (default 20ms)")
    ap.add_argument("--rate", default="0", help="bandwidth cap, e.g. 20Mbit or 12.5M (bytes); 0 = none")
    args = ap.parse_args()
    asyncio.run(
        serve(
            args.upstream.rstrip("/"),
            args.port or free_port(),
            parse_delay(args.delay),
            parse_rate(args.rate),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

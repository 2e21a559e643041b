"""A fixed-response upstream and a keep-alive HTTP/1.1 load generator, both raw asyncio.

Each runs in its own process (``python -m benchmarks.loadgen upstream|load ...``) so that
neither shares a GIL with the other or with mitmdump. Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class _FixedResponse(asyncio.Protocol):
    """Answers every request (GET, no body) with the same small response; pipelining works."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        count = self.buffer.count(b"\r\n\r\n")
        if count:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(RESPONSE * count)  # type: ignore[attr-defined]


async def serve_upstream(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_FixedResponse, host, port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def _connection(
    host: str,
    port: int,
    request: bytes,
    stop_at: float,
    record_from: float,
    latencies: list[int],
    errors: list[str],
    total: list[int],
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        errors.append(f"connect: {e}")
        return
    perf = time.perf_counter_ns
    monotonic = time.monotonic
    try:
        while (now := monotonic()) < stop_at:
            start = perf()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                length = int(lower[i + 17 : lower.find(b"\r\n", i + 2)])
            if length:
                await reader.readexactly(length)
            if status != b"200":
                errors.append(f"status {status.decode()}")
                break
            total[0] += 1
            if now >= record_from:
                latencies.append(perf() - start)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        writer.close()


async def run_load(
    host: str, port: int, connections: int, duration: float, warmup: float, headers: str, body_bytes: int = 0
) -> dict:
    """Closed loop: each connection sends its next request when the previous answer is in.

    With ``body_bytes``, a POST with that many bytes of body (``a``: no CRLF in it, which the
    fixed-response upstream counts requests by)."""
    extra = "".join(f"{h}\r\n" for h in headers.split("|") if h)
    if body_bytes:
        extra += f"Content-Length: {body_bytes}\r\n"
    method = "POST" if body_bytes else "GET"
    request = f"{method} /bench HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode() + b"a" * body_bytes
    latencies: list[int] = []
    errors: list[str] = []
    total = [0]
    start = time.monotonic()
    record_from = start + warmup
    stop_at = record_from + duration
    await asyncio.gather(
        *(_connection(host, port, request, stop_at, record_from, latencies, errors, total) for _ in range(connections))
    )
    measured = max(time.monotonic() - record_from, 1e-9)
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "total_requests": total[0],  # with the warm-up
        "seconds": round(measured, 3),
        "rps": n / measured,
        "p50_ms": latencies[n // 2] / 1e6 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] / 1e6 if n else None,
        "errors": errors[:5],
        "error_count": len(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    sub = parser.add_subparsers(dest="what", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, required=True)
    load = sub.add_parser("load")
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--connections", type=int, default=8)
    load.add_argument("--duration", type=float, default=3.0)
    load.add_argument("--warmup", type=float, default=0.5)
    load.add_argument("--headers", default="", help="extra header lines, separated by |")
    load.add_argument("--body-bytes", type=int, default=0, help="send POSTs with a body of this many bytes")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.host.startswith("127."):
        parser.error("loopback only")
    if args.what == "upstream":
        asyncio.run(serve_upstream(args.host, args.port))
        return 0
    duration = min(args.duration, 60.0)
    result = asyncio.run(
        run_load(args.host, args.port, args.connections, duration, args.warmup, args.headers, args.body_bytes)
    )
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A TCP proxy that delays every chunk by a fixed time in each direction: a database "D ms
away" for the bench (``python -m bench.delayproxy --target HOST:PORT --delay-ms D``).

It listens on 127.0.0.1 (port 0: a free one) and prints ``listening on tcp://127.0.0.1:PORT``
once it accepts. For each client it opens one connection to the target, and in each
direction a reader stamps every chunk it reads with a due time (its arrival plus D) and
queues it, while a writer forwards the queued chunks in order, each no sooner than its due
time. The reader never waits for the writer, so the delay adds latency, not a limit on
throughput: chunks read 0.1 ms apart leave 0.1 ms apart, D later (as on a link with a
long propagation delay). An end of stream is delayed like data and passed on as a
half-close; a reset or error on either side closes both. With D = 0 it forwards at once:
its own cost. It runs until it is signalled (SIGTERM ends it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence

from loadtest.argtypes import non_negative_float, non_negative_int

__all__ = ["DelayProxy", "main", "parse_target"]

#: Bytes read at once from either side.
CHUNK = 64 * 1024


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to a host and a port (argparse type)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


class DelayProxy:
    """Forward connections on ``listen`` to ``target``, each chunk ``delay_s`` late."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError("the delay cannot be negative")
        self.target = target
        self.delay_s = delay_s

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        return await asyncio.start_server(self._client, host, port)

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pumps = [asyncio.create_task(self._pump(reader, up_writer)),
                 asyncio.create_task(self._pump(up_reader, writer))]
        try:
            # Both directions end (a half-close passes on); an error in one ends both.
            for done in asyncio.as_completed(pumps):
                try:
                    await done
                except (OSError, asyncio.IncompleteReadError):
                    break
        finally:
            for task in pumps:
                task.cancel()
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """One direction: the reader stamps and queues, the writer waits for each due time."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while True:
                    data = await source.read(CHUNK)
                    queue.put_nowait((loop.time() + self.delay_s, data))
                    if not data:  # end of stream: queued too, so it is delayed like data
                        return
            except OSError:
                queue.put_nowait((0.0, b""))  # a reset ends the writer at once ...
                raise  # ... and is raised by it (await reading)

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                while (wait := due - loop.time()) > 0:  # never early, whatever the timer
                    await asyncio.sleep(wait)
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    break
                sink.write(data)
                await sink.drain()
            await reading
        finally:
            reading.cancel()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.delayproxy",
        description="A TCP proxy on 127.0.0.1 that delays every chunk by --delay-ms in each "
                    "direction, in order, without limiting throughput (the bench's "
                    "database 'D ms away').")
    p.add_argument("--target", type=parse_target, required=True, metavar="HOST:PORT",
                   help="where to forward each connection")
    p.add_argument("--delay-ms", type=non_negative_float, default=1.0, metavar="MS",
                   help="delay of every chunk, each way, in milliseconds (default 1; 0 "
                        "forwards at once)")
    p.add_argument("--port", type=non_negative_int, default=0,
                   help="port to listen on, on 127.0.0.1 (default 0: a free one)")
    return p


async def _serve(args: argparse.Namespace) -> None:
    server = await DelayProxy(args.target, args.delay_ms / 1000).start(port=args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"delayproxy: {args.delay_ms:g} ms each way to {args.target[0]}:{args.target[1]}, "
          f"listening on tcp://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

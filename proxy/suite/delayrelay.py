"""A userspace TCP relay that delays every chunk, for kernels without netem.

    python -m tightwad.suite.delayrelay --listen 198.18.1.2:0 --to 127.0.0.1:8080 \\
        --delay-ms 25 --jitter-ms 0 [--seed 1]

Each chunk read from either side is written to the other side ``delay ± jitter``
milliseconds after it arrived (uniform in ``[d - j, d + j]``, clipped at 0) but
never before the chunk read ahead of it in the same direction, so each byte
stream keeps its order. One line ``ready HOST:PORT`` goes to stdout once the
relay listens (the real port when ``--listen`` asked for port 0).

What it cannot emulate: the TCP handshake and the ACKs pass undelayed (a new
connection is established at once), and its buffers hide the bandwidth-delay
product. Where the kernel has netem, the network lab uses that instead.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import random
import selectors
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable

# Bytes held in one direction before reading from its source pauses: bounds the
# relay's memory when the destination reads slower than the source writes.
HIGH_WATER = 4 * 1024 * 1024

_EOF = b""  # data_received never gets an empty chunk, so it can mark end of stream
_CLOSE = None


class Delay:
    """Samples the hold time of one chunk, in seconds."""

    def __init__(self, delay_ms: float, jitter_ms: float = 0.0, seed: int | None = None) -> None:
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        self._delay = delay_ms / 1000
        self._jitter = jitter_ms / 1000
        self._rng = random.Random(seed)

    def sample(self) -> float:
        if not self._jitter:
            return self._delay
        return max(0.0, self._rng.uniform(self._delay - self._jitter, self._delay + self._jitter))


class _Direction:
    """One byte stream of a connection, each chunk held until its release time.

    A single timer per direction (not one per chunk) keeps the cost of a chunk
    to a deque append; chunks that fall due together go out in one write.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: Delay, ended: Callable[[], None]):
        self._loop = loop
        self._delay = delay
        self._ended = ended
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._held = 0
        self._paused = False
        self._dead = False
        self._done = False
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.dst_full = False

    def push(self, chunk: bytes | None) -> None:
        if self._dead:
            return
        release = max(self._last, self._loop.time() + self._delay.sample())
        self._last = release
        self._queue.append((release, chunk))
        self._held += len(chunk or b"")
        self.throttle()
        if self._timer is None:
            self._timer = self._loop.call_at(release, self.flush)

    def attach(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        if self._queue and self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self.flush)

    def drop(self) -> None:
        """The destination is gone: whatever is still held can never be delivered."""
        self._dead = True
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        self._timer = None
        dst = self.dst
        if dst is None:  # upstream still connecting; attach() resumes
            return
        # asyncio may run a timer up to its clock resolution early.
        now = self._loop.time() + 1e-6
        ready: list[bytes] = []
        while self._queue and self._queue[0][0] <= now:
            _, chunk = self._queue.popleft()
            if chunk:
                ready.append(chunk)
                continue
            self._write(dst, ready)
            ready = []
            self._finish(dst, chunk)
            if self._dead:
                return
        self._write(dst, ready)
        if self._queue:
            self._timer = self._loop.call_at(self._queue[0][0], self.flush)

    def _finish(self, dst: asyncio.Transport, marker: bytes | None) -> None:
        # After an EOF only a close can follow, which must still close `dst`:
        # a socket whose peer has gone would otherwise stay open for good.
        if marker is _CLOSE:
            self.drop()
            dst.close()
        elif dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
        if not self._done:
            self._done = True
            self._ended()

    def _write(self, dst: asyncio.Transport, chunks: list[bytes]) -> None:
        if not chunks:
            return
        if not dst.is_closing():
            dst.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        self._held -= sum(map(len, chunks))
        self.throttle()

    def throttle(self) -> None:
        want = self._held > HIGH_WATER or self.dst_full
        src = self.src
        if want == self._paused or src is None or src.is_closing():
            return
        self._paused = want
        if want:
            src.pause_reading()
        else:
            src.resume_reading()


class _Side(asyncio.Protocol):
    """One socket of a relayed connection: what it reads goes `out`, `back` writes to it."""

    def __init__(self, out: _Direction, back: _Direction) -> None:
        self.out = out
        self.back = back
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport
        self.out.src = transport
        self.back.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(_EOF)
        return True  # keep the transport open: the other direction may still be talking

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.push(_CLOSE)
        self.back.drop()

    def pause_writing(self) -> None:
        self.back.dst_full = True
        self.back.throttle()

    def resume_writing(self) -> None:
        self.back.dst_full = False
        self.back.throttle()


class _Connection:
    def __init__(self, loop: asyncio.AbstractEventLoop, delay: Delay) -> None:
        up = _Direction(loop, delay, self._ended)
        down = _Direction(loop, delay, self._ended)
        self.client = _Side(up, down)
        self.upstream = _Side(down, up)
        self._ends = 0
        self.task: asyncio.Task[None] | None = None

    def _ended(self) -> None:
        # Both streams finished: nothing else can flow, so release both sockets.
        self._ends += 1
        if self._ends == 2:
            for side in (self.client, self.upstream):
                if side.transport is not None:
                    side.transport.close()

    async def connect(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.upstream, host, port)
        except OSError as exc:
            print(f"delayrelay: cannot reach {host}:{port}: {exc}", file=sys.stderr)
            if self.client.transport is not None:
                self.client.transport.abort()


async def serve(listen: tuple[str, int], to: tuple[str, int], delay: Delay) -> asyncio.Server:
    """Start relaying; returns the listening server (its socket has the real port)."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def accepted() -> _Side:
        conn = _Connection(loop, delay)
        task = loop.create_task(conn.connect(*to))
        pending.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(pending.discard)
        return conn.client

    return await loop.create_server(accepted, *listen)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _tight_timers() -> None:
    # Linux lets a sleeping thread oversleep by 50 us by default; two hops per
    # round trip would add a third of a LAN hop. PR_SET_TIMERSLACK = 29.
    try:
        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tightwad.suite.delayrelay")
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--to", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    delay = Delay(args.delay_ms, args.jitter_ms, args.seed)
    # select() takes a microsecond timeout where epoll rounds up to whole
    # milliseconds, which would turn a 0.3 ms LAN hop into 1 ms. The relay
    # carries a handful of connections, far below select()'s 1024-fd limit.
    _tight_timers()
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    asyncio.set_event_loop(loop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    server = loop.run_until_complete(serve(args.listen, args.to, delay))
    host, port = server.sockets[0].getsockname()[:2]
    print(f"ready {host}:{port}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The parser process pool: each message is parsed by `inbound.parse_message` in a worker
process with CPU, memory and wall-time limits, so that one hostile message can neither hold
up the others nor take the daemon down. Nothing here may raise on any input or hang its
caller: every limit hit, crash or dead worker becomes a malformed result.

The pool is a small hand-written one (one socket pair per worker process, one message per
worker at a time) rather than ProcessPoolExecutor, because a stuck or over-limit worker must be
killed on its own: ProcessPoolExecutor can only break as a whole, failing every innocent
message in flight with it. Workers are started with "spawn" (fork is unsafe in a threaded
asyncio program); a replacement costs ~0.2 s of CPU, paid only after a hostile message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import math
import multiprocessing
import multiprocessing.context
import pickle
import resource
import signal
import socket
import sys
from collections.abc import Callable

from .bounce import DeliveryReport
from .config import Config
from .inbound import (
    Attachment,
    InboundMessage,
    Malformed,
    ParseLimits,
    parse_message,
    salvage_message,
)
from .metrics import PARSER_RESTARTS


def parse_limits(config: Config) -> ParseLimits:
    """The per-message limits of the `[parser]` section (all of it but the pool's size)."""
    fields = dataclasses.asdict(config.parser)
    fields.pop("workers")
    return ParseLimits(**fields)


# Worker protocol: 8-byte big-endian length, then the payload (raw mail one way, a pickled
# InboundMessage or a Malformed value back). One ready byte is sent after start-up.
_FRAME_HEADER = 8
_READY = b"R"
_STARTUP_SECONDS = 60.0
_REAP_SECONDS = 5.0


# --- worker process -------------------------------------------------------------------------

# What a worker runs on each message; parse_message, or a misbehaving one in the tests.
ParseFunction = Callable[[bytes, ParseLimits], InboundMessage]


def _set_soft_limit(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, hard))


def _arm_cpu_limit(cpu_seconds: int) -> None:
    # RLIMIT_CPU counts the whole life of the process, so each message gets the CPU used so
    # far plus its own budget. Past it the kernel sends SIGXCPU, whose default action ends
    # the worker; the caller sees the exit status and reports parse-timeout.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _set_soft_limit(resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime) + cpu_seconds)


def _worker_main(sock: socket.socket, limits: ParseLimits, parse: ParseFunction) -> None:
    """Entry point of a worker process: parse one framed message at a time until EOF."""
    # Ctrl-C on the daemon's terminal reaches the whole process group; the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker killed by SIGXCPU would otherwise dump up to memory_bytes of core.
    _set_soft_limit(resource.RLIMIT_CORE, 0)
    _set_soft_limit(resource.RLIMIT_AS, limits.memory_bytes)
    if not _self_test(parse, limits):
        # Reported to the pool as a worker that did not start.
        sys.exit(3)
    try:
        with sock, sock.makefile("rwb") as stream:
            stream.write(_READY)
            stream.flush()
            while True:
                header = stream.read(_FRAME_HEADER)
                size = int.from_bytes(header, "big")
                raw = stream.read(size)
                if len(header) < _FRAME_HEADER or len(raw) < size:
                    return
                _arm_cpu_limit(limits.cpu_seconds)
                stream.write(_frame(_run_parse(parse, raw, limits)))
                stream.flush()
    except OSError:
        # The pool closed its end (or died): nobody is left to answer.
        return


# RELIABILITY.md part 1, rule 4: the workarounds are checked on the Python actually running,
# under the worker's own limits, before the worker takes mail.
_SELF_TEST = (
    b"From: =?utf-8?q?Self=0ATest?= <self-test@example.org>\r\n"
    b"To: (c):\r\n"
    b"Subject: =?utf-8?q?self-test_=C3=A9?=\r\n"
    b"Message-ID: <[self-test@example.org]>\r\n"
    b"Content-Type: text/plain; charset=utf-8; name*\r\n"
    b"\r\n"
    b"ok\r\n"
)


def _self_test(parse: ParseFunction, limits: ParseLimits) -> bool:
    try:
        result = parse(_SELF_TEST, limits)
        return (
            result.malformed is None
            and result.text == "ok\n"
            and result.subject == "self-test \u00e9"
            and result.message_id == "<[self-test@example.org]>"
            and result.from_addresses == (("Self Test", "self-test@example.org"),)
        )
    except Exception:
        return False


def _run_parse(parse: ParseFunction, raw: bytes, limits: ParseLimits) -> bytes:
    result: InboundMessage | str
    try:
        result = parse(raw, limits)
    except MemoryError:
        result = Malformed.PARSE_MEMORY.value
    except Exception:
        result = Malformed.PARSE_CRASH.value
    try:
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except MemoryError:
        return pickle.dumps(Malformed.PARSE_MEMORY.value)
    except Exception:
        return pickle.dumps(Malformed.PARSE_CRASH.value)


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(_FRAME_HEADER, "big") + payload


_RESULT_CLASSES = frozenset(
    (cls.__module__, cls.__qualname__) for cls in (InboundMessage, Attachment, DeliveryReport)
)


class _ResultUnpickler(pickle.Unpickler):
    """Only our result types: a worker reads hostile input and is trusted no further."""

    def find_class(self, module: str, name: str) -> type[object]:
        if (module, name) in _RESULT_CLASSES:
            found: type[object] = super().find_class(module, name)
            return found
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")


def _load_result(payload: bytes) -> InboundMessage | str:
    result = _ResultUnpickler(io.BytesIO(payload)).load()
    if isinstance(result, InboundMessage):
        return result
    if isinstance(result, str) and result in Malformed.__members__.values():
        return result
    raise pickle.UnpicklingError("unexpected result")


class _Worker:
    """One worker process and the socket it is driven through."""

    def __init__(
        self,
        context: multiprocessing.context.SpawnContext,
        limits: ParseLimits,
        parse: ParseFunction,
    ) -> None:
        self._sock, child_sock = socket.socketpair()
        try:
            self.process = context.Process(
                target=_worker_main,
                args=(child_sock, limits, parse),
                name="gateway-parse",
                daemon=True,
            )
            self.process.start()
        except BaseException:
            self._sock.close()
            raise
        finally:
            child_sock.close()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ended: asyncio.Future[None] | None = None
        self._sentinel = self.process.sentinel

    def is_alive(self) -> bool:
        return self.process.exitcode is None

    async def wait_ready(self) -> None:
        """Connect the stream and wait for the worker's ready byte (start-up is not parse time)."""
        if self._writer is not None:
            return
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock)
        async with asyncio.timeout(_STARTUP_SECONDS):
            await self._reader.readexactly(len(_READY))

    async def request(self, raw: bytes) -> InboundMessage | str:
        if self._reader is None or self._writer is None:
            raise ConnectionError("worker not connected")
        # One write, so the worker wakes once for a small message.
        self._writer.write(len(raw).to_bytes(_FRAME_HEADER, "big") + raw)
        await self._writer.drain()
        size = int.from_bytes(await self._reader.readexactly(_FRAME_HEADER), "big")
        return _load_result(await self._reader.readexactly(size))

    def kill(self) -> None:
        """Stop the worker now: it may be stuck in C code, so no polite request."""
        with contextlib.suppress(ValueError, OSError):
            if self.process.exitcode is None:
                self.process.kill()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()

    async def exit_code(self) -> int | None:
        """Wait, without blocking the loop, for the process to end: its exit code, or None."""
        if self.process.exitcode is None:
            if self._ended is None:
                # One watcher per worker: add_reader allows a single callback per descriptor.
                loop = asyncio.get_running_loop()
                self._ended = loop.create_future()
                loop.add_reader(self._sentinel, self._on_exit)
            try:
                async with asyncio.timeout(_REAP_SECONDS):
                    await asyncio.shield(self._ended)
            except TimeoutError:
                return None
            # The sentinel closes as the process exits, so this wait is immediate.
            self.process.join()
        return self.process.exitcode

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sentinel)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    async def reap(self) -> None:
        self.kill()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if await self.exit_code() is None:
            # Unkillable for now (stuck in the kernel); stop watching and leave it to
            # multiprocessing, which reaps finished children whenever it starts one.
            asyncio.get_running_loop().remove_reader(self._sentinel)
        else:
            self.process.close()


async def _ready(worker: _Worker | None) -> bool:
    if worker is None:
        return False
    await worker.wait_ready()
    return True


class ParserPool:
    """Parses messages in worker processes; every limit or failure becomes a malformed result.

    Each of `workers` slots holds one process that parses one message at a time; a caller
    takes a slot from the idle queue and gives it back. A None in the queue is a slot whose
    worker could not be started yet; the next caller tries again.
    """

    def __init__(
        self,
        limits: ParseLimits,
        workers: int = 2,
        *,
        parse_function: ParseFunction = parse_message,
    ) -> None:
        """parse_function must be a module-level function (each worker imports it by name);
        it is there for tests that need a worker to misbehave."""
        if workers < 1:
            raise ValueError("ParserPool needs at least one worker")
        self._limits = limits
        self._size = workers
        self._parse_function = parse_function
        self._context = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._reapers: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        """Start the workers and wait until each is ready; idempotent.

        Raises RuntimeError if not one worker could start (a configuration error, e.g. a
        memory limit too small for the interpreter); the pool still retries on each parse.
        """
        async with self._start_lock:
            if self._started or self._closed:
                return
            self._started = True
            fresh = [self._spawn() for _ in range(self._size)]
            outcomes = await asyncio.gather(
                *(_ready(worker) for worker in fresh), return_exceptions=True
            )
            for worker, outcome in zip(fresh, outcomes, strict=True):
                if worker is not None and outcome is True:
                    self._idle.put_nowait(worker)
                else:
                    # An empty slot: the next caller starts a worker for it.
                    if worker is not None:
                        self._retire(worker, replace=False)
                    self._idle.put_nowait(None)
            if not any(outcome is True for outcome in outcomes):
                raise RuntimeError("no parser worker could start")

    async def close(self) -> None:
        """Terminate the workers; idempotent. Parses still in flight return malformed."""
        if not self._closed:
            self._closed = True
            # Wakes callers waiting for a slot; each passes it on (see _acquire).
            self._idle.put_nowait(None)
        for worker in list(self._workers):
            self._retire(worker)
        while self._reapers:
            await asyncio.gather(*list(self._reapers), return_exceptions=True)

    async def parse(self, raw: bytes) -> InboundMessage:
        """Parses in a worker process. Never raises (except asyncio.CancelledError).

        A message that hits a limit, crashes or kills its worker comes back with malformed
        set and the fields salvage_message recovers; a dead or stuck worker is replaced.
        """
        try:
            return await self._parse(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._salvage(raw, Malformed.PARSE_CRASH, f"parser pool: {type(exc).__name__}")

    async def _parse(self, raw: bytes) -> InboundMessage:
        if not self._started:
            await self.start()
        worker = await self._acquire()
        if worker is None:
            return self._salvage(raw, Malformed.PARSE_CRASH, "no parser worker available")
        outcome: InboundMessage | str
        try:
            # The wall clock starts once the worker is ready: queueing is not parse time.
            await worker.wait_ready()
        except asyncio.CancelledError:
            self._retire(worker)
            raise
        except Exception:
            self._retire(worker)
            return self._salvage(raw, Malformed.PARSE_CRASH, "parser worker did not start")
        try:
            async with asyncio.timeout(self._limits.wall_seconds):
                outcome = await worker.request(raw)
        except TimeoutError:
            self._retire(worker)
            return self._salvage(raw, Malformed.PARSE_TIMEOUT, "wall-time limit: worker killed")
        except Exception:
            # EOF or a broken pipe: the worker died (or answered nonsense).
            reason, defect = await self._bury(worker)
            return self._salvage(raw, reason, defect)
        except BaseException:
            # Cancelled mid-request: the worker's state is unknown, so it cannot be reused.
            self._retire(worker)
            raise
        self._release(worker)
        if isinstance(outcome, InboundMessage):
            return outcome
        return self._salvage(raw, Malformed(outcome), "parser worker gave up")

    async def _acquire(self) -> _Worker | None:
        """An idle, live worker, or None once closed or if no worker can be started."""
        slot = await self._idle.get()
        if self._closed:
            # Pass the wake-up on to the next waiter.
            self._idle.put_nowait(slot)
            return None
        if slot is not None and slot.is_alive():
            return slot
        if slot is not None:
            # Died while idle (killed from outside): not the fault of the message at hand.
            self._retire(slot, replace=False)
        worker = self._spawn()
        if worker is None:
            self._idle.put_nowait(None)
        return worker

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            self._retire(worker)
        else:
            self._idle.put_nowait(worker)

    def _salvage(self, raw: bytes, reason: Malformed, defect: str) -> InboundMessage:
        return salvage_message(raw, self._limits, reason.value, [defect])

    async def _bury(self, worker: _Worker) -> tuple[Malformed, str]:
        """Replace a worker that stopped answering; how it died decides the reason."""
        try:
            code = await worker.exit_code()
        finally:
            self._retire(worker)
        if code == -signal.SIGXCPU:
            return Malformed.PARSE_TIMEOUT, "CPU limit: worker killed by SIGXCPU"
        return Malformed.PARSE_CRASH, f"parser worker died (exit code {code})"

    def _spawn(self) -> _Worker | None:
        try:
            worker = _Worker(self._context, self._limits, self._parse_function)
        except Exception:
            # Out of processes or descriptors: the slot stays empty until a caller retries.
            return None
        self._workers.add(worker)
        return worker

    def _retire(self, worker: _Worker, *, replace: bool = True) -> None:
        """Kill a worker and, unless closing, put a fresh one in its slot. Synchronous, so it
        also works while the caller is being cancelled; the reaping happens in a task."""
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        worker.kill()
        reaper = asyncio.get_running_loop().create_task(worker.reap())
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        if replace and not self._closed:
            PARSER_RESTARTS.inc()
            self._idle.put_nowait(self._spawn())

"""One producer process and N consumer processes over each transport, lossless.

Every transport moves the same messages: a payload of ``size`` bytes whose first 8 bytes are the
message's index (little-endian int64) and the next 8 its send time (CLOCK_MONOTONIC ns, shared by
all processes), or -1 as the index of the final message that ends a run. Every consumer checks
that the indices arrive complete and in order; a run that lost or reordered one is an error, not
a figure. How each transport keeps a message:

- zero-copy transports (the ring, iceoryx2, shared memory) are read in place and copied once,
  into the consumer's own buffer for large payloads, into a ``bytes`` for small ones;
- the others (multiprocessing.Queue, faster-fifo, Arrow IPC over a pipe) hand the consumer a
  private object already.

Lossless means: the ring under ``policy="block"`` with the consumer committing what it read (in
fan-out only reader 0 commits: the others may be lapped, and their loss is reported, not hidden);
bounded queues that block the producer; iceoryx2 with safe overflow off and a back-pressure
strategy that retries until delivered; the shared-memory ring waits for its slowest reader.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.shared_memory
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import MiB, shm_path

STOP = -1
LARGE = 64 * 1024  # from this size on, zero-copy consumers copy into a preallocated buffer
# Every transport buffers about this much (and at least 8 messages), as a user would size a
# ring for frames; limits.py measures the copy bandwidth through the same amount of memory.
BUFFER = 16 * MiB


def depth(size: int, most: int = 1 << 30) -> int:
    """Messages of `size` bytes a transport buffers: BUFFER's worth, at least 8, at most `most`."""
    return int(max(8, min(most, BUFFER // size)))


def now_ns() -> int:
    return time.monotonic_ns()


class Sender:
    def send(self, msg: np.ndarray) -> None:
        raise NotImplementedError

    def send_block(self, block: np.ndarray) -> None:
        """Each row of `block` as one message, in one call (transports with ``bulk = True``)."""
        raise NotImplementedError

    def connect(self) -> None:
        """Once every receiver exists (after the start barrier), before the first send."""

    def close(self) -> None:
        pass


class Receiver:
    """``poll(blocking)`` returns the (index, send_ns) of each message it received."""

    lost = 0

    def poll(self, blocking: bool) -> list[tuple[int, int]]:
        raise NotImplementedError

    def poll_array(self, blocking: bool) -> np.ndarray:
        """The (index, send_ns) of each message received, as an (n, 2) int64 array
        (transports with ``bulk = True``)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


_HEADER = struct.Struct("<qq")
_header: Callable[[Any], tuple[int, int]] = _HEADER.unpack_from


class Transport:
    """Set up in the parent (before the fork), used in the children. The class says what it
    is called in the tables, which waits it can do, and the module it needs."""

    label = ""
    busy_poll = True
    blocking = True
    requires: str | None = None
    bulk = False  # sends blocks of messages and receives them as arrays

    @classmethod
    def wait_label(cls, blocking: bool) -> str:
        return "blocking" if blocking else "busy-poll"

    def __init__(self, size: int, readers: int, ctx: Any) -> None:
        self.size = size
        self.readers = readers

    def sender(self) -> Sender:
        raise NotImplementedError

    def receiver(self, i: int) -> Receiver:
        raise NotImplementedError

    def after_start(self) -> None:
        """In the parent, once every child is started."""

    def cleanup(self) -> None:
        pass


# -- rust-daq ----------------------------------------------------------------------------------


class RingTransport(Transport):
    """The ring under policy "block", both sides waiting as `wait` says when they wait with a
    timeout ("blocking"; the producer waits for room, the reader for data); "busy-poll" is
    the consumer calling read(timeout=0) in a Python loop."""

    label = "rust-daq ring"
    wait = "adaptive"
    # Frames: commit every second frame. A frame slot freed at once is rewritten by the
    # producer while its lines are still in the consumer's L2 (RingCommitEachTransport).
    commit_every = 2
    hot_bytes: int | None = None  # (None: the ring's default)

    def __init__(self, size: int, readers: int, ctx: Any) -> None:
        super().__init__(size, readers, ctx)
        from rust_daq import RingBuffer

        self.path = shm_path("ipc")
        self.capacity = depth(size) * (size + 64)
        RingBuffer.create(self.path, capacity_bytes=self.capacity, policy="block", block_timeout=60).close()

    @classmethod
    def wait_label(cls, blocking: bool) -> str:
        return f"wait={cls.wait}" if blocking else "busy-poll (Python loop)"

    def sender(self) -> Sender:
        from rust_daq import RingBuffer

        ring = RingBuffer.open(self.path, writable=True, wait=self.wait)
        if self.hot_bytes is not None:
            ring.hot_bytes = self.hot_bytes

        class S(Sender):
            send = ring.write  # type: ignore[assignment]
            send_block = ring.write_many  # type: ignore[assignment]

            def close(self) -> None:
                ring.close()

        return S()

    def receiver(self, i: int) -> Receiver:
        from rust_daq import RingBuffer

        ring = RingBuffer.open(self.path)
        reader = ring.reader("oldest", wait=self.wait)
        commit = i == 0
        commit_every = self.commit_every
        large = self.size >= LARGE
        dest = np.empty(self.size, np.uint8)
        rows = np.empty((4096, self.size), np.uint8) if not large else dest[None, :]

        class R(Receiver):
            def poll(self, blocking: bool) -> list[tuple[int, int]]:
                if large:
                    return self.poll_frames(blocking)
                recs = reader.read(max_records=4096, timeout=1.0 if blocking else 0.0)
                out = [_header(rec.data) for rec in recs]
                if recs and commit:
                    reader.commit()
                self.lost = reader.lost
                return out

            def poll_array(self, blocking: bool) -> np.ndarray:
                n = reader.read_into(rows, timeout=1.0 if blocking else 0.0)
                if n and commit:
                    reader.commit()
                self.lost = reader.lost
                return np.ascontiguousarray(rows[:n, :16]).view(np.int64)

            def poll_frames(self, blocking: bool) -> list[tuple[int, int]]:
                """Large frames one at a time, read in place and copied out, committed every
                `commit_every` frames and before a wait: the space is freed for the producer
                while the next frames are copied."""
                out = []
                timeout = 1.0 if blocking else 0.0
                for k in range(1, 65):
                    recs = reader.read(max_records=1, timeout=timeout, copy=False)
                    if not recs:
                        break
                    timeout = 0.0
                    np.copyto(dest, np.frombuffer(recs[0].data, np.uint8))
                    if recs[0].valid():  # False only for a lapped non-committing reader
                        out.append(_header(dest))
                    if commit and k % commit_every == 0:
                        reader.commit()
                if commit:
                    reader.commit()
                self.lost = reader.lost
                return out

        return R()

    def cleanup(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


class RingBusyTransport(RingTransport):
    label = "rust-daq ring"
    wait = "busy"
    busy_poll = False


class RingParkTransport(RingTransport):
    label = "rust-daq ring"
    wait = "park"
    busy_poll = False


class RingCommitEachTransport(RingTransport):
    label = "rust-daq ring, commit each frame"
    commit_every = 1


class RingWholeTransport(RingTransport):
    """The ring with ``hot_bytes = 0``: each lap through the whole ring, as before hot reuse
    (iceoryx2 and the shared_memory peer hand out a just-freed slot again, whose lines are
    still in cache; the default ring goes back to its start once its consumer has caught up)."""

    label = "rust-daq ring, hot_bytes=0 (each lap the whole ring)"
    hot_bytes = 0


class RingBulkTransport(RingTransport):
    """Blocks of 64 messages per write_many, arrays of up to 4,096 per read_into."""

    label = "rust-daq ring, bulk: write_many + read_into"
    bulk = True
    busy_poll = False


# -- multiprocessing.Queue and faster-fifo ------------------------------------------------------


class QueueSender(Sender):
    """A bytes copy of each message put on every reader's queue (a queue hands each message
    to one consumer), waiting up to 60 s for room."""

    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues

    def send(self, msg: np.ndarray) -> None:
        b = msg.tobytes()
        for q in self.queues:
            q.put(b, True, 60)


class MpQueueTransport(Transport):
    """One bounded queue per reader."""

    label = "multiprocessing.Queue"
    busy_poll = False

    def __init__(self, size: int, readers: int, ctx: Any) -> None:
        super().__init__(size, readers, ctx)
        self.queues = [ctx.Queue(maxsize=depth(size, 10_000)) for _ in range(readers)]

    def sender(self) -> Sender:
        class S(QueueSender):
            def close(self) -> None:
                for q in self.queues:  # the feeder thread flushes what it holds
                    q.close()
                    q.join_thread()

        return S(self.queues)

    def receiver(self, i: int) -> Receiver:
        q = self.queues[i]

        class R(Receiver):
            def poll(self, blocking: bool) -> list[tuple[int, int]]:
                return [_header(q.get())]

        return R()


class FasterFifoTransport(Transport):
    label = "faster-fifo"
    requires = "faster_fifo"

    def __init__(self, size: int, readers: int, ctx: Any) -> None:
        super().__init__(size, readers, ctx)
        import faster_fifo

        nbytes = depth(size, 10_000) * (size + 64)
        self.queues = [faster_fifo.Queue(max_size_bytes=nbytes) for _ in range(readers)]

    def sender(self) -> Sender:
        return QueueSender(self.queues)

    def receiver(self, i: int) -> Receiver:
        from queue import Empty

        q = self.queues[i]

        class R(Receiver):
            def poll(self, blocking: bool) -> list[tuple[int, int]]:
                try:
                    msgs = q.get_many(block=blocking, timeout=1.0, max_messages_to_get=4096)
                except Empty:
                    return []
                return [_header(m) for m in msgs]

        return R()


# -- iceoryx2 -----------------------------------------------------------------------------------


class Iceoryx2Transport(Transport):
    """Publish-subscribe with a u8 slice payload; blocking waits need a separate event service
    (a Listener), so only busy-polling is measured."""

    label = "iceoryx2"
    blocking = False
    requires = "iceoryx2"

    def __init__(self, size: int, readers: int, ctx: Any) -> None:
        super().__init__(size, readers, ctx)
        self.service_name = f"rdaq-bench-{os.getpid()}-{id(self)}-{size}-{readers}"
        self.buffer = depth(size, 1024)

    def cleanup(self) -> None:
        """The service's files in /dev/shm: its processes exit without dropping their nodes
        (a Python object alive at exit is not finalised), so iceoryx2 would leave them."""
        import iceoryx2 as iox2

        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        node.force_remove_service(
            iox2.ServiceName.new(self.service_name), iox2.MessagingPattern.PublishSubscribe
        )

    def _service(self) -> Any:
        import iceoryx2 as iox2

        iox2.set_log_level(iox2.LogLevel.Error)
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        service = (
            node.service_builder(iox2.ServiceName.new(self.service_name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .enable_safe_overflow(False)
            .subscriber_max_buffer_size(self.buffer)
            .max_subscribers(self.readers)
            .max_publishers(1)
            .open_or_create()
        )
        return node, service

    def sender(self) -> Sender:
        import iceoryx2 as iox2

        node, service = self._service()
        pub = (
            service.publisher_builder()
            .initial_max_slice_len(self.size)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        size = self.size

        readers = self.readers

        class S(Sender):
            keep = node  # the node must outlive its ports

            def connect(self) -> None:
                # A publisher connects to subscribers when it updates its connections; what
                # it sends before that reaches nobody.
                while service.dynamic_config.number_of_subscribers < readers:
                    time.sleep(0.001)
                time.sleep(0.05)  # a subscriber is counted before its connection is ready
                pub.update_connections()

            def send(self, msg: np.ndarray) -> None:
                sample = pub.loan_slice_uninit(size)
                ctypes.memmove(sample.payload_ptr, msg.ctypes.data, size)
                sample.assume_init().send()

            def close(self) -> None:
                pub.delete()

        return S()

    def receiver(self, i: int) -> Receiver:
        node, service = self._service()
        sub = service.subscriber_builder().buffer_size(self.buffer).create()
        size = self.size
        large = size >= LARGE
        dest = np.empty(size, np.uint8)
        dptr = dest.ctypes.data

        class R(Receiver):
            keep = node  # the node must outlive its ports

            def poll(self, blocking: bool) -> list[tuple[int, int]]:
                out = []
                while len(out) < 4096:
                    sample = sub.receive()
                    if sample is None:
                        break
                    if large:
                        ctypes.memmove(dptr, sample.payload_ptr, size)
                        out.append(_header(dest))
                    else:
                        out.append(_header(ctypes.string_at(sample.payload_ptr, size)))
                    sample.delete()
                return out

            def close(self) -> None:
                sub.delete()

        return R()


# -- multiprocessing.shared_memory with a hand-rolled index --------------------------------------


class SharedMemoryTransport(Transport):
    """The ring a user would write with ``multiprocessing.shared_memory``: fixed slots, a head
    counter and one tail counter per reader, stored through numpy. Correct on x86 only (plain
    stores in program order under TSO); portable code would need atomics Python lacks. Waiting
    is spinning (with ``sleep(0)``): there is no blocking wait to measure."""

    label = "shared_memory + index"
    blocking = False

    def __init__(self, size: int, readers: int, ctx: Any) -> None:
        super().__init__(size, readers, ctx)
        self.slots = depth(size, 4096)
        self.shm = mp.shared_memory.SharedMemory(create=True, size=64 * (1 + readers) + self.slots * size)
        np.frombuffer(self.shm.buf, np.int64, 8 * (1 + readers))[:] = 0

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        # The children inherit the parent's mapping (fork): attaching again by name would
        # register the segment with the resource tracker once more.
        buf = self.shm.buf
        counters = np.frombuffer(buf, np.int64, 8 * (1 + self.readers))
        data = np.frombuffer(buf, np.uint8, self.slots * self.size, offset=64 * (1 + self.readers))
        return counters, data.reshape(self.slots, self.size)

    def sender(self) -> Sender:
        counters, data = self._arrays()
        tails = counters[8::8]
        slots = self.slots

        class S(Sender):
            head = 0

            def send(self, msg: np.ndarray) -> None:
                h = self.head
                while h - tails.min() >= slots:
                    time.sleep(0)
                data[h % slots] = msg
                self.head = counters[0] = h + 1

        return S()

    def receiver(self, i: int) -> Receiver:
        counters, data = self._arrays()
        large = self.size >= LARGE
        dest = np.empty(self.size, np.uint8)
        slots = self.slots
        off = 8 * (i + 1)

        class R(Receiver):
            tail = 0

            def poll(self, blocking: bool) -> list[tuple[int, int]]:
                t, h = self.tail, int(counters[0])
                out = []
                for k in range(t, min(h, t + 4096)):
                    if large:
                        np.copyto(dest, data[k % slots])
                        out.append(_header(dest))
                    else:
                        out.append(_header(data[k % slots].tobytes()))
                self.tail = counters[off] = t + len(out)
                return out

        return R()

    def cleanup(self) -> None:
        self.shm.unlink()
        try:
            self.shm.close()
        except BufferError:  # a numpy view of it is still alive in this process; unlinked anyway
            pass


# -- Arrow IPC stream over an OS pipe ------------------------------------------------------------


class ArrowPipeTransport(Transport):
    """One pipe per reader; each message is a one-row record batch with a fixed-size binary
    column, written with ``pyarrow.ipc.new_stream`` and read with ``open_stream``. Reading a
    pipe blocks: there is no busy-poll variant."""

    label = "Arrow IPC over a pipe"
    busy_poll = False

    def __init__(self, size: int, readers: int, ctx: Any) -> None:
        super().__init__(size, readers, ctx)
        self.pipes = [os.pipe() for _ in range(readers)]

    def sender(self) -> Sender:
        import pyarrow as pa

        for r, _ in self.pipes:
            os.close(r)
        typ = pa.binary(self.size)
        schema = pa.schema([("payload", typ)])
        sinks = [pa.output_stream(os.fdopen(w, "wb", buffering=0)) for _, w in self.pipes]
        writers = [pa.ipc.new_stream(s, schema) for s in sinks]

        class S(Sender):
            def send(self, msg: np.ndarray) -> None:
                arr = pa.FixedSizeBinaryArray.from_buffers(typ, 1, [None, pa.py_buffer(msg)])
                batch = pa.record_batch([arr], schema=schema)
                for w in writers:
                    w.write_batch(batch)

            def close(self) -> None:
                for w, s in zip(writers, sinks, strict=True):
                    # The end-of-stream marker: a reader that already took the STOP message
                    # may have exited and closed its end, which is no failure.
                    try:
                        w.close()
                    except BrokenPipeError:
                        pass
                    try:
                        s.close()
                    except BrokenPipeError:
                        pass

        return S()

    def receiver(self, i: int) -> Receiver:
        import pyarrow as pa

        for k, (r, w) in enumerate(self.pipes):
            os.close(w)
            if k != i:
                os.close(r)
        # Buffered: a read of a large message body must wait for all of it, not return the
        # first 64 KiB the pipe holds.
        source = pa.input_stream(os.fdopen(self.pipes[i][0], "rb", buffering=MiB))

        class R(Receiver):
            reader: Any = None

            def poll(self, blocking: bool) -> list[tuple[int, int]]:
                if self.reader is None:  # the schema comes with the first batch
                    self.reader = pa.ipc.open_stream(source)
                batch = self.reader.read_next_batch()
                return [_header(batch.column(0).buffers()[1])]

        return R()

    def after_start(self) -> None:
        for r, w in self.pipes:
            for fd in (r, w):
                try:
                    os.close(fd)
                except OSError:
                    pass


TRANSPORTS: dict[str, type[Transport]] = {
    "ring": RingTransport,
    "ring_bulk": RingBulkTransport,
    "ring_busy": RingBusyTransport,
    "ring_park": RingParkTransport,
    "ring_commit_each": RingCommitEachTransport,
    "ring_whole": RingWholeTransport,
    "faster_fifo": FasterFifoTransport,
    "iceoryx2": Iceoryx2Transport,
    "shared_memory": SharedMemoryTransport,
    "arrow_pipe": ArrowPipeTransport,
    "mp_queue": MpQueueTransport,
}
# Every case compares these; the ring's variants (bulk, wait modes) join the cases they answer.
ALL = [n for n in TRANSPORTS if not n.startswith("ring_")]
RING_WAITS = ["ring_busy", "ring_park"]


def make(name: str, size: int, readers: int, ctx: Any) -> Transport:
    return TRANSPORTS[name](size, readers, ctx)


def available(name: str) -> str | None:
    """None if the peer can run here, else why not."""
    module = TRANSPORTS[name].requires
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as e:
        return f"{module} not installed ({e}); pip install '.[bench]'"
    return None

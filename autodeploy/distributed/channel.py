"""One-to-many message channels from rank 0 to the worker ranks (the per-step control messages).

``send(obj)`` on rank 0, ``recv()`` on every other rank, same order everywhere. Two transports:

- ``ShmChannel`` (workers spawned on this host): one message slot in a shared-memory file and a pair of
  semaphores per reader (``ready``: a message is there; ``free``: the reader copied it out). A reader spins on
  ``ready`` for a short while before it sleeps, so a step reaches the workers in microseconds. Semaphores give
  the memory ordering on every architecture.
- ``GlooChannel`` (torchrun, possibly across hosts): a fixed-size frame broadcast over the gloo control group,
  with a second broadcast only for messages that do not fit the frame.

Messages are pickled; larger than the slot, they go in several chunks.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import tempfile
import time
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..errors import DistributedError

_HEADER = struct.Struct("<qq")  # total message bytes, bytes in this chunk


class Channel(Protocol):
    def send(self, obj: Any) -> None: ...

    def recv(self) -> Any: ...

    def close(self) -> None: ...


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class ShmChannel:
    """Writer side (rank 0). ``reader(i)`` is the picklable end handed to worker ``i`` when it is spawned."""

    def __init__(self, num_readers: int, mp_context: Any, capacity: int = 1 << 22):
        fd, self.path = tempfile.mkstemp(prefix="autodeploy-tp-", dir=_shm_dir())
        os.ftruncate(fd, capacity)
        self._map = mmap.mmap(fd, capacity)
        os.close(fd)
        self.capacity = capacity
        self.ready = [mp_context.Semaphore(0) for _ in range(num_readers)]
        self.free = [mp_context.Semaphore(1) for _ in range(num_readers)]
        self.alive: Any = lambda: True  # set by the owner: False once a reader is known dead

    def reader(self, index: int, spin_s: float) -> ShmReader:
        return ShmReader(self.path, self.capacity, self.ready[index], self.free[index], spin_s)

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        room = self.capacity - _HEADER.size
        view = memoryview(data)
        offset = 0
        while True:
            chunk = view[offset : offset + room]
            for free in self.free:
                while not free.acquire(timeout=1.0):
                    if not self.alive():
                        raise DistributedError("a worker rank exited while rank 0 was sending it a step")
            _HEADER.pack_into(self._map, 0, len(data), len(chunk))
            self._map[_HEADER.size : _HEADER.size + len(chunk)] = chunk
            for ready in self.ready:
                ready.release()
            offset += len(chunk)
            if offset >= len(data):
                return

    def recv(self) -> Any:
        raise DistributedError("rank 0 only sends on this channel")

    def close(self) -> None:
        try:
            self._map.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ShmReader:
    """Reader side (a spawned worker). Opens the shared file lazily, in the worker process."""

    def __init__(self, path: str, capacity: int, ready: Any, free: Any, spin_s: float):
        self.path, self.capacity, self.ready, self.free, self.spin_s = path, capacity, ready, free, spin_s
        self._map: mmap.mmap | None = None
        self.parent_alive: Any = lambda: True

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_map", "parent_alive")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._map = None
        self.parent_alive = lambda: True

    def _wait(self) -> None:
        deadline = time.perf_counter() + self.spin_s
        while time.perf_counter() < deadline:
            if self.ready.acquire(block=False):
                return
        while not self.ready.acquire(timeout=0.5):
            if not self.parent_alive():
                raise DistributedError("rank 0 exited; this worker has nothing left to do")

    def recv(self) -> Any:
        if self._map is None:
            with open(self.path, "r+b") as f:
                self._map = mmap.mmap(f.fileno(), self.capacity)
        parts: list[bytes] = []
        received, total = 0, None
        while total is None or received < total:
            self._wait()
            total, size = _HEADER.unpack_from(self._map, 0)
            parts.append(self._map[_HEADER.size : _HEADER.size + size])
            self.free.release()
            received += size
        return pickle.loads(b"".join(parts) if len(parts) > 1 else parts[0])

    def send(self, obj: Any) -> None:
        raise DistributedError("workers only receive on this channel")

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class GlooChannel:
    """Rank 0 broadcasts, every other rank receives, over a gloo group (works across hosts)."""

    FRAME = 4096

    def __init__(self, group: Any, rank: int):
        self.group, self.rank = group, rank
        self.frame = torch.zeros(self.FRAME, dtype=torch.uint8)

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        head = self.FRAME - 8
        buf = self.frame.numpy()
        buf[:8] = memoryview(struct.pack("<q", len(data)))
        first = data[:head]
        buf[8 : 8 + len(first)] = memoryview(first)
        dist.broadcast(self.frame, src=0, group=self.group)
        if len(data) > head:
            rest = torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)

    def recv(self) -> Any:
        dist.broadcast(self.frame, src=0, group=self.group)
        buf = self.frame.numpy()
        (size,) = struct.unpack("<q", buf[:8].tobytes())
        head = self.FRAME - 8
        data = buf[8 : 8 + min(size, head)].tobytes()
        if size > head:
            rest = torch.empty(size - head, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def close(self) -> None:
        pass

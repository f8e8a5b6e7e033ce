"""The on-disk KV tier: content-addressed page files in a directory many ranks and processes share.

Owns the file format, the byte budget and its LRU eviction, the background writer and reader
threads, and the tier's counters. What crosses it: a page's chained prefix hash (the block
manager's) and its payload bytes (one full 64-token page of latents for every layer, laid out as
the model runner's cache is). No torch here.

A file is `<fingerprint>-<page hash>.kvp`: a fixed header (magic, model fingerprint digest, page
hash, token count, payload length, payload checksum) and the payload. Every read checks all of
it; a file that fails is counted, deleted and reported as a miss, so the caller recomputes.
Writes go to a temporary file renamed into place, so a reader never sees half a page and
concurrent writers of the same page leave one whole copy. LRU across processes uses file mtimes:
a read touches the file, eviction removes the oldest.
"""
from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

MAGIC = b"RIKVPG1\0"
_HEADER = struct.Struct("<8s16s16sIQ16s")  # magic, fingerprint, page hash, tokens, payload bytes, checksum
SUFFIX = ".kvp"


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class DiskCacheError(ValueError):
    """The directory cannot be used (a user error: it names the directory)."""


class DiskCache:
    def __init__(self, directory: str, max_bytes: int, fingerprint: str, page_tokens: int = 64,
                 max_pending_writes: int = 64):
        """`fingerprint`: everything that decides a page's bytes (model config, dtype, layers, cache layout)."""
        assert max_bytes > 0 and page_tokens > 0
        self.dir, self.max_bytes, self.page_tokens = os.path.abspath(directory), max_bytes, page_tokens
        self.fp = _digest(fingerprint.encode())
        self._prefix = self.fp.hex()[:16] + "-"
        check_writable(self.dir)
        self.counters = dict(hit_tokens=0, miss_tokens=0, bytes_read=0, bytes_written=0, pages_read=0,
                             pages_written=0, read_seconds=0.0, evictions=0, corrupt_pages=0, writes_dropped=0,
                             write_errors=0)
        self._lock = threading.Lock()  # guards counters and the size estimate
        self._used = self._scan_used()
        self._lru: list[tuple[float, int, str]] = []  # newest first: eviction pops the oldest off the end
        self._lru_at = 0.0
        self._writes: queue.Queue = queue.Queue(max_pending_writes)
        self._writer = threading.Thread(target=self._write_loop, name="disk-kv-writer", daemon=True)
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="disk-kv-reader")

    # ---- paths and format
    def path(self, page_hash: bytes) -> str:
        return os.path.join(self.dir, self._prefix + page_hash.hex() + SUFFIX)

    def encode(self, page_hash: bytes, payload: bytes) -> bytes:
        return _HEADER.pack(MAGIC, self.fp, page_hash, self.page_tokens, len(payload), _digest(payload)) + payload

    def _decode(self, page_hash: bytes, data: bytes) -> bytes | None:
        if len(data) < _HEADER.size:
            return None
        magic, fp, h, tokens, n, checksum = _HEADER.unpack_from(data)
        payload = data[_HEADER.size:]
        if (magic, fp, h, tokens, n) != (MAGIC, self.fp, page_hash, self.page_tokens, len(payload)):
            return None
        return payload if _digest(payload) == checksum else None

    # ---- reads
    def contains(self, page_hash: bytes) -> bool:
        return os.path.exists(self.path(page_hash))

    def read(self, page_hash: bytes) -> bytes | None:
        """The page's payload, or None when absent or bad (a bad file is counted and removed)."""
        p, t0 = self.path(page_hash), time.perf_counter()
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            return None
        payload = self._decode(page_hash, data)
        if payload is None:
            with self._lock:
                self.counters["corrupt_pages"] += 1
            _unlink(p)
            return None
        try:
            os.utime(p)  # most recently used, for every process's eviction
        except OSError:
            pass
        with self._lock:
            c = self.counters
            c["bytes_read"] += len(data)
            c["pages_read"] += 1
            c["read_seconds"] += time.perf_counter() - t0
        return payload

    def read_prefix(self, hashes: list[bytes]) -> list[bytes]:
        """Payloads of the longest run of `hashes` that reads back whole; counts hits and misses in tokens."""
        out = []
        for h in hashes:
            payload = self.read(h)
            if payload is None:
                break
            out.append(payload)
        with self._lock:
            self.counters["hit_tokens"] += len(out) * self.page_tokens
            self.counters["miss_tokens"] += (len(hashes) - len(out)) * self.page_tokens
        return out

    def load_async(self, hashes: list[bytes]) -> Future:
        """`read_prefix` on the reader thread: the caller keeps stepping and polls the future."""
        return self._reader.submit(self.read_prefix, list(hashes))

    # ---- writes
    def write_async(self, page_hash: bytes, payload: bytes) -> bool:
        """Queues a page for writing; False (and counted) when the writer is behind: the page is dropped."""
        try:
            self._writes.put_nowait((page_hash, payload))
            return True
        except queue.Full:
            self.count_dropped()
            return False

    def count_dropped(self) -> None:
        with self._lock:
            self.counters["writes_dropped"] += 1

    def can_accept(self) -> bool:
        """Whether a write queued now would be kept (lets callers skip copying a page that would be dropped)."""
        return not self._writes.full()

    def flush(self, timeout: float = 30.0) -> None:
        """Waits until queued writes are on disk (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def write(self, page_hash: bytes, payload: bytes) -> bool:
        """Writes one page now (the writer thread's job); False when skipped or the disk refused it."""
        p = self.path(page_hash)
        if os.path.exists(p):  # content-addressed: the same hash is the same page
            return False
        data = self.encode(page_hash, payload)
        self._make_room(len(data))
        tmp = os.path.join(self.dir, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except OSError:  # a full disk (ENOSPC, EDQUOT) or a vanished mount: skip the page, keep serving
            _unlink(tmp)
            with self._lock:
                self.counters["write_errors"] += 1
            return False
        with self._lock:
            self._used += len(data)
            self.counters["bytes_written"] += len(data)
            self.counters["pages_written"] += 1
        return True

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                self.write(*item)
            except Exception:  # noqa: BLE001 - the tier is an optimisation: a failed write is a skipped write
                with self._lock:
                    self.counters["write_errors"] += 1
            finally:
                self._writes.task_done()

    # ---- budget
    def _files(self) -> list[tuple[float, int, str]]:
        out = []
        with os.scandir(self.dir) as it:
            for e in it:
                if e.name.endswith(SUFFIX):
                    try:
                        st = e.stat()
                    except OSError:
                        continue  # evicted by another process meanwhile
                    out.append((st.st_mtime, st.st_size, e.path))
        return out

    def _scan_used(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _make_room(self, incoming: int) -> None:
        """Evicts least recently used pages until `incoming` bytes fit the budget.

        Other processes write to the same directory, so the local estimate only decides when to look;
        the directory itself decides what goes. One scan, oldest first, serves the evictions of the
        next few seconds, so a full tier does not list the directory for every page written."""
        if self._used + incoming <= self.max_bytes:
            return
        if not self._lru or time.monotonic() - self._lru_at > 5.0:
            self._lru, self._lru_at = sorted(self._files(), reverse=True), time.monotonic()
            self._used = sum(size for _, size, _ in self._lru)
        evicted = 0
        while self._lru and self._used + incoming > self.max_bytes:
            _, size, path = self._lru.pop()
            evicted += _unlink(path)
            self._used -= size
        with self._lock:
            self.counters["evictions"] += evicted

    def stats(self) -> dict:
        with self._lock:
            c = dict(self.counters)
        c["used_bytes"], c["max_bytes"] = self._used, self.max_bytes
        c["pending_writes"] = self._writes.qsize()
        return c

    def close(self) -> None:
        self.flush()
        self._writes.put(None)
        self._reader.shutdown(wait=False)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise DiskCacheError(f"disk_cache_dir {directory!r} is not a writable directory ({e.strerror or e})") from e

"""TFRecord framing, its CRC, and random access to the records of one file.

TFRecord framing of one record (little-endian)::

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
    masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8   (mod 2^32)
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import threading

import crc32c

from primus_jax import paths
from primus_jax.data.schema import DataError

_CRC_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of length
_FOOTER = struct.Struct("<I")  # masked crc of data


def _masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """Wraps one serialized record in TFRecord framing (length, its CRC, data, data CRC)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + _FOOTER.pack(_masked_crc(data))


class TFRecordIndex:
    """Random access to the records of one TFRecord file, local or gs:// (`primus_jax.paths`).

    The constructor scans the framing once, reading the file in sequential chunks of
    `scan_chunk_bytes` and verifying each 12-byte header's length CRC, and keeps every record's
    data offset and length; `read(i)` then fetches record i with one positioned read and
    verifies its data CRC. The file is opened through epath; a local file is then memory-mapped
    and a read is a view of the map, a gs:// file is read with seek and read under a lock
    (threads may share an index either way). On GCS a read is one ranged request (plus gcsfs's read-ahead), so the scan costs
    size / scan_chunk_bytes requests, not one per record. A truncated tail or a bad length CRC
    ends the scan: the records before it stay readable and reading from there on raises DataError.
    """

    def __init__(self, path, scan_chunk_bytes: int = 4 << 20):
        resolved = paths.resolve(path)
        self.path = str(resolved)
        self._file = resolved.open("rb")
        self._lock = threading.Lock()
        try:
            fd = self._file.fileno()
        except (OSError, ValueError):  # a gs:// file has no descriptor (io.UnsupportedOperation)
            fd = None
        # A local shard is memory-mapped: a read is then a view of the page cache, with no
        # system call, allocation or copy (shards are never modified once written).
        self._map = (mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                     if fd is not None and os.fstat(fd).st_size else None)
        offsets, lengths = [], []
        self._scan_problem = None
        size = self._file.seek(0, io.SEEK_END)
        position, chunk_start, chunk = 0, 0, b""
        while position < size:
            if position + _HEADER.size > chunk_start + len(chunk):
                chunk_start, chunk = position, self._read_at(position, max(scan_chunk_bytes, _HEADER.size))
            header = chunk[position - chunk_start:position - chunk_start + _HEADER.size]
            if len(header) < _HEADER.size:
                self._scan_problem = (f"file is truncated inside the record header at byte "
                                      f"{position} (file has {size} bytes)")
                break
            length, length_crc = _HEADER.unpack(header)
            if _masked_crc(header[:8]) != length_crc:
                self._scan_problem = f"length CRC mismatch in the record header at byte {position}"
                break
            end = position + _HEADER.size + length + _FOOTER.size
            if end > size:
                self._scan_problem = (f"file is truncated: the record needs bytes up to {end}, "
                                      f"the file has {size}")
                break
            offsets.append(position + _HEADER.size)
            lengths.append(length)
            position = end
        self._offsets = offsets
        self._lengths = lengths

    def _read_at(self, position: int, size: int):
        """`size` bytes from `position` (fewer at the end of the file): a view of the memory map
        for a local file, a seek and a read under the lock for a gs:// file."""
        if self._map is not None:
            return memoryview(self._map)[position:position + size]
        with self._lock:
            self._file.seek(position)
            return self._file.read(size)

    def __len__(self) -> int:
        """Number of intact records found by the scan."""
        return len(self._offsets)

    def read(self, index: int) -> bytes:
        """The data of record `index`; DataError if it is missing, truncated or fails its CRC."""
        return bytes(self.read_view(index))

    def read_view(self, index: int) -> memoryview:
        """`read` without copying the data out of the positioned read's buffer."""
        if index >= len(self._offsets):
            problem = self._scan_problem or (
                f"the file holds only {len(self._offsets)} records")
            if self._scan_problem and index > len(self._offsets):
                problem += f" (at record {len(self._offsets)})"
            raise DataError(f"{self.path}: record {index}: {problem}")
        length = self._lengths[index]
        blob = self._read_at(self._offsets[index], length + _FOOTER.size)
        data = memoryview(blob)[:length]
        if _masked_crc(data) != _FOOTER.unpack_from(blob, length)[0]:
            raise DataError(f"{self.path}: record {index}: data CRC mismatch (the record is "
                            f"corrupt)")
        return data

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # record views still in use keep the mapping until they go
                pass
        self._file.close()

    def __enter__(self) -> "TFRecordIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""TFRecord framing, its CRC, and random access to the records of one file.

TFRecord framing of one record (little-endian)::

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
    masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8   (mod 2^32)
"""

from __future__ import annotations

import os
import struct

import crc32c

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
    """Random access to the records of one TFRecord file.

    The constructor scans the framing once (12-byte headers only, verifying each length CRC)
    and keeps every record's data offset and length; `read(i)` then fetches record i with
    one positioned read and verifies its data CRC. A truncated tail or a bad length CRC ends
    the scan: the records before it stay readable and reading from there on raises DataError.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        offsets, lengths = [], []
        self._scan_problem = None
        size = os.fstat(self._fd).st_size
        position = 0
        while position < size:
            header = os.pread(self._fd, _HEADER.size, position)
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
        blob = os.pread(self._fd, length + _FOOTER.size, self._offsets[index])
        data = memoryview(blob)[:length]
        if _masked_crc(data) != _FOOTER.unpack_from(blob, length)[0]:
            raise DataError(f"{self.path}: record {index}: data CRC mismatch (the record is "
                            f"corrupt)")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TFRecordIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

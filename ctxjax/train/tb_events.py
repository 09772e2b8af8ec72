"""TensorBoard scalar event files, written directly (no TensorBoard or tensorboardX import).

An event file is a TFRecord file of `tensorflow.Event` protocol buffers: each record is
`uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)` (little
endian), and the first event carries `file_version = "brain.Event:2"`. A scalar is
`Event{wall_time: 1, step: 2, summary: 5 {value: 1 {tag: 1, simple_value: 2}}}`; the numbers
are the proto field numbers, encoded by hand below. Writing them here costs nothing to import,
where tensorboardX's SummaryWriter imports PyTorch when it is installed (~1 s per training
process). tests/test_train_eval.py reads the files back with tensorboardX's own protos.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import time

_CRC32C_TABLE = []
for _n in range(256):
  _c = _n
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # Castagnoli polynomial, reflected
  _CRC32C_TABLE.append(_c)

# TensorBoard's tag alphabet (tensorboardX and TensorFlow replace anything else with "_").
_INVALID_TAG = re.compile(r"[^-/\w.]")


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 as protobuf encodes it (two's complement)
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str = "", summary: bytes = b"") -> bytes:
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
  if file_version:
    out += _field_bytes(3, file_version.encode())
  if summary:
    out += _field_bytes(5, summary)
  return out


def clean_tag(tag: str) -> str:
  return _INVALID_TAG.sub("_", tag).lstrip("/")


class ScalarWriter:
  """Appends scalar events to DIR/events.out.tfevents.<time>.<host> (TensorBoard reads it)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    header = struct.pack("<Q", len(event))
    self._file.write(header + struct.pack("<I", _masked_crc(header)) + event
                     + struct.pack("<I", _masked_crc(event)))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    value_msg = _field_bytes(1, clean_tag(tag).encode()) + _varint(2 << 3 | 5) + struct.pack(
        "<f", float(value))
    self._write(_event(time.time(), int(step), summary=_field_bytes(1, value_msg)))

  def flush(self) -> None:
    if not self._file.closed:  # MetricsWriter.close mirrors (and flushes) after closing
      self._file.flush()

  def close(self) -> None:
    self._file.close()

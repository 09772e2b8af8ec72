"""ctxjax.train.tb_events writes the TensorBoard event files tensorboardX writes: the same
record framing and checksums (tensorboardX's masked crc32c), the same protos (parsed by
tensorboardX's event_pb2), the same tag cleaning."""
import glob
import struct

import pytest

from ctxjax.train import tb_events

pytest.importorskip("tensorboardX")


def _records(path):
  data, i, out = open(path, "rb").read(), 0, []
  while i < len(data):
    header = data[i:i + 8]
    n = struct.unpack("<Q", header)[0]
    out.append((header, data[i + 8:i + 12], data[i + 12:i + 12 + n], data[i + 12 + n:i + 16 + n]))
    i += 16 + n
  assert i == len(data)
  return out


def test_crc32c_matches_the_published_check_value_and_tensorboardx():
  from tensorboardX.record_writer import masked_crc32c
  assert tb_events.crc32c(b"123456789") == 0xE3069283  # CRC-32C's standard check value
  for data in (b"", b"a", bytes(range(256)) * 3):
    assert tb_events._masked_crc(data) == masked_crc32c(data)


def test_scalar_events_read_back_with_tensorboardx_protos(tmp_path):
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  from tensorboardX.summary import _clean_tag
  writer = tb_events.ScalarWriter(str(tmp_path / "tb"))
  scalars = [("loss", 3.25, 1), ("eval/ppl@128", 41.5, 2), ("/lr", 1e-3, 2**40)]
  for tag, value, step in scalars:
    writer.add_scalar(tag, value, step)
  writer.close()
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  records = _records(path)
  for header, header_crc, event, event_crc in records:
    assert struct.unpack("<I", header_crc)[0] == masked_crc32c(header)
    assert struct.unpack("<I", event_crc)[0] == masked_crc32c(event)
  events = [event_pb2.Event.FromString(r[2]) for r in records]
  assert events[0].file_version == "brain.Event:2"
  got = [(e.summary.value[0].tag, e.summary.value[0].simple_value, e.step) for e in events[1:]]
  assert got == [(_clean_tag(t), pytest.approx(v, rel=1e-7), s) for t, v, s in scalars]
  assert all(e.wall_time > 1e9 for e in events)

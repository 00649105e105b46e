"""The msgfile envelope's raw tail handed over in pieces: a Sink gets the
file's bytes as they are read, a Source gives them as they are written, and
neither changes the file's bytes or what a corrupt file is told."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs import msgfile

FMT = msgfile.Format(b"MEMFS-T0", 1, "test file", ValueError)
DOC = msgpack.packb({"what": "test"})


class Collect:
    """A Sink that keeps the chunks it is handed (copies: they are not ours)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.chunks = nbytes, []

    def write(self, chunk: bytearray) -> None:
        assert isinstance(chunk, bytearray)
        self.chunks.append(bytes(chunk))


class Pieces:
    """A Source that gives ``data`` in pieces of ``step`` bytes, and counts
    how often it was gone through."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.nbytes, self.rounds = data, step, len(data), 0

    def chunks(self):
        self.rounds += 1
        for at in range(0, len(self.data), self.step):
            yield self.data[at:at + self.step]


SIZES = st.sampled_from([0, 1, 8, msgfile.SINK_CHUNK - 8, msgfile.SINK_CHUNK,
                         msgfile.SINK_CHUNK + 8, 2 * msgfile.SINK_CHUNK + 24,
                         msgfile.READ_CHUNK + 3])


def tail_of(sizes: list[int]) -> list[bytes]:
    return [bytes((i * 7 + k) & 0xFF for k in range(n)) for i, n in enumerate(sizes)]


@settings(max_examples=30, deadline=None)
@given(st.lists(SIZES, min_size=1, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4),
       st.integers(1, 100_000))
def test_sinks_get_the_tail_in_chunks_and_sources_write_the_same_bytes(
        tmp_path_factory, sizes: list[int], as_sink: list[bool], step: int) -> None:
    parts = tail_of(sizes)
    plain = msgfile.dumps(FMT, [DOC], parts)
    sources = [Pieces(p, step) for p in parts]
    assert msgfile.dumps(FMT, [DOC], sources) == plain  # checksummed, then written
    assert all(s.rounds == 2 for s in sources)
    path = tmp_path_factory.mktemp("msg") / "f"
    msgfile.write(path, FMT, [DOC], [Pieces(p, step) for p in parts])
    assert path.read_bytes() == plain

    def alloc(doc: dict, n: int) -> list:
        assert doc == {"what": "test"} and n == sum(sizes)
        return [Collect(len(p)) if sink else bytearray(len(p))
                for p, sink in zip(parts, as_sink)]
    doc, bufs = msgfile.load_into(path, FMT, alloc)
    for p, b in zip(parts, bufs):
        if isinstance(b, Collect):
            assert b"".join(b.chunks) == p
            assert all(len(c) == msgfile.SINK_CHUNK for c in b.chunks[:-1])
            assert 0 < len(b.chunks[-1]) <= msgfile.SINK_CHUNK if p else not b.chunks
        else:
            assert b == p


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 * msgfile.SINK_CHUNK + 40 + msgfile.HEADER_SIZE + len(DOC) - 1),
       st.integers(0, 7))
def test_a_flipped_bit_read_through_a_sink_is_refused_with_the_file_named(
        tmp_path_factory, pos: int, bit: int) -> None:
    parts = tail_of([40, 2 * msgfile.SINK_CHUNK])
    data = bytearray(msgfile.dumps(FMT, [DOC], parts))
    data[pos] ^= 1 << bit
    path = tmp_path_factory.mktemp("msg") / "f"
    path.write_bytes(data)
    handed = []

    def alloc(doc: dict, n: int) -> list:
        handed.append(Collect(len(parts[1])))
        return [bytearray(40), handed[0]]
    with pytest.raises(ValueError) as e:
        msgfile.load_into(path, FMT, alloc)
    if pos >= msgfile.HEADER_SIZE + len(DOC):  # in the tail: the whole checksum says it
        assert str(e.value) == f"{path}: test file checksum mismatch: the file is corrupt"
        assert handed  # the sink was handed the bad bytes, and nothing was returned
    else:
        assert str(e.value).startswith(f"{path}: ")


def test_a_tail_the_sinks_do_not_add_up_to_is_refused_before_reading(tmp_path) -> None:
    path = tmp_path / "f"
    msgfile.write(path, FMT, [DOC], tail_of([64]))
    with pytest.raises(ValueError, match=rf"^{path}: test file: the document describes 56 "
                                         r"bytes of arrays, the file holds 64$"):
        msgfile.load_into(path, FMT, lambda d, n: [Collect(56)])

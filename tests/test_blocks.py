"""Pure units: block arithmetic, the codec and its verification, sizes and URL masking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkfs.blocklist import HOLE, SPARSE_MAGIC, BlockList
from chunkfs.blocks import (
    BlockCodec,
    BlockCorrupt,
    block_count,
    block_id,
    block_length,
    block_spans,
    object_key,
)
from chunkfs.errors import UsageError
from chunkfs.units import format_size, parse_size
from chunkfs.urls import mask_url, split_url, url_scheme


@given(size=st.integers(0, 10_000), bs=st.sampled_from([1, 7, 64, 4096]),
       offset=st.integers(0, 12_000), length=st.integers(0, 12_000))
def test_block_spans_cover_exactly_the_clipped_range(size: int, bs: int, offset: int, length: int) -> None:
    spans = list(block_spans(offset, length, size, bs))
    covered = [index * bs + pos for index, start, end in spans for pos in range(start, end)]
    assert covered == list(range(offset, min(offset + length, size)))
    for index, _start, end in spans:
        assert end <= block_length(index, size, bs)


def test_block_lengths_add_up() -> None:
    for size in (0, 1, 63, 64, 65, 640, 641):
        lengths = [block_length(i, size, 64) for i in range(block_count(size, 64))]
        assert sum(lengths) == size
        assert all(0 < n <= 64 for n in lengths)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_codec_round_trip_verifies(compression: str) -> None:
    codec = BlockCodec(compression)
    data = b"weights" * 1000
    bid = block_id(data)
    stored = codec.encode(data)
    if compression == "lz4":
        assert len(stored) < len(data)
    assert codec.decode(bid, stored, len(data)) == data


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_codec_rejects_flipped_truncated_and_foreign_bytes(compression: str) -> None:
    codec = BlockCodec(compression)
    data = bytes(range(256)) * 64
    bid = block_id(data)
    stored = bytearray(codec.encode(data))
    flipped = bytes(stored[:-1]) + bytes([stored[-1] ^ 1])
    for bad in (flipped, bytes(stored[: len(stored) // 2]), codec.encode(b"other" * 10)):
        with pytest.raises(BlockCorrupt):
            codec.decode(bid, bad, len(data))


def _streamed(codec: BlockCodec, bid: bytes, length: int, stored: bytes, step: int) -> bytes:
    decoder = codec.decoder(bid, length)
    view = memoryview(stored)
    out = b"".join(bytes(decoder.feed(view[i : i + step])) for i in range(0, len(stored), step))
    decoder.finish()
    return out


@pytest.mark.parametrize("compression", ["none", "lz4"])
@given(data=st.binary(min_size=1, max_size=5000), step=st.integers(1, 6000))
def test_streamed_decode_in_any_pieces_gives_the_block(compression: str, data: bytes, step: int) -> None:
    codec = BlockCodec(compression)
    assert _streamed(codec, block_id(data), len(data), codec.encode(data), step) == data


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_streamed_decode_rejects_what_decode_rejects(compression: str) -> None:
    codec = BlockCodec(compression)
    data = bytes(range(256)) * 64
    bid = block_id(data)
    stored = codec.encode(data)
    flipped = stored[:-1] + bytes([stored[-1] ^ 1])
    for bad in (flipped, stored[: len(stored) // 2], stored + b"more", codec.encode(b"other" * 10), b""):
        for step in (3, 4096):
            with pytest.raises(BlockCorrupt):
                _streamed(codec, bid, len(data), bad, step)


def test_object_keys_and_id_lists() -> None:
    ids = [block_id(bytes([i])) for i in range(3)]
    packed = BlockList.dense(ids).pack()
    assert packed == b"".join(ids)  # the form every volume before holes used
    assert BlockList.unpack(packed) == ids
    assert BlockList.unpack(None) == BlockList()
    assert object_key(ids[0]).startswith(f"blocks/{ids[0].hex()[:2]}/")
    with pytest.raises(ValueError):
        BlockList.unpack(b"x" * 33)


@given(slots=st.lists(st.one_of(st.just(HOLE), st.binary(min_size=32, max_size=32)), max_size=40))
def test_block_lists_with_holes_round_trip_and_never_look_dense(slots: list[bytes]) -> None:
    blocks = BlockList.dense(slots)
    packed = blocks.pack()
    assert BlockList.unpack(packed) == blocks
    assert list(BlockList.unpack(packed)) == slots
    assert (len(packed) % 32 == 0) == (HOLE not in slots)


def test_a_huge_sparse_list_costs_its_stored_blocks_only() -> None:
    blocks = BlockList()
    blocks.resize(1 << 40)  # a file of 2**40 blocks, all holes
    blocks[1 << 35] = b"\x01" * 32
    packed = blocks.pack()
    assert packed.startswith(SPARSE_MAGIC) and len(packed) == 12 + 40
    again = BlockList.unpack(packed)
    assert len(again) == 1 << 40 and again[1 << 35] == b"\x01" * 32 and again[5] == HOLE
    assert again.stored() == [(1 << 35, b"\x01" * 32)]
    again.resize(10)
    assert again.stored() == [] and len(again) == 10
    with pytest.raises(ValueError):
        BlockList.unpack(SPARSE_MAGIC + (1).to_bytes(8, "big") + (5).to_bytes(8, "big") + b"\x01" * 32)


def test_parse_and_format_sizes() -> None:
    assert parse_size("4M") == 4 << 20
    assert parse_size("64KiB") == 64 << 10
    assert parse_size("1g") == 1 << 30
    assert parse_size("4096") == 4096
    assert format_size(4 << 20) == "4.0 MiB"
    with pytest.raises(UsageError):
        parse_size("lots")


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:secret@host:6379/1", "redis://:****@host:6379/1"),
    ("rediss://user:pa55@host/2", "rediss://user:****@host/2"),
    ("redis://host:6379", "redis://host:6379"),
    ("sqlite:///var/lib/x.db", "sqlite:///var/lib/x.db"),
    ("s3://b/p?endpoint=http://h&secret_key=abc", "s3://b/p?endpoint=http://h&secret_key=****"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_url_schemes_and_malformed_hosts() -> None:
    assert url_scheme("sqlite://models:v2.db") == "sqlite"  # a relative path with a ':' is no port
    assert url_scheme("S3://bucket/p") == "s3" and url_scheme("redis://[::1]:6379/0") == "redis"
    assert split_url("redis://[::1]:6379/0").port == 6379
    for bad, why in (("redis://:pw@[::1", "Invalid IPv6"), ("redis://h:port/0", "Port"),
                     ("redis://h:70000/0", "out of range")):
        with pytest.raises(UsageError, match=why) as err:
            split_url(bad)
        assert "pw" not in str(err.value)
    with pytest.raises(UsageError, match="no scheme"):
        url_scheme("1x://a")

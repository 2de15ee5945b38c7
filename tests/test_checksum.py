"""CRC32C: known vectors, the native and pure twins against google-crc32c."""

from __future__ import annotations

import array
import mmap

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import replicator.checksum as public
from replicator._pure import checksum as pure
from replicator._select import extensions_disabled

native = pytest.importorskip("replicator._native.checksum") if extensions_disabled() else None
if native is None:
    from replicator._native import checksum as native  # a missing build fails here, loudly

IMPLEMENTATIONS = [
    pytest.param(native.crc32c, id="native"),
    pytest.param(native.crc32c_software, id="native-software"),
    pytest.param(pure.crc32c, id="pure"),
]

# RFC 3720 (iSCSI), appendix B.4.
RFC3720_VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (
        bytes.fromhex(
            "01c00000000000000000000000000000"
            "14000000000004000000001400000018"
            "28000000000000000200000000000000"
        ),
        0xD9963A56,
    ),
    (b"123456789", 0xE3069283),
    (b"", 0),
]


def oracle(data: bytes, crc: int = 0) -> int:
    return google_crc32c.extend(crc, data)


@pytest.mark.parametrize("crc32c", IMPLEMENTATIONS)
@pytest.mark.parametrize(("data", "expected"), RFC3720_VECTORS, ids=[f"vector{i}" for i in range(len(RFC3720_VECTORS))])
def test_known_vectors(crc32c, data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_public_api_uses_hardware_here() -> None:
    if extensions_disabled():
        assert public.IMPLEMENTATION == "python"
    else:
        assert public.IMPLEMENTATION in ("sse4.2", "software")
        assert native.IMPLEMENTATION == public.IMPLEMENTATION
    assert public.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("crc32c", IMPLEMENTATIONS)
@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=4096), crc=st.integers(0, 0xFFFFFFFF))
def test_matches_oracle(crc32c, data: bytes, crc: int) -> None:
    assert crc32c(data, crc) == oracle(data, crc)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 65536),
    offset=st.integers(0, 15),
    seed=st.integers(0, 2**32 - 1),
)
def test_native_large_buffers_every_alignment(size: int, offset: int, seed: int) -> None:
    import random

    data = random.Random(seed).randbytes(size + offset)
    view = memoryview(data)[offset:]
    assert native.crc32c(view) == oracle(bytes(view))
    assert native.crc32c_software(view) == oracle(bytes(view))


@pytest.mark.parametrize("size", [0, 1, 7, 8, 255, 767, 768, 769, 24575, 24576, 24577, 65536, 1 << 20])
def test_native_lane_boundaries(size: int) -> None:
    data = bytes((i * 131 + 7) & 0xFF for i in range(size))
    assert native.crc32c(data) == oracle(data)


@pytest.mark.parametrize("crc32c", IMPLEMENTATIONS)
@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=2048), split=st.integers(0, 2048))
def test_incremental(crc32c, data: bytes, split: int) -> None:
    split = min(split, len(data))
    assert crc32c(data[split:], crc32c(data[:split])) == crc32c(data)


@pytest.mark.parametrize("crc32c", IMPLEMENTATIONS)
def test_every_buffer_type(crc32c) -> None:
    payload = b"replicator buffer types" * 10
    expected = oracle(payload)
    assert crc32c(payload) == expected
    assert crc32c(bytearray(payload)) == expected
    assert crc32c(memoryview(payload)) == expected
    assert crc32c(memoryview(b"xx" + payload)[2:]) == expected
    assert crc32c(array.array("B", payload)) == expected
    with mmap.mmap(-1, len(payload)) as mapped:
        mapped.write(payload)
        assert crc32c(mapped) == expected


@pytest.mark.parametrize("crc32c", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", ["text", 12, 1.5, None, [1, 2]])
def test_bad_data_type(crc32c, bad) -> None:
    with pytest.raises(TypeError):
        crc32c(bad)


@pytest.mark.parametrize("crc32c", IMPLEMENTATIONS)
def test_bad_crc_argument(crc32c) -> None:
    with pytest.raises(TypeError):
        crc32c(b"x", "0")
    with pytest.raises(TypeError):
        crc32c(b"x", 1.0)
    with pytest.raises(ValueError):
        crc32c(b"x", -1)
    with pytest.raises(ValueError):
        crc32c(b"x", 1 << 32)

"""CRC-64/NVME (S3's x-amz-checksum-crc64nvme): the native and pure twins against the catalogue and a bit-wise definition.

Vectors, honestly derived (awscrt, which botocore uses for CRC64NVME, is not
installed here): the CRC catalogue's parameters of CRC-64/NVME (width 64,
poly 0xAD93D23594C93659, init all ones, reflected in and out, xorout all
ones), its check value ("123456789" -> 0xAE8B14860A799888) and its residue
(0xF310303B2B6F6E42: the register after a message followed by its own CRC,
little-endian, before the final xor), and a bit-at-a-time implementation of
that definition written from the parameters (not from the tables under test).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import replicator.checksum as public
from replicator._pure import checksum as pure
from replicator._select import extensions_disabled

native = pytest.importorskip("replicator._native.checksum") if extensions_disabled() else None
if native is None:
    from replicator._native import checksum as native  # a missing build fails here, loudly

IMPLEMENTATIONS = [pytest.param(native.crc64nvme, id="native"), pytest.param(pure.crc64nvme, id="pure")]
POLY = 0xAD93D23594C93659
MASK = (1 << 64) - 1
CHECK = 0xAE8B14860A799888
RESIDUE = 0xF310303B2B6F6E42


def reflect(value: int, bits: int) -> int:
    return int(f"{value:0{bits}b}"[::-1], 2)


def definition(data: bytes) -> int:
    """CRC-64/NVME bit by bit, MSB first on reflected input bytes (the catalogue's model)."""
    register = MASK  # init
    for byte in data:
        register ^= reflect(byte, 8) << 56
        for _ in range(8):
            register = ((register << 1) ^ POLY) & MASK if register >> 63 else (register << 1) & MASK
    return reflect(register, 64) ^ MASK  # refout, xorout


def test_the_definition_gives_the_catalogue_check_value() -> None:
    assert definition(b"123456789") == CHECK
    assert definition(b"") == 0


@pytest.mark.parametrize("crc64nvme", IMPLEMENTATIONS)
def test_catalogue_check_and_residue(crc64nvme) -> None:
    assert crc64nvme(b"123456789") == CHECK
    assert crc64nvme(b"") == 0
    for message in (b"123456789", bytes(1000), os.urandom(777)):
        codeword = message + crc64nvme(message).to_bytes(8, "little")
        assert crc64nvme(codeword) ^ MASK == RESIDUE


@pytest.mark.parametrize("crc64nvme", IMPLEMENTATIONS)
def test_arguments_are_checked(crc64nvme) -> None:
    with pytest.raises(TypeError):
        crc64nvme("text")
    with pytest.raises(ValueError):
        crc64nvme(b"x", 1 << 64)
    with pytest.raises(TypeError):
        crc64nvme(b"x", 1.5)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_twins_agree_with_the_definition_and_continue(data: bytes, cut: int) -> None:
    expected = definition(data)
    assert native.crc64nvme(data) == pure.crc64nvme(data) == expected
    head, tail = data[:cut], data[cut:]
    assert native.crc64nvme(tail, native.crc64nvme(head)) == expected
    assert pure.crc64nvme(memoryview(tail), pure.crc64nvme(bytearray(head))) == expected


def test_large_buffers_take_the_unlocked_path_and_agree() -> None:
    data = os.urandom(200_000)  # above the GIL release threshold, unaligned tail
    assert native.crc64nvme(data) == pure.crc64nvme(data)
    assert public.crc64nvme is (pure.crc64nvme if extensions_disabled() else native.crc64nvme)

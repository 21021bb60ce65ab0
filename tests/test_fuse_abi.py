"""``chunkfs.fuse.abi`` against the kernel's own header: every layout is as long as the C
struct, and the constants are the header's. The header is the machine's
``linux/fuse.h`` (Debian 12: protocol 7.38), compiled by gcc; what it predates (the backing
map, passthrough) is checked against the values Linux 6.9 defined."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from chunkfs.fuse import abi

SIZES = {  # C struct -> the layout that must be as long
    "fuse_in_header": abi.IN_HEADER.size,
    "fuse_out_header": abi.OUT_HEADER.size,
    "fuse_attr": abi.ATTR.size,
    "fuse_entry_out": abi.ENTRY_OUT.size + abi.ATTR.size,
    "fuse_attr_out": abi.ATTR_OUT.size + abi.ATTR.size,
    "fuse_init_in": abi.INIT_IN.size,
    "fuse_init_out": abi.INIT_OUT.size,
    "fuse_open_in": abi.OPEN_IN.size,
    "fuse_open_out": abi.OPEN_OUT.size,
    "fuse_read_in": abi.READ_IN.size,
    "fuse_release_in": abi.RELEASE_IN.size,
    "fuse_dirent": abi.DIRENT.size,
    "fuse_kstatfs": abi.KSTATFS.size,
}
CONSTANTS = ["FUSE_ASYNC_READ", "FUSE_MAX_PAGES", "FUSE_INIT_EXT", "FOPEN_KEEP_CACHE"] + \
    [f"FUSE_{op.name}" for op in abi.Opcode]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/fuse.h").exists():
        pytest.skip("needs gcc and the kernel headers (linux-libc-dev)")
    work = tmp_path_factory.mktemp("abi")
    lines = [f'printf("{name} %zu\\n", sizeof(struct {name}));' for name in SIZES]
    lines += [f'printf("{name} %llu\\n", (unsigned long long)({name}));' for name in CONSTANTS]
    (work / "sizes.c").write_text("#include <stdio.h>\n#include <linux/fuse.h>\nint main(void) {\n"
                                  + "\n".join(lines) + "\nreturn 0;\n}\n")
    subprocess.run(["gcc", "-o", str(work / "sizes"), str(work / "sizes.c")], check=True)
    out = subprocess.run([str(work / "sizes")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_every_layout_is_as_long_as_the_kernels_struct(header_values: dict[str, int]) -> None:
    assert {name: header_values[name] for name in SIZES} == SIZES


def test_opcodes_and_flags_are_the_headers(header_values: dict[str, int]) -> None:
    assert {op.name: header_values[f"FUSE_{op.name}"] for op in abi.Opcode} == {op.name: op.value for op in abi.Opcode}
    assert header_values["FUSE_ASYNC_READ"] == abi.ASYNC_READ
    assert header_values["FUSE_MAX_PAGES"] == abi.MAX_PAGES
    assert header_values["FUSE_INIT_EXT"] == abi.INIT_EXT
    assert header_values["FOPEN_KEEP_CACHE"] == abi.FOPEN_KEEP_CACHE


def test_what_the_header_predates_has_linux_6_9s_values() -> None:
    assert abi.PASSTHROUGH == 1 << 37 and abi.FOPEN_PASSTHROUGH == 1 << 7
    assert abi.BACKING_MAP.size == 16
    assert abi.FUSE_DEV_IOC_BACKING_OPEN == 0x4010E501
    assert abi.FUSE_DEV_IOC_BACKING_CLOSE == 0x4004E502


def test_init_flags_above_32_bits_count_only_with_init_ext() -> None:
    assert abi.split_flags(abi.INIT_EXT, abi.PASSTHROUGH >> 32) & abi.PASSTHROUGH
    assert not abi.split_flags(0, abi.PASSTHROUGH >> 32) & abi.PASSTHROUGH


def test_a_reply_header_counts_itself_and_negates_the_errno() -> None:
    assert abi.OUT_HEADER.unpack(abi.out_header(7, 100, 2)) == (116, -2, 7)


def test_dirents_are_padded_to_eight_bytes() -> None:
    for name in (b"a", b"abcdefgh", b"model-00001-of-00004.safetensors"):
        record = abi.dirent(5, 3, name, abi.DT_REG)
        assert len(record) % 8 == 0
        assert abi.DIRENT.unpack_from(record) == (5, 3, len(name), abi.DT_REG)
        assert record[abi.DIRENT.size:abi.DIRENT.size + len(name)] == name

"""The safetensors header reader refuses every malformed or hostile header with one clear line.

These files reach `mflux inspect`, the loader (which checks each header before `mx.load` reads any
data) and LoRA loading, so each case must be an MfluxError naming the file, never a traceback or a hang.
"""

import json
import os
import struct
import threading

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mflux.cli import cli
from mflux.errors import MfluxError
from mflux.runtime.loader import read_weights
from mflux.runtime.weights import SafetensorsFile


def write(path, header, data: bytes = b"", length: int | None = None):
    """A safetensors file from a header (an object, or raw JSON text) and its data bytes."""
    if isinstance(header, bytes):
        raw = header
    else:
        raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def refused(path, *words) -> str:
    with pytest.raises(MfluxError) as e:
        SafetensorsFile(path)
    message = str(e.value)
    assert "\n" not in message and str(path)[:40] in message, message
    for w in words:
        assert w in message, message
    return message


def test_a_valid_file_is_read(tmp_path):
    # the baseline the refusals are measured against: mx.save_safetensors' own output passes
    path = tmp_path / "ok.safetensors"
    mx.save_safetensors(str(path), {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": mx.zeros(0)})
    f = SafetensorsFile(path)
    assert f.tensors["a"] == ("F32", (2, 3), (0, 24)) and f.tensors["b"][1] == (0,)
    np.testing.assert_array_equal(f.numpy("a"), np.arange(6, dtype=np.float32).reshape(2, 3))
    write(tmp_path / "meta.safetensors", {"__metadata__": {"format": "pt"}, "x": entry()}, b"\0" * 8)
    assert SafetensorsFile(tmp_path / "meta.safetensors").metadata == {"format": "pt"}


@pytest.mark.parametrize("header", ["[1, 2]", '"weights"', "3", "null"])
def test_header_that_is_not_a_json_object(tmp_path, header):
    refused(write(tmp_path / "x.safetensors", header), "not a JSON object")


def test_header_that_is_not_json(tmp_path):
    refused(write(tmp_path / "x.safetensors", "{not json"), "not a valid safetensors file")
    refused(write(tmp_path / "y.safetensors", b'{"\xff\xfe": 1}'), "not a valid safetensors file")


@pytest.mark.parametrize(
    "bad, words",
    [
        (entry(offsets=("0", "8")), "data_offsets"),
        (entry(offsets=(0,)), "data_offsets"),
        (entry(offsets=(0, 8.0)), "data_offsets"),
        (entry(offsets=(-8, 0)), "data_offsets"),
        (entry(shape="2"), "shape"),
        (entry(shape=("2",)), "shape"),
        (entry(shape=(-2,)), "shape"),
        (entry(shape=(True, 2)), "shape"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype must be a string"),
        ({"dtype": "F32", "shape": [2]}, "malformed header entry"),
        ([0, 8], "malformed header entry"),
        (entry(dtype="F8_E4M3"), "float8 (F8_E4M3), which MLX cannot load: convert the file first"),
        (entry(dtype="C64"), "unsupported dtype C64"),
        (entry(offsets=(8, 0)), "does not match its shape"),
        (entry(shape=(3,)), "does not match its shape"),
    ],
)
def test_malformed_entries(tmp_path, bad, words):
    path = write(tmp_path / "x.safetensors", {"w": bad}, b"\0" * 8)
    refused(path, "'w'", words)


def test_shape_whose_product_overflows_64_bits(tmp_path):
    # 2**32 * 2**32 * 4 bytes wraps to 0 in int64 arithmetic; it must not pass as an empty tensor
    path = write(tmp_path / "x.safetensors", {"w": entry(shape=(2**32, 2**32), offsets=(0, 0))})
    refused(path, "does not match its shape")


@pytest.mark.parametrize("meta", [["format", "pt"], "pt", {"format": 1}, {"format": None}])
def test_metadata_that_is_not_a_table_of_strings(tmp_path, meta):
    path = write(tmp_path / "x.safetensors", {"__metadata__": meta, "w": entry()}, b"\0" * 8)
    refused(path, "__metadata__")


def test_deeply_nested_brackets(tmp_path):
    depth = 200_000  # far beyond Python's recursion limit
    path = write(tmp_path / "x.safetensors", "[" * depth + "]" * depth)
    refused(path, "nested too deeply")
    path = write(tmp_path / "y.safetensors", '{"w": ' + "[" * depth + "]" * depth + "}")
    refused(path, "nested too deeply")


def test_overlapping_offsets(tmp_path):
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}
    refused(write(tmp_path / "x.safetensors", header, b"\0" * 12), "overlap", "'a'", "'b'")


def test_offsets_past_the_end_of_the_file(tmp_path):
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(8, 16))}
    refused(write(tmp_path / "x.safetensors", header, b"\0" * 12), "truncated", "'b'")


def test_header_length_larger_than_the_file(tmp_path):
    refused(write(tmp_path / "x.safetensors", {"w": entry()}, b"\0" * 8, length=10_000), "does not fit")
    refused(write(tmp_path / "y.safetensors", {}, length=2**63), "does not fit")
    (tmp_path / "z.safetensors").write_bytes(b"\1\0\0")
    refused(tmp_path / "z.safetensors", "shorter than the 8-byte header length")


def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            SafetensorsFile(fifo)
        except MfluxError as e:
            result["error"] = str(e)

    t = threading.Thread(target=read, daemon=True)  # opening a FIFO for reading blocks until a writer
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO hung"
    assert "not a regular file" in result["error"]


def test_a_folder_named_like_a_file_and_a_missing_file(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    refused(tmp_path / "dir.safetensors", "not a regular file")
    refused(tmp_path / "missing.safetensors", "no such file")


def test_an_over_long_path(tmp_path):
    path = tmp_path / ("x" * 300 + ".safetensors")  # one name beyond NAME_MAX (255): ENAMETOOLONG
    with pytest.raises(MfluxError) as e:
        SafetensorsFile(path)
    assert "\n" not in str(e.value) and "file name too long" in str(e.value)
    assert len(str(e.value)) < 200  # the path is shortened, the line stays readable


def test_the_loader_checks_headers_before_mx_load(tmp_path):
    # A shard cut short: mx.load would read past its end; the header check names the file instead.
    folder = tmp_path / "vae"
    folder.mkdir()
    good = folder / "a.safetensors"
    mx.save_safetensors(str(good), {"w": mx.ones((64, 64))})
    cut = folder / "b.safetensors"
    mx.save_safetensors(str(cut), {"v": mx.ones((64, 64))})
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(MfluxError, match=r"b\.safetensors: file is truncated"):
        read_weights(folder, "vae", "mlx")
    cut.unlink()
    assert set(read_weights(folder, "vae", "mlx")) == {"w"}
    with pytest.raises(MfluxError, match="no such folder"):
        read_weights(tmp_path / "text_encoder", "text_encoder", "hf")


def test_inspect_prints_one_line(tmp_path):
    path = write(tmp_path / "x.safetensors", "[" * 100_000 + "]" * 100_000)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nested too deeply" in lines[0], (
        result.stderr
    )

"""Issue #11, crafted model files: safetensors headers are checked, within limits, before anything is mapped.

Files are built byte by byte here (8-byte little-endian header length, JSON, data), so each one is exactly as
hostile as the test says. Memory is measured in a subprocess (RSS high-water mark), which also sees what torch
allocates outside Python."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import SAFETENSORS_DTYPES, CheckpointError, open_checkpoint, read_state_dict
from diffusion.make_checkpoint import make_checkpoint
from diffusion.safetensors_header import DTYPE_BYTES, MAX_HEADER_BYTES, MAX_TENSORS, read_safetensors_header

ROOT = Path(__file__).resolve().parents[2]
UNET = "model.diffusion_model."


def write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def many_tensors(count: int) -> bytes:
    """A header of `count` one-byte tensors, written as text without building a dict."""
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(count))
    return ("{" + entries + "}").encode()


def rebuilt(source: Path, path: Path, change) -> Path:
    """`source` with its header changed by `change(header)` (data unchanged)."""
    blob = source.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length])
    change(header)
    return write_raw(path, json.dumps(header).encode(), blob[8 + length:])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", preset="tiny", seed=0)


def peak_growth_mb(path: Path) -> tuple[float, str]:
    """(MB the RSS high-water mark grew by, the error) while a fresh process opens `path` as a checkpoint."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    code = textwrap.dedent("""
        import json, sys
        from diffusion.checkpoint import CheckpointError, TensorFile

        def kb(field):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the RSS high-water mark (VmHWM) to the current RSS
        before = kb("VmHWM:")
        try:
            TensorFile(sys.argv[1])
            error = ""
        except CheckpointError as e:
            error = str(e)
        print(json.dumps([(kb("VmHWM:") - before) / 1024, error]))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=True)
    grown, error = json.loads(done.stdout.strip().splitlines()[-1])
    return grown, error


def test_dtype_tables_agree():
    assert set(DTYPE_BYTES) == set(SAFETENSORS_DTYPES)
    assert all(SAFETENSORS_DTYPES[name].itemsize == size for name, size in DTYPE_BYTES.items())


@pytest.mark.parametrize("count", [300_000, MAX_TENSORS + 1])
def test_huge_headers_fail_fast_and_small(tmp_path, count):
    """300,000 keys (over the header size limit too) and just over the key limit: a CheckpointError naming the
    file and the limit, while the process grows by far less than the hundreds of MB the old reader took."""
    header = many_tensors(count)
    path = write_raw(tmp_path / "many.safetensors", header, b"\0" * count)
    grown, error = peak_growth_mb(path)
    assert str(path) in error
    assert f"more than {MAX_TENSORS} tensors" in error or f"more than the {MAX_HEADER_BYTES >> 20} MB" in error
    assert grown < 32, f"opening grew the process by {grown:.0f} MB"


def test_header_size_is_limited_even_when_it_is_only_padding(tmp_path):
    path = write_raw(tmp_path / "padded.safetensors", b"{" + b" " * MAX_HEADER_BYTES + b"}")
    with pytest.raises(CheckpointError, match=r"claims \d+ bytes, more than the 16 MB limit"):
        read_state_dict(path)


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, r"dtype 'F33', which is not supported"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"shape \[3\] of F32 \(12 bytes\) but spans 8 bytes"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}, r"ends at byte 80 of the data but the file holds 8"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"not \[begin, end\] with 0 <= begin <= end"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, r"not a list of at most 8 non-negative integers"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, r"not a list of at most 8 non-negative integers"),
    ({"dtype": "F32", "shape": [1] * 9 + [2], "data_offsets": [0, 8]}, r"at most 8 non-negative integers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}, r"not \[begin, end\]"),
])
def test_each_bad_entry_is_named(tmp_path, entry, problem):
    path = write_raw(tmp_path / "bad.safetensors", json.dumps({"w": entry}).encode(), b"\0" * 8)
    with pytest.raises(CheckpointError, match=problem) as caught:
        read_safetensors_header(path)
    assert str(path) in str(caught.value) and "'w'" in str(caught.value)


def test_overlapping_tensors_and_repeated_names_are_refused(tmp_path):
    overlapping = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path = write_raw(tmp_path / "overlap.safetensors", json.dumps(overlapping).encode(), b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"tensor 'b' \[4, 12\) overlap those of 'a'"):
        read_state_dict(path)
    twice = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
            b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    with pytest.raises(CheckpointError, match="'a' appear more than once"):
        read_state_dict(write_raw(tmp_path / "twice.safetensors", twice, b"\0\0"))
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_state_dict(write_raw(tmp_path / "deep.safetensors", b'{"a": ' + deep + b"}"))


def test_span_that_disagrees_with_the_shape_fails_at_open_not_at_load(tiny, tmp_path):
    """The old reader accepted it and safetensors failed later, with its own error, when the weights were read."""
    key = UNET + "out.2.bias"

    def shorten(header):
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin, end - 2]

    path = rebuilt(tiny, tmp_path / "span.safetensors", shorten)
    with pytest.raises(CheckpointError, match=rf"'{key}' .* but spans"):
        open_checkpoint(path)


def test_a_known_dtype_where_the_model_needs_floats_is_named(tiny, tmp_path):
    key = UNET + "out.2.bias"

    def as_int(header):
        entry = header[key]
        entry["dtype"], entry["shape"] = "I16", entry["shape"]  # same bytes, read as 16-bit integers
        assert entry["shape"] and DTYPE_BYTES["I16"] == 2

    original = json.loads(tiny.read_bytes()[8:8 + int.from_bytes(tiny.read_bytes()[:8], "little")])
    assert original[key]["dtype"] == "F16", "the tiny checkpoint stores F16"
    path = rebuilt(tiny, tmp_path / "ints.safetensors", as_int)
    with pytest.raises(CheckpointError, match=rf"1 of another dtype: {key} \(model needs floating point, "
                                              r"file has int16\)"):
        open_checkpoint(path)


@pytest.mark.parametrize("key", ["first_stage_model.decoder.conv_in.weight",
                                 UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                                 UNET + "input_blocks.0.0.weight"])
def test_shapes_the_architecture_is_read_from_are_named_when_wrong(tiny, tmp_path, key):
    """A weight the loader reads the architecture from, given a shape with the same bytes but the wrong
    dimensions: it crashed (IndexError, GroupNorm's ValueError) instead of naming the weight."""
    def flatten(header):
        header[key]["shape"] = [1, math.prod(header[key]["shape"])]

    path = rebuilt(tiny, tmp_path / "flat.safetensors", flatten)
    with pytest.raises(CheckpointError, match="architecture") as caught:
        open_checkpoint(path)
    assert str(path) in str(caught.value)
    assert f"{key} has shape [1, " in str(caught.value) or f"{key} (model needs" in str(caught.value)


def test_real_checkpoints_still_open(tiny):
    layout = open_checkpoint(tiny)
    assert layout.unet.load(dtype=torch.float32) is not None


def test_an_architecture_far_larger_than_sd_is_refused_before_it_is_built(tiny, tmp_path):
    """20,000 one-byte weights named text encoder layers: the old loader built a 20,000-layer CLIP on the meta
    device (30 s, about 1 GB) just to list what was missing."""
    layers = "cond_stage_model.transformer.text_model.encoder.layers.{}.x"

    def add_layers(header):
        end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
        for i in range(20_000):  # overlapping one-byte spans are refused, so these get bytes of their own
            header[layers.format(i)] = {"dtype": "U8", "shape": [1], "data_offsets": [end + i, end + i + 1]}

    path = rebuilt(tiny, tmp_path / "layers.safetensors", add_layers)
    with open(path, "ab") as f:
        f.write(b"\0" * 20_000)
    with pytest.raises(CheckpointError, match="text encoder .*20000 layers, more than 64"):
        open_checkpoint(path)


def test_embedding_files_get_the_same_checks(tmp_path):
    """`embedding:name` in a prompt reads models/embeddings/name.safetensors: the same limits apply there."""
    from diffusion.embeddings import EmbeddingError, read_embedding_file

    path = write_raw(tmp_path / "evil.safetensors", many_tensors(MAX_TENSORS + 1), b"\0" * (MAX_TENSORS + 1))
    with pytest.raises(EmbeddingError, match=f"more than {MAX_TENSORS} tensors"):
        read_embedding_file(path)


def test_the_real_sd15_layout_passes_every_check(tmp_path):
    """The checks must not refuse real files: SD1.5's 1,131 tensors (tests/fixtures/sd15_keys.tsv) as a sparse
    file whose header is exact and whose data is holes; opening reads no data."""
    entries, offset = {}, 0
    for line in (ROOT / "tests" / "fixtures" / "sd15_keys.tsv").read_text().splitlines():
        key, dtype, shape = line.split("\t")
        shape = json.loads(shape)
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        entries[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    entries["__metadata__"] = {"format": "pt"}
    path = write_raw(tmp_path / "sd15.safetensors", json.dumps(entries).encode())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + offset)
    layout = open_checkpoint(path)
    assert layout.unet.config.model_channels == 320 and layout.text_encoder.config.num_hidden_layers == 12
    assert len(read_safetensors_header(path)) == 1131

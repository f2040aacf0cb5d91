"""llmkit.io (atomic writes, JSON, text corpora, the GGUF header reader) and llmkit.device.

The GGUF reader is checked against gguf-py's own GGUFReader on files written by gguf-py's GGUFWriter (every
value type, a tensor table with several GGML types, a custom alignment) and on the real SmolLM2 file.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from llmkit.device import resolve_device, resolve_dtype
from llmkit.errors import LlmkitError
from llmkit.io import (
    atomic_path,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    corpus_files,
    read_gguf,
    read_json,
    read_text,
)


# ---------------------------------------------------------------------------------------------- atomic writes
def test_atomic_writers(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff")
    atomic_write_json(tmp_path / "c.json", {"é": [1, 2]})
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "d.pt")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"é": [1, 2]}
    assert (tmp_path / "c.json").read_text(encoding="utf-8").endswith("\n")
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], torch.arange(3))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for name in ("a.txt", "b.bin", "c.json", "d.pt"):  # same permissions as a file made by open()
        assert (tmp_path / name).stat().st_mode == plain.stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json", "d.pt", "plain.txt"]


def test_atomic_failure_keeps_old_file(tmp_path):
    target = tmp_path / "model.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "half": ')  # the writer dies mid-file
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary file left
    with pytest.raises(TypeError):  # json.dumps fails before anything is written
        atomic_write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------------------------------------- JSON, text
def test_read_json_errors(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json") == {"a": 1}
    (tmp_path / "bad.json").write_text('{"a": ')
    (tmp_path / "latin1.json").write_bytes('{"a": "é"}'.encode("latin-1"))
    cases = (("bad.json", "invalid JSON"), ("latin1.json", "not UTF-8"), ("nope.json", "not found"))
    for name, words in cases:
        with pytest.raises(LlmkitError, match=words) as e:
            read_json(tmp_path / name, missing="run `llmkit prepare`")
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(LlmkitError, match="not found; run `llmkit prepare`"):
        read_json(tmp_path / "nope.json", missing="run `llmkit prepare`")


def test_corpus_files_and_read_text(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "b.txt").write_text("b")
    (tmp_path / "d" / "a.txt").write_bytes("\ufeffa é".encode())
    (tmp_path / "d" / "skip.md").write_text("no")
    files = corpus_files([tmp_path / "d"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["d/a.txt", "d/sub/b.txt"]
    assert read_text(files[0]) == "a é"  # BOM dropped
    (tmp_path / "bin.txt").write_bytes(b"ab\x00cd")
    (tmp_path / "latin.txt").write_bytes("é".encode("latin-1"))
    for name, words in (("bin.txt", "binary"), ("latin.txt", "not UTF-8"), ("none.txt", "no such file")):
        with pytest.raises(LlmkitError, match=words):
            read_text(tmp_path / name)
    with pytest.raises(LlmkitError, match="corpus path not found"):
        corpus_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmkitError, match=r"no \.txt files"):
        corpus_files([tmp_path / "empty"])
    with pytest.raises(LlmkitError, match="no corpus given"):
        corpus_files([])


# ---------------------------------------------------------------------------------------------- GGUF
def _reference(path) -> tuple[dict, list[tuple]]:
    """Metadata and tensor table as gguf-py's GGUFReader reads them."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    table = [(t.name, int(t.tensor_type), tuple(map(int, t.shape)), int(t.data_offset)) for t in r.tensors]
    return meta, table


def _write_sample(path, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_uint32("general.alignment", alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ 🤗")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ünï", "<|im_end|>"])
    w.add_array("t.bools", [True, False])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((3, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("d.bias", rng.standard_normal(5).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_read_gguf_matches_gguf_py(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    _write_sample(path, alignment)
    meta, table = _reference(path)
    got = read_gguf(path)
    assert got.version == 3
    assert got.metadata.keys() == meta.keys()
    for k, v in meta.items():
        assert got.metadata[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    assert got.metadata["t.f32"] == float(np.float32(1e-5))  # the stored float32, exactly
    assert [(t.name, t.ggml_type, t.dims, t.offset) for t in got.tensors] == table
    assert got.data_start % (alignment or 32) == 0


def test_read_gguf_real_vocabulary(smollm2_gguf):
    meta, table = _reference(smollm2_gguf)
    got = read_gguf(smollm2_gguf)
    assert got.metadata == meta  # 49k tokens, merges, scores, chat template
    assert [(t.name, t.ggml_type, t.dims, t.offset) for t in got.tensors] == table


def test_read_gguf_errors(tmp_path):
    path = tmp_path / "m.gguf"
    _write_sample(path)
    data = path.read_bytes()
    cases = {
        "cut.gguf": data[:300],  # inside the metadata
        "junk.gguf": b"\x00" * 4096,
        "tiny.gguf": b"GGUF\x03\x00\x00\x00" + b"\x00" * 10,
        "v1.gguf": b"GGUF\x01\x00\x00\x00" + b"\x00" * 16,
        "huge.gguf": data[:8] + (2**60).to_bytes(8, "little") + data[16:],  # absurd tensor count
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(LlmkitError) as e:
            read_gguf(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value), name
    with pytest.raises(LlmkitError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------------------------- device
def test_resolve_device_and_dtype():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu and resolve_device(cpu) == cpu
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == auto and resolve_device("auto") == auto
    with pytest.raises(LlmkitError, match="bad device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LlmkitError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32 == resolve_dtype("auto", cpu)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    for name, want in (("bf16", torch.bfloat16), ("torch.float16", torch.float16), ("fp32", torch.float32),
                       (torch.float16, torch.float16)):
        assert resolve_dtype(name, cpu) == want
    with pytest.raises(LlmkitError, match="bad dtype 'int3'"):
        resolve_dtype("int3", cpu)


def test_no_temp_names_collide(tmp_path):
    """Two writers of the same file at once each use their own temporary file."""
    with atomic_path(tmp_path / "x") as a, atomic_path(tmp_path / "x") as b:
        assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".x.")
        a.write_text("a")
        b.write_text("b")
    assert (tmp_path / "x").read_text() == "a"  # the outer block finished last
    assert os.listdir(tmp_path) == ["x"]

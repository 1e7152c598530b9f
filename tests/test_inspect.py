"""`inspect`: parameter counts against the torch models, quantization read back, --verify, single files."""

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mflux import inspector
from mflux.errors import MfluxError
from mflux.inspector import format_inspect, inspect
from mflux.manifest import new_manifest, write_manifest
from mflux.runtime.quantization import QuantSpec, quantize_tensor
from mflux.runtime.weights import save_shards
from mflux.store import Store, format_size
from tests.test_store import make_model, write_fake_pipeline


def tensor_bytes(folder) -> int:
    """Bytes of tensor data in every safetensors file under `folder`: file sizes less their headers."""
    total = 0
    for p in folder.rglob("*.safetensors"):
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        total += p.stat().st_size - 8 - n
    return total


def torch_parameters(folder) -> dict[str, int]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    classes = {
        "transformer": FluxTransformer2DModel,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "vae": AutoencoderKL,
    }
    return {
        c: sum(p.numel() for p in cls.from_pretrained(folder / c).parameters()) for c, cls in classes.items()
    }


def test_diffusers_folder_matches_the_torch_models(tiny_dev):
    report = inspect(str(tiny_dev))
    assert report["kind"] == "folder" and report["format"] == "hf" and report["variant"] == "dev"
    components = report["components"]
    assert set(components) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    expected = torch_parameters(tiny_dev)
    assert {c: v["parameters"] for c, v in components.items()} == expected
    assert report["total"]["parameters"] == sum(expected.values())
    assert report["total"]["bytes"] == tensor_bytes(tiny_dev)
    assert components["transformer"]["files"] == 3 and components["text_encoder_2"]["files"] == 2
    for c in components.values():
        assert c["quantized_tensors"] == 0 and c["quantization"] == []
        assert c["bits_per_weight"] == pytest.approx(8 * c["bytes"] / c["parameters"], abs=1e-3)
    text = format_inspect(report)
    assert "COMPONENT" in text and "transformer" in text and "variant       dev" in text


def test_store_model_reports_its_manifest(mflux_home):
    q = {"transformer": {"bits": 8, "group_size": 64, "mode": "affine"}}
    make_model(Store(), "fake-q8", "dev", quantization=q)
    report = inspect("fake-q8")
    assert report["kind"] == "model" and report["path"] == str(mflux_home / "fake-q8")
    for key in (
        "name",
        "family",
        "variant",
        "format",
        "dtype",
        "source",
        "files",
        "created",
        "mflux_version",
    ):
        assert key in report
    assert (report["name"], report["variant"], report["format"]) == ("fake-q8", "dev", "hf")
    # the fake files hold floats: the header says so, and names what the manifest records
    assert report["quantization"] is None
    assert report["manifest_quantization"] == (
        "the manifest lists transformer 8-bit affine g64, but its files hold no quantized tensor"
    )
    json.dumps(report)  # what --json prints


def quantized_component(folder, specs: dict[str, QuantSpec]) -> dict[str, np.ndarray]:
    """An MLX-native component: layers quantized by MLX itself, plus float tensors; returns the floats."""
    rng = np.random.default_rng(1)
    weights = {f"{name}.weight": rng.standard_normal((32, 256)).astype(np.float32) for name in specs}
    floats = {
        "norm.scale": np.ones(256, np.float32),
        "proj.weight": rng.standard_normal((8, 100)).astype(np.float32),
    }
    tensors = {k: mx.array(v) for k, v in floats.items()}
    for name, spec in specs.items():
        tensors.update(quantize_tensor(f"{name}.weight", mx.array(weights[f"{name}.weight"]), spec))
    save_shards(iter(sorted(tensors.items())), folder, max_shard_bytes=20_000)
    return floats


def test_quantization_inferred_from_shapes(tmp_path):
    specs = {
        "a": QuantSpec(4),
        "b": QuantSpec(8),
        "c": QuantSpec(3),
        "d": QuantSpec(6),
        "e": QuantSpec(4, 32),
        "f": QuantSpec.for_mode("mxfp4"),
        "g": QuantSpec.for_mode("nvfp4"),
        "h": QuantSpec.for_mode("mxfp8"),
    }
    floats = quantized_component(tmp_path / "transformer", specs)
    c = inspect(str(tmp_path))["components"]["transformer"]
    assert c["files"] > 1  # sharded, with an index
    assert c["parameters"] == 32 * 256 * len(specs) + sum(v.size for v in floats.values())
    assert c["quantized_tensors"] == len(specs)
    found = {(q["bits"], q["group_size"], q["mode"]): q["tensors"] for q in c["quantization"]}
    assert found == {
        (3, 64, "affine"): 1, (4, 64, "affine"): 1, (6, 64, "affine"): 1, (8, 64, "affine"): 1,
        (4, 32, "affine"): 1, (4, 32, "mxfp4"): 1, (4, 16, "nvfp4"): 1, (8, 32, "mxfp8"): 1,
    }  # fmt: skip
    assert c["bits_per_weight"] == pytest.approx(8 * tensor_bytes(tmp_path) / c["parameters"], abs=1e-3)
    # what the same tensors weigh unquantized, at the scales' float32
    assert c["unquantized_bytes"] == 4 * c["parameters"]
    assert "uint32" in c["dtypes"] and "uint8" in c["dtypes"]


def test_quantization_from_the_manifest_per_layer(tmp_path):
    # 4-bit g64 and 8-bit g32 pack to the same shapes: only the manifest can tell them apart.
    folder = write_fake_pipeline(tmp_path / "m", "schnell")
    shutil.rmtree(folder / "transformer")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    quantized_component(folder / "transformer", {"a": QuantSpec(4), "b": QuantSpec(8, 32)})
    q = {
        "transformer": {
            "bits": 4,
            "group_size": 64,
            "mode": "affine",
            "layers": {"b": {"bits": 8, "group_size": 32}},
        }
    }
    write_manifest(folder, new_manifest(folder, name="m", format="mlx", dtype="bfloat16",
                                        source={"kind": "model", "name": "x"}, quantization=q))  # fmt: skip
    report = inspect(str(folder))
    c = report["components"]["transformer"]
    found = {(q["bits"], q["group_size"], q["mode"]): q["tensors"] for q in c["quantization"]}
    assert found == {(4, 64, "affine"): 1, (8, 32, "affine"): 1}
    assert c["parameters"] == 2 * 32 * 256 + 256 + 800
    assert "transformer 4-bit affine g64 (1 layers differ)" in format_inspect(report)


def test_single_safetensors_file(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {
        "double_blocks.0.img_attn.qkv.weight": rng.standard_normal((96, 32)).astype(np.float16),
        "guidance_in.in_layer.bias": rng.standard_normal(32).astype(np.float32),
        "img_in.weight": np.zeros((32, 64), np.int8),
    }
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    report = inspect(str(path), tensors=True)
    assert report["kind"] == "safetensors" and report["layout"] == "bfl-transformer"
    assert report["variant"] == "dev"  # it has guidance_in
    assert report["metadata"] == {"format": "pt"}
    assert "variant       dev" in format_inspect(report)
    schnell = tmp_path / "flux1-schnell.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("guidance_in")}, str(schnell))
    assert inspect(str(schnell))["variant"] == "schnell"
    (c,) = report["components"].values()
    assert c["parameters"] == sum(t.size for t in tensors.values())
    assert c["bytes"] == sum(t.nbytes for t in tensors.values())
    assert c["dtypes"] == {"float16": 1, "float32": 1, "int8": 1}
    with safe_open(str(path), "np") as f:
        expected = [
            {"name": k, "shape": list(f.get_slice(k).get_shape()), "dtype": str(f.get_tensor(k).dtype)}
            for k in sorted(f.keys())
        ]
    assert c["tensors"] == expected
    assert "double_blocks.0.img_attn.qkv.weight  (96, 32)  float16" in format_inspect(report)


def test_lora_files_go_to_the_lora_report(tmp_path, monkeypatch):
    path = tmp_path / "style.safetensors"
    save_file({"transformer.x.lora_A.weight": np.zeros((4, 64), np.float32)}, str(path))
    monkeypatch.setattr(inspector, "_lora_inspector", lambda: None)
    assert inspect(str(path))["layout"] == "lora"
    calls = []
    monkeypatch.setattr(
        inspector, "_lora_inspector", lambda: lambda p, tensors: calls.append(p) or {"kind": "lora"}
    )
    assert inspect(str(path)) == {"kind": "lora"} and calls == [path]


def test_verify_catches_a_flipped_byte(mflux_home):
    path = make_model(Store(), "m")
    report = inspect("m", verify=True)
    assert report["verify"] == {"ok": True, "files": 9, "mismatches": [], "unlisted": []}
    weights = path / "vae" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    v = inspect("m", verify=True)["verify"]
    assert not v["ok"] and v["mismatches"] == [{"path": "vae/model.safetensors", "problem": "sha256 differs"}]
    (path / "text_encoder" / "model.safetensors").write_bytes(b"short")
    (path / "transformer" / "config.json").unlink()
    (path / "notes.txt").write_text("hi")
    v = inspect("m", verify=True)["verify"]
    problems = {m["path"]: m["problem"] for m in v["mismatches"]}
    assert problems["transformer/config.json"] == "missing"
    assert problems["text_encoder/model.safetensors"].startswith("size 5, expected")
    assert v["unlisted"] == ["notes.txt"]
    assert "verify: FAILED, 3 of 9 files" in format_inspect(inspect("m", verify=True))


def test_bad_targets(mflux_home, tmp_path):
    with pytest.raises(MfluxError, match=r"unknown model 'shnell' \(did you mean 'schnell'"):
        inspect("shnell")
    with pytest.raises(MfluxError, match="no such model, folder or file"):
        inspect(str(tmp_path / "nothing" / "here"))
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(MfluxError, match="pickle-based weights are refused"):
        inspect(str(tmp_path / "model.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MfluxError, match="empty does not look like a model folder"):
        inspect(str(tmp_path / "empty"))
    (tmp_path / "empty" / "vae").mkdir()
    with pytest.raises(MfluxError, match="no .safetensors files"):
        inspect(str(tmp_path / "empty"))
    with pytest.raises(MfluxError, match="no manifest.toml to verify against"):
        inspect(str(write_fake_pipeline(tmp_path / "p")), verify=True)


def test_quantization_header_says_what_the_files_hold(tmp_path):
    # The manifest records text_encoder as nvfp4, but its files hold only floats: the header, as the
    # table, says what is in the files, and names the manifest's claim.
    folder = write_fake_pipeline(tmp_path / "m", "schnell")
    shutil.rmtree(folder / "transformer")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    nvfp4 = QuantSpec.for_mode("nvfp4")
    quantized_component(folder / "transformer", {"a": nvfp4})
    q = {"transformer": nvfp4.to_dict(), "text_encoder": nvfp4.to_dict()}
    write_manifest(folder, new_manifest(folder, name="m", format="mlx", dtype="bfloat16",
                                        source={"kind": "model", "name": "x"}, quantization=q))  # fmt: skip
    report = inspect(str(folder))
    assert report["components"]["text_encoder"]["quantized_tensors"] == 0
    c = report["components"]["transformer"]
    assert report["quantization"]["components"] == {"transformer": nvfp4.to_dict()}
    text = format_inspect(report)
    header = next(line for line in text.splitlines() if line.startswith("quantization "))
    assert header == "quantization  transformer 4-bit nvfp4 g16", header
    # the table's size as floats reads as a size, not as "unquantized"
    row = next(line for line in text.splitlines() if line.startswith("transformer "))
    assert row.endswith(f"1 × 4-bit nvfp4 g16 ({format_size(c['unquantized_bytes'])} as floats)"), row
    said = "the manifest lists text_encoder 4-bit nvfp4 g16, but its files hold no quantized tensor"
    assert f"manifest_quantization {said}" in text.splitlines(), text


def test_a_lora_counts_the_modules_in_its_file(tmp_path):
    # diffusers' to_q, to_k and to_v of a block land on one fused qkv: the file holds 3 modules
    rng = np.random.default_rng(3)
    names = [f"transformer.transformer_blocks.0.attn.to_{x}" for x in ("q", "k", "v")]
    names.append("transformer.transformer_blocks.0.ff.net.2")
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
        tensors[f"{name}.lora_B.weight"] = rng.standard_normal((64, 4)).astype(np.float32)
    path = tmp_path / "me.safetensors"
    save_file(tensors, str(path))
    report = inspect(str(path))
    assert report["targets"] == {"transformer": 2}  # the runtime's layers: the fused qkv and the MLP out
    assert report["modules"] == "transformer 4 modules on 2 layers"
    assert "modules       transformer 4 modules on 2 layers" in format_inspect(report)

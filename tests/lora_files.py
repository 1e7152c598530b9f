"""LoRA files for the tests: random low-rank pairs written under each format's own names, and diffusers'
image for a set of LoRA files (a fresh FluxPipeline each time, since loading a LoRA changes it)."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.fixtures import _quiet, run_pipeline


def pair(rng: np.random.Generator, rank: int, in_dims: int, out_dims: int, amp: float = 0.5):
    """(down (rank, in), up (out, rank)) whose product changes a layer's output by about `amp` of its input."""
    down = rng.standard_normal((rank, in_dims)) / np.sqrt(in_dims)
    up = rng.standard_normal((out_dims, rank)) * amp / np.sqrt(rank)
    return down.astype(np.float32), up.astype(np.float32)


def save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


def alpha(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def peft(spec: dict, alphas: dict | None = None) -> dict:
    """{module: (down, up)} under diffusers/PEFT names: `<module>.lora_A.weight`, `.lora_B.weight`, `.alpha`."""
    out = {}
    for name, (down, up) in spec.items():
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        if alphas and name in alphas:
            out[f"{name}.alpha"] = alpha(alphas[name])
    return out


def peft_metadata(**components: dict) -> dict:
    """safetensors metadata as diffusers' save_lora_weights writes it: each component's LoraConfig values
    (r, lora_alpha, alpha_pattern, target_modules, ...) under `<component>.<key>`."""
    config = {
        f"{c}.{k}": v
        for c, cfg in components.items()
        for k, v in {"rank_pattern": {}, "alpha_pattern": {}, **cfg}.items()
    }
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


def kohya(spec: dict, alphas: dict | None = None, prefix: str = "lora_unet_") -> dict:
    """{dotted module: (down, up)} under kohya's names: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`."""
    out = {}
    for name, (down, up) in spec.items():
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        if alphas and name in alphas:
            out[f"{key}.alpha"] = alpha(alphas[name])
    return out


def kohya_split(name: str, parts: list, alpha_value: float, prefix: str = "lora_unet_") -> dict:
    """A fused layer trained as separate parts, as kohya's split_qkv holds it: lora_down.N / lora_up.N."""
    key = prefix + name.replace(".", "_")
    out = {f"{key}.alpha": alpha(alpha_value)}
    for i, (down, up) in enumerate(parts):
        out[f"{key}.lora_down.{i}.weight"], out[f"{key}.lora_up.{i}.weight"] = down, up
    return out


def fuse(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """Parts (down_i, up_i) on consecutive row blocks -> one fused pair: ranks stacked, up block-diagonal."""
    down = np.concatenate([d for d, _ in parts], axis=0)
    up = np.zeros((sum(u.shape[0] for _, u in parts), down.shape[0]), np.float32)
    row = col = 0
    for d, u in parts:
        up[row : row + u.shape[0], col : col + d.shape[0]] = u
        row, col = row + u.shape[0], col + d.shape[0]
    return down, up


def transformer_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """diffusers module name -> (out, in) of the tiny pipeline's transformer."""
    from mflux.runtime.weights import TensorSource

    src = TensorSource.from_folder(Path(folder) / "transformer")
    return {
        k[: -len(".weight")]: src.shape(k)
        for k in src.keys()
        if k.endswith(".weight") and len(src.shape(k)) == 2
    }


def diffusers_image(
    folder: Path,
    loras: list[tuple[Path, float]],
    prompt: str,
    *,
    height: int,
    width: int,
    steps: int,
    latents: np.ndarray,
    guidance: float = 3.5,
    max_sequence_length: int | None = None,
) -> np.ndarray:
    """diffusers' FluxPipeline image (uint8) with `loras` loaded through load_lora_weights + set_adapters."""
    import torch
    from diffusers import FluxPipeline

    with _quiet():
        pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        names = [f"lora{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        if loras:
            pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.set_progress_bar_config(disable=True)
    return run_pipeline(
        pipe,
        prompt,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        latents=latents,
        max_sequence_length=max_sequence_length,
    )

"""The transformer sizes the benchmarks use, as diffusers config dicts, with each size's image side and
text lengths. Free of MLX, so that a PyTorch-only process (diffusers' side of train.py and of
`steps.py --anchor`) can read them."""


def _flux_config(
    hidden_heads: tuple[int, int], depth: tuple[int, int], axes: tuple, context: int, vec: int
) -> dict:
    heads, head_dim = hidden_heads
    return {
        "in_channels": 64,
        "num_layers": depth[0],
        "num_single_layers": depth[1],
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": context,
        "pooled_projection_dim": vec,
        "axes_dims_rope": list(axes),
    }


FLUX = {
    "full": _flux_config((24, 128), (19, 38), (16, 56, 56), 4096, 768),  # FLUX.1's released sizes
    "mid": _flux_config((4, 128), (2, 4), (16, 56, 56), 1024, 768),
    "tiny": _flux_config((2, 64), (1, 1), (8, 28, 28), 64, 64),
}
RES = {"full": 1024, "mid": 256, "tiny": 64}  # image side in pixels
TXT = {  # T5 tokens per variant (FLUX.1's: schnell 256, dev 512)
    "full": {"schnell": 256, "dev": 512},
    "mid": {"schnell": 64, "dev": 128},
    "tiny": {"schnell": 16, "dev": 32},
}

"""The MLX runtime: FLUX.1's networks, sampler, generation engine, tokenizers, and the loading,
quantization and LoRA layers they need.

It imports only mlx, numpy, PIL, tokenizers and sentencepiece (the tokenizers), `mflux.errors`,
`mflux.backend` and `mflux.converters`, never the toolchain (store, manifest, catalog, hub, convert,
inspect, cli, server, trainer); `tests/test_layering.py` enforces that. Importing this package loads
nothing heavy.
"""

"""Record what the other MLX port's saver writes for a full-size FLUX.1: tests/othermflux_layout.json.gz.

Run it with that project (PyPI `mflux==0.24.0`, unrelated to ours despite the name) in its own virtual
environment, never in ours, where it would shadow this package:

    python3 -m venv /tmp/othermflux && /tmp/othermflux/bin/pip install mflux==0.24.0 'mlx[cpu]==0.32.2'
    /tmp/othermflux/bin/python tests/record_othermflux_layout.py tests/othermflux_layout.json.gz

Its modules are built at full size and quantized as its loader does (`nn.quantize` with its FLUX.1
predicate), then its own `ModelSaver.save_model` runs with `mx.save_safetensors` replaced by a recorder:
MLX arrays are lazy, so nothing is computed and only names, dtypes, shapes, file names and metadata
are kept. (Freshly built modules are float32; a save of loaded weights holds bfloat16 there.)
"""

import gzip
import json
import sys
import tempfile

import mlx.core as mx
import mlx.nn as nn

from mflux.models.common.config.model_config import ModelConfig
from mflux.models.common.weights.saving.model_saver import ModelSaver
from mflux.models.flux.model.flux_text_encoder.clip_encoder.clip_encoder import CLIPEncoder
from mflux.models.flux.model.flux_text_encoder.t5_encoder.t5_encoder import T5Encoder
from mflux.models.flux.model.flux_transformer.transformer import Transformer
from mflux.models.flux.model.flux_vae.vae import VAE
from mflux.models.flux.weights.flux_weight_definition import FluxWeightDefinition


class _Model:
    def __init__(self, config: ModelConfig):
        self.vae, self.t5_text_encoder, self.clip_text_encoder = VAE(), T5Encoder(), CLIPEncoder()
        self.transformer = Transformer(
            model_config=config, num_transformer_blocks=19, num_single_transformer_blocks=38
        )


def record(config: ModelConfig, bits: int) -> dict:
    model = _Model(config)
    for module in (model.vae, model.transformer, model.t5_text_encoder, model.clip_text_encoder):
        nn.quantize(module, class_predicate=FluxWeightDefinition.quantization_predicate, bits=bits)
    layout: dict = {}

    def save(path, arrays, metadata=None):
        component, file = path.split("/")[-2:]
        entry = layout.setdefault(component, {"files": {}, "tensors": {}})
        entry["files"][file] = metadata
        entry["tensors"].update(
            {k: [str(v.dtype).removeprefix("mlx.core."), list(v.shape)] for k, v in arrays.items()}
        )

    mx.save_safetensors = save
    with tempfile.TemporaryDirectory() as out:
        ModelSaver.save_model(model, bits, out, FluxWeightDefinition)
    return layout


if __name__ == "__main__":
    layouts = {"schnell-q4": record(ModelConfig.schnell(), 4), "dev-q8": record(ModelConfig.dev(), 8)}
    data = json.dumps(layouts, separators=(",", ":"), sort_keys=True).encode()
    with open(sys.argv[1], "wb") as f:
        f.write(gzip.compress(data, mtime=0))

"""LoRA fine-tuning of FLUX.1 (`mflux train`); `train(...)` is the Python API under the command."""

import sys
import types

from mflux.train.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]


class _CallableModule(types.ModuleType):
    # `mflux.train` is this package once imported (the import system sets the attribute), so the
    # documented `mflux.train(...)` calls the package, which calls the function.
    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

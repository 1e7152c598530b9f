"""mflux: FLUX.1 image generation and editing on Apple MLX."""

__version__ = "0.1.0"

_API = ("Flux1", "Config", "GeneratedImage", "StepEvent", "ImageEvent", "ReduxPrior", "PromptEmbeds")
__all__ = [*_API, "__version__", "train"]


def __getattr__(name: str):
    # The API pulls in mlx; keep `import mflux` (and so `mflux --help`) light.
    if name in _API:
        from mflux.backend import import_mlx

        import_mlx()  # a clear hint where MLX has no backend, before flux1 imports it
        from mflux import flux1

        return getattr(flux1, name)
    if name == "train":  # a callable package: mflux.train(model, data, output, ...)
        from mflux.backend import import_mlx

        import_mlx()
        import mflux.train

        return mflux.train
    raise AttributeError(f"module 'mflux' has no attribute {name!r}")

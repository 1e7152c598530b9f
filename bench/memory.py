"""Peak memory per phase of a pipeline run: images made as `mflux run --seed 1 2` makes them, with MLX's
allocator peak while the prompts encode (T5 and CLIP loaded), while the images denoise (the transformer
loaded, T5 and CLIP freed, then its modulation layers) and while they decode (the VAE; the transformer
freed before the last decode), as `Flux1` records them in each image; beside each, the preflight's
expected peak (mflux.fit) and the ratio measured / expected.

    python bench/memory.py --size tiny                          # a CPU
    python bench/memory.py --size full --quant bf16,q8,q4       # a GPU: each random model written first
    python bench/memory.py --folder ~/models/schnell            # a model you have

Without --folder each model is random and MLX-native, stored at each --quant, and written to --keep DIR
(kept, and reused when there) or a temporary folder (34 GB at full size in bf16: --tmp says where).
"""

from common import (
    DTYPES,
    QUANTS,
    SIZES,
    add_folder_arguments,
    add_image_arguments,
    add_model_arguments,
    describe,
    finish,
    folder_gb,
    free,
    make_images,
    model_folder,
    parser,
    report,
    report_env,
    split,
    table,
    tuned,
    tuning,
)

PHASES = ("text_encoding", "denoising", "decoding")


def expected(folder, args) -> dict:
    """The preflight's figure per phase (mflux.fit), in GB, for this run."""
    from mflux import fit
    from mflux.folders import open_folder

    model = open_folder(folder)
    precision = {v: k for k, v in DTYPES.items()}[args.dtype]
    plan = fit.plan_for(
        model.architecture,
        model.quantization,
        precision,
        None,
        height=args.res,
        width=args.res,
        text_tokens=model.defaults["max_sequence_length"],
    )
    return {k: v / 1e9 for k, v in fit.expected_peak(plan).items()}


def run(folder, args, tune: dict) -> None:
    free()
    with tuned(tune):
        images = make_images(folder, args, seeds=range(1, args.images + 1))
    last = images[-1][1]  # each image's record holds the run's peaks so far, per phase
    peaks = {k: v / 1e9 for k, v in last.peak_memory.items()}
    want = expected(folder, args)
    report(
        what="memory",
        stored=describe(folder)[1],
        images=args.images,
        res=args.res,
        steps=args.image_steps,
        peak_gb=max(peaks.values()),
        **{f"{k}_peak_gb": v for k, v in peaks.items()},
        expected_gb=max(want.values()),
        **{f"{k}_expected_gb": v for k, v in want.items()},
        s=images[-1][0],
        **{
            f"{c}_weights_gb": folder_gb(folder, c)
            for c in ("text_encoder", "text_encoder_2", "transformer", "vae")
        },
        **tuning(tune),
    )


def main(argv=None) -> None:
    p = parser(__doc__)
    add_model_arguments(p, default_size="full")
    add_folder_arguments(p)
    add_image_arguments(p)
    p.add_argument(
        "--quant", default="bf16,q8,q4", help="random models stored as bf16 (the float dtype), q8, q4"
    )
    p.add_argument("--images", type=int, default=2, help="images per run (default 2)")
    args = p.parse_args(argv)
    quants = split(p, "--quant", args.quant, ["bf16", *QUANTS])
    args = finish(p, args)
    args.res = args.res or SIZES[args.size].res
    report_env(args)
    for quant in [""] if args.folder else quants:
        with model_folder(args, "mlx", quant) as folder:
            for tune in args.tunings:
                run(folder, args, tune)
    from common import FIGURES

    rows = [
        [f"{f['stored']}" + (f" {f['tune']}" if f.get("tune") else ""), f"{f['peak_gb']:.3g}"]
        + [f"{f.get(f'{k}_peak_gb', 0):.3g}" for k in PHASES]
        + [
            f"{f['transformer_weights_gb']:.3g}",
            f"{f['expected_gb']:.3g}",
            f"{f['peak_gb'] / f['expected_gb']:.2f}",
        ]
        for f in FIGURES
        if f["what"] == "memory"
    ]
    table(
        [
            "model",
            "peak GB",
            *(f"{k} GB" for k in PHASES),
            "transformer's weights GB",
            "expected GB",
            "measured / expected",
        ],
        rows,
    )


if __name__ == "__main__":
    main()

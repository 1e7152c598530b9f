"""The `mflux` command: one click group whose commands are thin shells over library functions.

mlx, torch, transformers and huggingface_hub are imported inside command bodies only, so `mflux --help`
stays fast. A user-facing error (MfluxError) prints as `error: <message>` on one line, exit 1.
"""

import json
import re
import sys
import warnings
from datetime import datetime, timezone

import click

from mflux import __version__
from mflux.errors import Interrupted, MfluxError, ReportedElsewhere
from mflux.runtime.folder import VARIANTS
from mflux.runtime.quantization import AFFINE_BITS, GROUP_SIZES, MODES, QUANTIZABLE_COMPONENTS

DTYPES = ("bfloat16", "float16", "float32")


class MultiValueOption(click.Option):
    """An option taking one or more values, in both styles: `--seed 1 2 3` and `--seed 1 --seed 2`.

    Click options take a fixed number of values, so the parser's handler for this option is wrapped to
    also consume the following arguments up to the next option (negative numbers count as values).
    """

    def __init__(self, *args, **kwargs):
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser, ctx) -> None:
        super().add_to_parser(parser, ctx)
        for opt in self.opts:
            handler = parser._long_opt.get(opt) or parser._short_opt.get(opt)
            handler.process = _greedy(handler.process)


def _greedy(process):
    def consume(value, state):
        process(value, state)
        while state.rargs and _is_value(state.rargs[0]):
            process(state.rargs.pop(0), state)

    return consume


def _is_value(arg: str) -> bool:
    if not arg.startswith("-"):
        return True
    try:
        float(arg)
        return True
    except ValueError:
        return False


class MfluxGroup(click.Group):
    """The group, with errors as one line: `error: <message>` on stderr and no traceback."""

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)  # in the order a user meets them, not alphabetical

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        warnings.formatwarning = _one_line_warning
        try:
            code = super().main(args, prog_name or "mflux", complete_var, standalone_mode=False, **extra)
        except ReportedElsewhere:
            sys.exit(1)
        except MfluxError as e:
            _fail(str(e), 130 if isinstance(e, Interrupted) else 1)
        except ImportError as e:
            if not (e.name or "").startswith("mlx") and "libmlx" not in str(e):
                raise
            from mflux.backend import BACKEND_HINT

            _fail(BACKEND_HINT, 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except click.exceptions.Abort as e:
            if isinstance(e.__cause__, KeyboardInterrupt):
                _fail("interrupted", 130)
            _fail("aborted", 1)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message())
            sys.exit(0)
        except click.UsageError as e:
            # exit 1 like every other refusal (click's own is 2): a script tells only success from failure
            hint = f" (see: {e.ctx.command_path} --help)" if e.ctx else ""
            _fail(_usage_message(e) + hint, 1)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def _fail(message: str, code: int):
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _usage_message(e: click.UsageError) -> str:
    """Click's usage errors in mflux's words: the flag, what it takes, and what was given."""
    if isinstance(e, click.MissingParameter) and e.param is not None:
        return f"missing {_flag(e.param)}"
    if isinstance(e, click.BadParameter) and e.param is not None:
        return _bad_value(e.param, e.message)
    if isinstance(e, click.NoSuchOption):
        close = f" (did you mean {_either(e.possibilities)}?)" if e.possibilities else ""
        return f"no such option {e.option_name}{close}"
    if isinstance(e, click.BadOptionUsage) and "requires" in e.message:
        return f"{e.option_name} needs a value"
    return _tidy(e.message)


# Click's wording of a bad value, "'abc' is not a valid integer." or "File '/tmp' is a directory.":
# the value given (quoted, or a bare number) and what click says about it.
_CLICK_BAD_VALUE = re.compile(
    r"^(?:(?:File|Directory|Path) )?(?P<got>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+) (?P<said>.*?)\.?$"
)


def _bad_value(param: click.Parameter, message: str) -> str:
    flag, kind = _flag(param), param.type
    words = _CLICK_BAD_VALUE.match(message)
    got, said = (words["got"], words["said"]) if words else ("", "")
    if isinstance(kind, click.Choice) and said.startswith("is not"):
        return f"{flag} must be one of {', '.join(map(str, kind.choices))}, got {got}"
    if isinstance(kind, (click.IntRange, click.FloatRange)) and said.startswith("is not in the range"):
        return f"{flag} must be {_range(kind)}, got {got}"
    if said == "is not a valid integer":
        return f"{flag} must be a whole number, got {got}"
    if said == "is not a valid float":
        return f"{flag} must be a number, got {got}"
    if isinstance(kind, click.Path) and said in _PATH_PROBLEMS:
        return f"{flag} {got} {_PATH_PROBLEMS[said]}"
    return f"{flag}: {_tidy(message)}"  # a callback's message, already in mflux's words


_PATH_PROBLEMS = {
    "is a directory": "is a folder; give a file",
    "is a file": "is a file; give a folder",
    "does not exist": "does not exist",
}


def _flag(param: click.Parameter) -> str:
    # as a user may have typed it: `-q/--quantize`, `--steps`, or an argument's metavar (`NAME|PATH`)
    if isinstance(param, click.Option):
        return "/".join(sorted(param.opts, key=len))
    return param.metavar or param.name.upper()


def _range(kind) -> str:
    if kind.min is not None and kind.max is not None and not (kind.min_open or kind.max_open):
        return f"from {kind.min} to {kind.max}"
    low = kind.min is not None and (f"above {kind.min}" if kind.min_open else f"at least {kind.min}")
    high = kind.max is not None and (f"below {kind.max}" if kind.max_open else f"at most {kind.max}")
    return " and ".join(part for part in (low, high) if part)


def _either(names: list[str]) -> str:
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _tidy(message: str) -> str:
    # "Got unexpected extra argument (x)." -> "got unexpected extra argument (x)"
    message = message.rstrip(".")
    return message[:1].lower() + message[1:]


def _interactive() -> bool:
    return sys.stdin.isatty()


def _int_choice(values) -> dict:
    # click.Choice compares strings on click 8.1; convert after choosing.
    return {
        "type": click.Choice([str(v) for v in values]),
        "callback": lambda ctx, param, v: None if v is None else int(v),
    }


def _check_name(ctx, param, value):
    if value is None:
        return None
    from mflux.store import validate_name

    try:
        return validate_name(value)
    except MfluxError as e:
        raise click.BadParameter(str(e)) from None


def _check_components(ctx, param, value):
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if p not in QUANTIZABLE_COMPONENTS]
    if bad or not parts:
        raise click.BadParameter(
            f"{', '.join(bad) or 'nothing'} is not quantizable (choose from {', '.join(QUANTIZABLE_COMPONENTS)})"
        )
    return tuple(parts)


def _check_devices(ctx, param, value):
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise click.BadParameter(f"{value!r} is not a list of GPU numbers (like 0,1)")
    return tuple(int(p) for p in parts)


def _split_hosts(ctx, param, value):
    if value is None:
        return ()
    names = tuple(p.strip().lower() for p in value.split(","))
    bad = [n for n in names if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", n)]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not a host name (give names like box.lan,studio.local)")
    return names


@click.group(name="mflux", cls=MfluxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mflux")
def cli():
    """FLUX.1 text-to-image on Apple MLX, with a local model store ($MFLUX_HOME, default ~/.mflux).

    \b
    Examples:
      mflux pull schnell
      mflux run --model schnell-q8 --prompt "Luxury food photograph"
      mflux list
    """


@cli.command()
@click.argument("model_or_repo", metavar="MODEL_OR_REPO")
@click.option(
    "--name", callback=_check_name, help="Store name (default: the catalog name, or the repo's name)."
)
@click.option("--revision", help="Branch, tag or commit (default: the catalog's pinned commit, else main).")
@click.option("--dry-run", is_flag=True, help="Print the files and the total size; download nothing.")
@click.option("--force", is_flag=True, help="Replace an existing model of the same name.")
def pull(model_or_repo, name, revision, dry_run, force):
    """Download a model from the Hugging Face Hub into the store.

    MODEL_OR_REPO is a catalog name (see: mflux list --available) or a Hub repo (org/name) in FLUX.1
    diffusers layout, or a FLUX.1 model saved by the other MLX port (PyPI mflux 0.x: numbered shards,
    quantized or not), which is converted to an MLX-native model as it lands. canny-lora and depth-lora
    are Control LoRAs for dev: one LoRA file each, used as --lora-paths canny-lora.

    \b
    Examples:
      mflux pull schnell
      mflux pull dev --dry-run
      mflux pull redux
      mflux pull canny-lora
      mflux pull some-org/flux-finetune --name finetune
    """
    from mflux.hub import pull as hub_pull

    result = hub_pull(model_or_repo, name=name, revision=revision, dry_run=dry_run, force=force)
    if dry_run:
        click.echo(result.describe())


@cli.command()
@click.option(
    "--prompt",
    "-p",
    help='What to draw; "" is a prompt too, as in diffusers (or give --prompt-file or --from; with --redux '
    "it may be left out).",
)
@click.option(
    "--negative-prompt",
    help="What to steer away from, with true CFG: two transformer passes a step, so each step takes "
    "about twice as long. Alone it uses --true-cfg 4.0, the scale diffusers' FluxPipeline documents.",
)
@click.option(
    "--true-cfg",
    type=float,
    help="True CFG scale, above 1, with --negative-prompt (default 4.0): v = v_neg + S * (v_pos - v_neg). "
    "Works on schnell and dev; on dev it adds to the distilled --guidance.",
)
@click.option(
    "--model",
    "-m",
    help="A store model (default: schnell, pulled when missing: about 34 GB); `<name>-q<bits>` quantizes a "
    "stored <name> at load time.",
)
@click.option("--path", type=click.Path(file_okay=False), help="Run a model folder that is not in the store.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default="image.png",
    show_default=True,
    help="The image file (.png), in a folder that exists; several images get `_seed_<seed>` (and `_line<N>` from a prompt file). "
    "An existing file is never overwritten: the next free `_1`, `_2`... name is used.",
)
@click.option(
    "--seed",
    cls=MultiValueOption,
    type=int,
    metavar="SEED...",
    help="One or more seeds in 0..2**64-1, one image each (default: one random seed).",
)
@click.option("-n", "count", type=int, metavar="N", help="Make N images from N random seeds.")
@click.option(
    "--batch-size",
    type=int,
    help="Denoise up to this many images at once (default: 1 on a CPU or a Mac, up to 4 on CUDA). "
    "A batched image equals the same seed made alone.",
)
@click.option("--height", type=int, help="A multiple of 16 (default 1024, or the --image's height).")
@click.option("--width", type=int, help="A multiple of 16 (default 1024, or the --image's width).")
@click.option(
    "--steps", type=int, help="Denoising steps (default: schnell 4, dev and krea 25, kontext 28, fill 50)."
)
@click.option(
    "--guidance",
    type=float,
    help="Distilled guidance, not schnell (default: dev and krea 3.5, fill 30 as FluxFillPipeline, "
    "kontext 2.5 as Black Forest Labs recommend; diffusers' FluxKontextPipeline defaults to 3.5).",
)
@click.option(
    "--image",
    type=click.Path(dir_okay=False),
    help="An init image: img2img (with --mask, inpainting); with -m fill the image to inpaint or "
    "outpaint; with -m kontext the image to edit by the prompt's instruction. Scaled to cover the size "
    "and centre-cropped; without --width/--height the size is the image's, rounded down to multiples of "
    "16 (kontext: the trained resolution nearest its aspect ratio, about 1 megapixel).",
)
@click.option(
    "--mask",
    type=click.Path(dir_okay=False),
    help="Inpainting mask, the size of --image: white is repainted, black kept (not with kontext).",
)
@click.option(
    "--strength",
    type=float,
    help="How much of --image to repaint, in (0, 1] (default 0.6; fill 1.0): 1.0 starts from pure "
    "noise, as in diffusers (upstream mflux had this the other way round). Not with kontext.",
)
@click.option(
    "--control",
    type=click.Path(dir_okay=False),
    help="With -m canny or -m depth (or -m dev with a Control LoRA: --lora-paths canny-lora or "
    "depth-lora): the edge or depth map the image follows (white edges on black; a "
    "depth map from any estimator), resized to the output; without --width/--height the size is its own.",
)
@click.option(
    "--control-from",
    type=click.Path(dir_okay=False),
    metavar="PHOTO",
    help="With -m canny (or -m dev with --lora-paths canny-lora) and --canny: compute the edge map of PHOTO "
    "(as OpenCV's cv2.Canny, before anything loads) and follow it, as --control would. -m depth takes a "
    "ready depth map (--control).",
)
@click.option("--canny", is_flag=True, help="With --control-from: the edge detector (Canny, 3x3 Sobel, L1).")
@click.option(
    "--canny-thresholds",
    callback=lambda ctx, param, value: _thresholds(value),
    metavar="LOW,HIGH",
    help="With --canny: the hysteresis thresholds (default 50,200, as Black Forest Labs' reference).",
)
@click.option(
    "--save-control",
    is_flag=True,
    help="With --control-from: also write the edge map beside the first image that follows it, as "
    "<image stem>_control.png (e.g. image_control.png).",
)
@click.option(
    "--redux",
    cls=MultiValueOption,
    type=click.Path(dir_okay=False),
    metavar="IMAGE...",
    help="FLUX.1 Redux, with -m schnell or dev: reference images whose SigLIP tokens follow the prompt's T5 "
    "tokens (512 of them, also on schnell), as diffusers' FluxPriorReduxPipeline. Without --prompt, the "
    "images alone (the T5 tokens and pooled vector are zeros, not an empty prompt's). Uses the store "
    "entry `redux`, pulled when missing (or --redux-model). Not with --negative-prompt yet.",
)
@click.option(
    "--redux-scale",
    cls=MultiValueOption,
    type=float,
    metavar="S...",
    help="One scale per --redux image, or one for all (default 1.0): each image's whole sequence, the "
    "prompt part included, and its pooled vector are scaled and the sequences summed, as diffusers' "
    "prompt_embeds_scale and pooled_prompt_embeds_scale.",
)
@click.option(
    "--redux-model",
    metavar="NAME|PATH",
    help="With --redux: a store entry (default: redux) or a folder laid out as FLUX.1-Redux-dev.",
)
@click.option(
    "--expand",
    callback=lambda ctx, param, value: _margins(value),
    metavar="L,T,R,B",
    help="With -m fill: outpaint, extending --image by LEFT,TOP,RIGHT,BOTTOM pixels (multiples of 16); "
    "the new border is what is painted.",
)
@click.option(
    "--prompt-file",
    type=click.Path(dir_okay=False),
    help="One prompt a line, or JSON lines with per-line settings (prompt, negative_prompt, seed(s), "
    "steps, width, height, guidance, true_cfg, image, mask, strength, loras); flags give the defaults.",
)
@click.option(
    "--from",
    "-C",
    "from_image",
    type=click.Path(dir_okay=False),
    help="Reuse the settings of an earlier image (mflux's PNG, its .json, or A1111 parameters); "
    "flags given override them.",
)
@click.option(
    "--stepwise",
    type=click.Path(),
    metavar="DIR",
    help="Write each step's decoded image to DIR, and a strip of them all, labelled by step. Each costs one VAE decode: "
    "at 1024x1024 on an H100 0.081 s, half a schnell step (docs/PERFORMANCE.md).",
)
@click.option(
    "--stepwise-every",
    type=int,
    metavar="K",
    help="With --stepwise: decode only every K-th step and the last, for K times fewer decodes.",
)
@click.option("--quantize", "-q", **_int_choice(AFFINE_BITS), help="Quantize at load time to this many bits.")
@click.option(
    "--lora-paths",
    cls=MultiValueOption,
    type=click.Path(dir_okay=False),
    metavar="PATH...",
    help="LoRA .safetensors files to apply, or LoRAs pulled into the store, by name (canny-lora, depth-lora).",
)
@click.option(
    "--lora-scales",
    cls=MultiValueOption,
    type=float,
    metavar="SCALE...",
    help="One scale per LoRA (default 1.0).",
)
@click.option(
    "--variant",
    type=click.Choice(tuple(VARIANTS)),
    help="With --path: the FLUX.1 variant, where the folder can't tell (krea's folder is dev's; a "
    "folder without model_index.json can't tell kontext from dev; canny's and depth's are alike).",
)
@click.option("--metadata", is_flag=True, help="Also write the parameters to <output stem>.json.")
@click.option("--precision", type=click.Choice(DTYPES), help="Default: float32 on a CPU, else bfloat16.")
@click.option("--no-pull", is_flag=True, help="Never download: fail if the model is not in the store.")
@click.option(
    "--verify",
    is_flag=True,
    help="Re-hash every file of a stored model against its manifest first (always checked: sizes, and "
    "the sha256 of a file newer than the manifest, once).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (files, seeds, seconds).")
@click.option("--verbose", is_flag=True, help="Report peak memory for each phase.")
@click.option(
    "--low-memory",
    is_flag=True,
    help="Load one component at a time and free it after use, T5 at 4 bits, the VAE decoded in bands, "
    "MLX's cache kept small. Images equal the default path's where every component has the same "
    "quantization (with -q 4 or lower; otherwise only T5's 4 bits differ).",
)
@click.option(
    "--ignore-memory",
    is_flag=True,
    help="Run even where the expected peak memory exceeds what this machine can use (it may swap or "
    "fail); without it such a run is refused before anything is pulled or loaded.",
)
@click.option(
    "--parallel",
    type=click.Choice(["data", "sequence"]),
    default="data",
    show_default=True,
    help="Under mlx.launch: split the images over the ranks (data), or spread each image's transformer "
    "over them (sequence). One process ignores it.",
)
@click.pass_context
def run(ctx, seed, count, lora_paths, lora_scales, redux, redux_scale, no_pull, **flags):
    """Generate images from a prompt, a prompt file or an earlier image's settings.

    Every setting is checked before the model is pulled or loaded. At the end it prints one line per
    image (file, seed, seconds: its batch's time shared among the batch) and the total.

    \b
    Examples:
      mflux run --model schnell-q8 --prompt "Luxury food photograph"
      mflux run -m dev --prompt "A lighthouse at dusk" --steps 20 --seed 1 2 3 --batch-size 3
      mflux run -m dev --prompt "A portrait" --negative-prompt "blurry, lowres" --true-cfg 4
      mflux run -m schnell --prompt "A watercolor fox" --image photo.png --strength 0.7
      mflux run -m schnell --prompt "A red door" --image house.png --mask door.png --strength 1
      mflux run -m kontext --image photo.png --prompt "make it a snowy winter evening"
      mflux run -m fill --image photo.png --mask mask.png --prompt "a red vintage car"
      mflux run -m fill --image photo.png --expand 0,0,256,0 --prompt "the beach continues"
      mflux run -m krea --prompt "a lighthouse at dusk"
      mflux run -m canny --control edges.png --prompt "a futuristic city at night"
      mflux run -m canny --control-from photo.png --canny --save-control --prompt "a city at night"
      mflux run -m dev --redux ref.png --redux ref2.png --redux-scale 0.7 0.3 --prompt "in winter"
      mflux run -m dev --lora-paths canny-lora --control edges.png --prompt "a futuristic city"
      mflux run -m schnell --prompt-file prompts.jsonl -n 2 --json
      mflux run --from image.png --seed 7 --stepwise steps/
    """
    from click.core import ParameterSource

    from mflux.run import run as run_model

    given = {p for p in ctx.params if ctx.get_parameter_source(p) is ParameterSource.COMMANDLINE}
    explicit = {_SETTING.get(p, p) for p in given}
    run_model(
        seeds=list(seed),
        n=count,
        lora_paths=list(lora_paths),
        lora_scales=list(lora_scales),
        redux=list(redux),
        redux_scales=list(redux_scale),
        pull=not no_pull,
        explicit=explicit,
        **flags,
    )


def _margins(value: str | None) -> tuple[int, ...] | None:
    """`--expand L,T,R,B` as four integers; their range is mflux.settings' to check."""
    if value is None:
        return None
    try:
        margins = tuple(int(v) for v in value.split(","))
    except ValueError:
        margins = ()
    if len(margins) != 4:
        raise click.BadParameter(
            f"{value!r} is not LEFT,TOP,RIGHT,BOTTOM (four whole numbers, e.g. 0,0,256,0)"
        )
    return margins


def _thresholds(value: str | None) -> tuple[float, float] | None:
    """`--canny-thresholds LOW,HIGH` as two numbers; their range is mflux.canny's to check."""
    if value is None:
        return None
    try:
        pair = tuple(float(v) for v in value.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise click.BadParameter(f"{value!r} is not LOW,HIGH (two numbers, e.g. 50,200)")
    return pair


# `mflux run` flag -> the Settings field it sets (mflux.settings), where the names differ
_SETTING = {"seed": "seeds", "lora_paths": "loras", "lora_scales": "loras", "redux_scale": "redux_scales"}


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per model.")
@click.option(
    "--available",
    is_flag=True,
    help="Show the models `mflux pull` knows, with download sizes and the expected peak memory of a "
    "1024x1024 image on this machine's backend, unquantized, at 8 and at 4 bits.",
)
def list_(as_json, available):
    """List the models in the store.

    \b
    Examples:
      mflux list
      mflux list --json
      mflux list --available
    """
    from mflux.store import Store

    store = Store()
    if available:
        _list_available(store, as_json)
        return
    models = store.list()
    if as_json:
        click.echo(json.dumps([_model_json(m) for m in models], indent=2))
    else:
        rows = [("NAME", "FORMAT", "QUANT", "SIZE", "MODIFIED")]
        rows += [_model_row(m) for m in models]
        click.echo(_columns(rows))
        if not models and not store.broken():
            click.echo(f"the store {store.root} is empty (get a model with: mflux pull schnell)", err=True)
    for m in models:
        if m.damaged:
            click.echo(f"warning: {m.damage_hint()}", err=True)
    for name, why in store.broken().items():
        click.echo(f"warning: {name} is not a usable model: {why}", err=True)


def _model_json(m) -> dict:
    from mflux.manifest import quantization_summary

    man = m.manifest
    return {
        "name": m.name,
        "kind": man.kind,
        "format": man.format,
        "variant": man.variant,
        "family": man.family,
        "dtype": man.dtype,
        "quantization": quantization_summary(man.quantization),
        "size_bytes": m.size_bytes,
        "damaged": m.damaged,
        "modified": m.modified.isoformat(timespec="seconds"),
        "source": man.source,
        "path": str(m.path),
    }


def _model_row(m) -> tuple:
    from mflux.manifest import quantization_label
    from mflux.store import format_size

    man = m.manifest
    return (
        m.name,
        "lora" if man.kind == "lora" else man.format,  # a LoRA file, for --lora-paths
        quantization_label(man.quantization),
        format_size(m.size_bytes),
        _ago(m.modified),
    )


def _list_available(store, as_json: bool) -> None:
    from dataclasses import asdict

    from mflux.catalog import catalog
    from mflux.fit import catalog_peaks, gb
    from mflux.store import format_size

    entries = catalog().values()
    peaks = {e.name: catalog_peaks(e) for e in entries}
    if as_json:
        click.echo(
            json.dumps(
                [
                    {**asdict(e), "stored": store.exists(e.name), "peak_bytes_1024": peaks[e.name]}
                    for e in entries
                ],
                indent=2,
            )
        )
        return
    rows = [("NAME", "REPO", "DOWNLOAD", "GATED", "LICENSE", "STORED", "PEAK 1024² (-/Q8/Q4)")]
    for e in entries:
        size = f"~{format_size(e.download_size_bytes)}" + (" (est.)" if e.size_estimated else "")
        # a LoRA file or Redux's encoder is not a model to run: no peak of its own
        peak = "/".join(gb(v, unit=False) for v in peaks[e.name].values()) + " GB" if peaks[e.name] else "-"
        row = (e.name, e.repo, size, "yes" if e.gated else "no", e.license, _yes(store.exists(e.name)), peak)
        rows.append(row)
    click.echo(_columns(rows))
    click.echo(
        "PEAK: the expected peak memory of one 1024x1024 image on this backend, unquantized / -q8 / -q4 "
        "(mflux.fit; an estimate)",
        err=True,
    )
    if any(e.size_estimated for e in entries):
        click.echo(
            "(est.): an estimate, not read from the repo's files (the exact size: mflux pull NAME --dry-run)",
            err=True,
        )


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _columns(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _ago(when: datetime) -> str:
    seconds = max(0, (datetime.now(timezone.utc) - when).total_seconds())
    for unit, size in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("week", 7 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    ):
        n = int(seconds // size)
        if n >= 1:
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


@cli.command("inspect")
@click.argument("target", metavar="NAME|PATH")
@click.option("--tensors", is_flag=True, help="List every tensor's name, shape and dtype.")
@click.option("--verify", is_flag=True, help="Re-hash every file against the manifest; exit 1 on a mismatch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_(target, tensors, verify, as_json):
    """Show a model's manifest, sizes, dtypes and quantization.

    A store model's name is taken as that model; anything else as a path: a model folder
    (diffusers or MLX layout) or a single .safetensors file.

    \b
    Examples:
      mflux inspect schnell
      mflux inspect schnell-q8 --verify
      mflux inspect ./flux1-dev.safetensors --tensors --json
    """
    from pathlib import Path

    from mflux.inspector import format_inspect, inspect
    from mflux.manifest import remake_hint

    report = inspect(target, tensors=tensors, verify=verify)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_inspect(report))
    if report.get("damaged") and not verify:
        shown = "; ".join(report["damaged"][:3])
        raise MfluxError(
            f"{target} is damaged ({shown}) (see every file: mflux inspect {target} --verify; then "
            f"{remake_hint(Path(report['path']))})"
        )
    if verify and not report["verify"]["ok"]:
        bad = report["verify"]["mismatches"]
        shown = "; ".join(f"{m['path']}: {m['problem']}" for m in bad[:3])
        raise MfluxError(
            f"{len(bad)} of {report['verify']['files']} files do not match the manifest ({shown}); the model "
            f"was damaged or changed: {remake_hint(Path(report['path']))}"
        )


@cli.command()
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
def rm(names, yes):
    """Remove models from the store, and report the space freed.

    Asks for confirmation only when stdin is a terminal.

    \b
    Examples:
      mflux rm dev-q4
      mflux rm schnell schnell-q8 -y
    """
    from mflux.store import Store, format_size

    store = Store()
    store.check_root()
    for name in names:
        if not store.path(name).is_dir():
            store.get(name)  # raises: unknown model, with close names
    if not yes and _interactive():
        click.confirm(f"Remove {', '.join(names)} from {store.root}?", abort=True)
    freed = store.remove(names)
    click.echo(f"removed {', '.join(dict.fromkeys(names))} (freed {format_size(freed)})")


@cli.command()
@click.argument("source")
@click.option(
    "--name",
    callback=_check_name,
    help="Store name (default: <source name>-mlx; with --bits, <source name>-q<bits>).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="bfloat16",
    show_default=True,
    help="Weights dtype (T5 stays in bfloat16 or float32: float16 overflows in it).",
)
@click.option(
    "--base",
    help="For a single file: where its tokenizers and configs, and the text encoders and VAE it lacks, "
    "come from (schnell, dev, or a folder; default: the schnell or dev model in the store).",
)
@click.option(
    "--variant",
    type=click.Choice(tuple(VARIANTS)),
    help="The FLUX.1 variant, where the files can't tell: a Kontext or Krea single file has dev's "
    "exact tensors and reads as dev without it (schnell, dev and fill are read from the tensors); a "
    "Krea folder has dev's exact files. A store model's variant is its manifest's.",
)
@click.option(
    "--bits",
    **_int_choice(AFFINE_BITS),
    help="Quantize while converting to affine q<bits>, as mflux quantize does.",
)
@click.option("--group-size", **_int_choice(GROUP_SIZES), help="Weights per scale with --bits (default 64).")
@click.option(
    "--keep-gguf-quantization",
    is_flag=True,
    help="For a GGUF file: store its Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights as they are, in MLX's group-32 "
    "affine layout with float32 scales (exact; bfloat16 scales would round each block's scale to 8 "
    "significant bits). K-type weights (Q4_K ...) are always dequantized.",
)
@click.option("--force", is_flag=True, help="Replace an existing model of the same name.")
def convert(source, name, dtype, base, variant, bits, group_size, keep_gguf_quantization, force):
    """Convert weights to the MLX-native format, as a new store model.

    SOURCE is a store model of format hf, a diffusers-layout folder, or a single-file checkpoint, its
    format read from its content, never its name: a .safetensors in bf16, fp16, fp32 or float8
    (e4m3fn, e5m2, "scaled fp8") with Black Forest Labs, ComfyUI (model.diffusion_model.) or
    diffusers names, the transformer alone or ComfyUI's all-in-one (text encoders and VAE in the same
    file); or a FLUX.1 GGUF transformer (needs the gguf package: pip install gguf). Every tensor is
    rounded once to --dtype from its exact value (float32 keeps float8 and GGUF blocks exactly). A
    quantized model is MLX-native already: it is refused.

    \b
    Examples:
      mflux convert schnell
      mflux convert ./flux1-dev.safetensors --base dev --name my-dev
      mflux convert ./flux1-dev-fp8.safetensors --base dev --bits 8
      mflux convert ./flux1-kontext-dev.safetensors --base dev --variant kontext
      mflux convert ./flux1-dev-Q8_0.gguf --base dev --keep-gguf-quantization
    """
    from mflux.convert import convert as convert_model

    convert_model(
        source,
        name=name,
        dtype=dtype,
        base=base,
        variant=variant,
        bits=bits,
        group_size=group_size,
        keep_gguf_quantization=keep_gguf_quantization,
        force=force,
    )


@cli.command("import")
@click.argument("folder")
@click.option(
    "--name",
    callback=_check_name,
    help="Store name (default: as a pull names the repo, else the folder's name).",
)
@click.option("--copy", is_flag=True, help="Copy (or clone) every file; never hard-link.")
@click.option(
    "--variant",
    type=click.Choice(tuple(VARIANTS)),
    help="The FLUX.1 variant, where the files can't tell (a Krea folder has dev's exact files).",
)
@click.option("--force", is_flag=True, help="Replace an existing model of the same name.")
def import_(folder, name, copy, variant, force):
    """Add a model folder on disk to the store as it is, without copying where the disk allows.

    FOLDER is a diffusers-layout FLUX.1 folder (a Hugging Face cache snapshot included: its
    symlinks are resolved to the files in blobs/) or an MLX-native one. Its layout, configs and
    safetensors headers are checked and every file's sha256 is recorded. Each file is placed by a
    copy-on-write clone (APFS, btrfs, xfs), else a hard link, else a copy; nothing is moved, so a
    Hugging Face cache stays whole, and `mflux rm` never deletes the original files.

    A hard-linked file is the original: editing it in place changes the stored model too. The store
    notices (a file's size, or an mtime newer than the manifest, has it re-hashed when the model
    opens) and refuses the model as damaged. --copy avoids sharing.

    \b
    Examples:
      mflux import ~/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-schnell/snapshots/*
      mflux import ./FLUX.1-dev --name dev --copy
    """
    from mflux.importer import import_model

    import_model(folder, name=name, copy=copy, variant=variant, force=force)


@cli.command()
@click.argument("model", required=False)
@click.option("--bits", **_int_choice(AFFINE_BITS), help="Bits per weight (affine).")
@click.option("--group-size", **_int_choice(GROUP_SIZES), help="Weights per scale (affine; default 64).")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="affine",
    show_default=True,
    help="affine, or an fp mode with its own bits and group size.",
)
@click.option(
    "--name",
    callback=_check_name,
    help="Store name (default: <model>-q<bits>, <model>-q<bits>-g<group size> when not 64, or <model>-<mode>).",
)
@click.option("--dtype", type=click.Choice(DTYPES), help="Dtype of the scales and unquantized layers.")
@click.option(
    "--components",
    callback=_check_components,
    metavar="LIST",
    help=f"Comma-separated, from {', '.join(QUANTIZABLE_COMPONENTS)} (default: all).",
)
@click.option("--force", is_flag=True, help="Replace an existing model of the same name.")
def quantize(model, bits, group_size, mode, name, dtype, components, force):
    """Quantize a stored model into a new store model.

    MODEL defaults to the model most recently pulled or converted, if unquantized; after a quantize,
    to the store model that one was made from.

    \b
    Examples:
      mflux quantize schnell --bits 8
      mflux quantize dev --bits 4 --components transformer,text_encoder_2
      mflux quantize dev --mode mxfp4
    """
    from mflux.convert import quantize as quantize_model

    quantize_model(
        model,
        bits=bits,
        group_size=group_size,
        mode=mode,
        name=name,
        dtype=dtype,
        components=list(components) if components else None,
        force=force,
    )


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="A TOML or JSON file of these options; flags override it.",
)
@click.option("--model", "-m", help="A store model (schnell, dev, NAME) or a model folder.")
@click.option("--data", help="A folder of images with same-named .txt captions, or a metadata.jsonl.")
@click.option("--output", "-o", help="The LoRA to write (.safetensors).")
@click.option("--steps", type=int, help="Training steps (default 1000).")
@click.option("--rank", type=int, help="LoRA rank (default 16).")
@click.option("--alpha", type=float, help="LoRA alpha (default: the rank, so scale 1).")
@click.option("--lr", type=float, help="AdamW learning rate (default 1e-4).")
@click.option("--batch-size", type=int, help="Images per step (default 1).")
@click.option("--resolution", type=int, help="Square training size, a multiple of 16 (default 512).")
@click.option(
    "--targets", help="Comma-separated: attn (default), mlp, text, linear2, or diffusers module names."
)
@click.option("--trigger", help="A word prepended to every caption.")
@click.option("--seed", type=int, help="Seed of the initial LoRA, the noise and the data order (default 0).")
@click.option(
    "--quantize", "-q", **_int_choice((4, 8)), help="QLoRA: quantize the frozen base to 4 or 8 bits."
)
@click.option(
    "--checkpoint-every", type=int, help="Steps between checkpoints (default 250; 0: at the end only)."
)
@click.option("--keep-checkpoints", type=int, help="Checkpoints kept, the latest (default 3).")
@click.option(
    "--resume",
    help="A checkpoint (step-*.safetensors) or a run's work folder to continue, with its settings "
    "(model, data and output included, so those flags may be left out).",
)
@click.option("--validation-prompt", help="Draw this prompt at a fixed seed during training.")
@click.option("--validation-every", type=int, help="Steps between validation images (default: at the end).")
@click.option("--max-sequence-length", type=int, help="T5 tokens (default: schnell 256, dev 512).")
@click.option("--precision", type=click.Choice(DTYPES), help="Default: float32 on a CPU, else bfloat16.")
@click.option(
    "--work-dir", help="Where the cache, checkpoints, logs and images go (default: <output>.train)."
)
@click.option("--force", is_flag=True, default=None, help="Replace an existing output.")
def train(config_file, **flags):
    """Train a LoRA on a folder of captioned images.

    The images are encoded once (VAE, T5, CLIP) into a cache, the encoders freed, and the LoRA
    trained with gradient checkpointing. Ctrl-C saves a checkpoint; --resume continues exactly, with
    the run's recorded settings (given again, only --steps, validation, checkpointing and the paths
    may change).
    Under mlx.launch -n N each batch is split over the ranks (--batch-size a multiple of N) and the
    gradients averaged; rank 0 writes the files.

    \b
    Examples:
      mflux train --model dev --data ./photos --output me.safetensors --trigger sks --steps 1000
      mflux train --config train.toml --steps 2000
      mflux train --resume me.train --steps 2000
      mlx.launch --backend nccl -n 4 -- mflux train --config train.toml --batch-size 4
    """
    from mflux.train.trainer import Stopped, read_config_file, summary
    from mflux.train.trainer import train as train_lora

    options = read_config_file(config_file) if config_file else {}
    options |= {k: v for k, v in flags.items() if v is not None}
    try:
        result = train_lora(
            **{"progress": True, **options}
        )  # a bar on a terminal, else a line every few steps
    except Stopped:
        raise click.exceptions.Exit(130) from None  # Ctrl-C: the trainer said what it saved, in one line
    if result.rank == 0:  # under mlx.launch the other ranks stay quiet
        click.echo(summary(result))


@cli.command()
@click.option(
    "--model", "-m", callback=_check_name, help="Store model to load at start (a request may name another)."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; other than loopback, use --api-key.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=7860,
    show_default=True,
    help="A1111's port, what clients expect.",
)
@click.option(
    "--api-key",
    envvar="MFLUX_API_KEY",
    help="Require this key on every route but /health [env: MFLUX_API_KEY].",
)
@click.option(
    "--lora-dir",
    type=click.Path(file_okay=False, exists=True),
    help="Folder of LoRA .safetensors clients choose from by name.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    help="Where response_format=url images go (default: a temporary folder).",
)
@click.option(
    "--queue",
    type=click.IntRange(1, 1000),
    default=16,
    show_default=True,
    help="Jobs that may wait; past it, 429.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    help="Seconds a request may take, queued time included.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker processes, each with its own copy of the model [default: 1, a thread of the server]. "
    "On CUDA, one per GPU from 0; elsewhere they share the one device.",
)
@click.option(
    "--devices",
    callback=_check_devices,
    help="CUDA GPUs, one worker process each, like 0,1 (list a GPU twice for two workers on it).",
)
@click.option(
    "--allowed-hosts",
    callback=_split_hosts,
    help="Without --api-key, host names clients may use besides localhost and IP addresses, like "
    "box.lan,studio.local (a guard against DNS rebinding).",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="Each request loads one component at a time and frees it after use (T5 at 4 bits, the VAE "
    "decoded in bands): slower, since every request loads the model again, but a lower peak.",
)
@click.option(
    "--ignore-memory",
    is_flag=True,
    help="Start even where the --model's 1024x1024 image is expected to exceed this machine's memory.",
)
def serve(
    model,
    host,
    port,
    api_key,
    lora_dir,
    output_dir,
    queue,
    timeout,
    workers,
    devices,
    allowed_hosts,
    low_memory,
    ignore_memory,
):
    """Serve the OpenAI Images API, the A1111 API and a web page.

    One worker owns the model (or one per device, with --workers or --devices): requests queue first
    in, first out, and each goes to the next free worker.

    \b
    Examples:
      mflux serve --model schnell
      mflux serve --model dev-q8 --port 8080 --lora-dir ~/loras
      MFLUX_API_KEY=secret mflux serve --host 0.0.0.0 --model schnell
      mflux serve --model schnell --devices 0,1,2,3
    """
    from mflux.server.serve import serve as serve_http

    serve_http(
        model=model,
        host=host,
        port=port,
        api_key=api_key,
        lora_dir=lora_dir,
        output_dir=output_dir,
        queue=queue,
        timeout=timeout,
        workers=workers,
        devices=devices,
        allowed_hosts=allowed_hosts,
        low_memory=low_memory,
        ignore_memory=ignore_memory,
    )


def main() -> None:
    """The `mflux` command, in this process; mflux/__main__.py runs it under its SIGINT handler."""
    cli.main(prog_name="mflux")

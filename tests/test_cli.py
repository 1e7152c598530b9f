"""The `mflux` command: help, list, inspect, rm, one-line errors, and the multi-value options."""

import json
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import mflux.cli
from mflux.cli import MultiValueOption, cli
from mflux.store import Store, format_size
from tests.test_store import make_model, run_on_read_only_store

COMMANDS = ["pull", "run", "list", "inspect", "rm", "convert", "import", "quantize", "train", "serve"]
MFLUX = str(Path(sys.executable).parent / "mflux")


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, list(args), **kwargs)


def one_error_line(result) -> str:
    """The CLI's contract for a user error: exactly one line on stderr, `error: ...`, no traceback."""
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


def test_help_lists_every_command_with_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.split("Commands:")[1].strip().splitlines()]
    assert listed == COMMANDS
    for command in COMMANDS:
        sub = invoke(command, "--help")
        assert sub.exit_code == 0 and "Examples:" in sub.stdout and f"mflux {command} " in sub.stdout


def test_cli_import_is_light():
    # `mflux --help` runs through main() too; neither may pull in the heavy libraries.
    code = (
        "import sys\nfrom mflux import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "heavy = ['mlx', 'torch', 'transformers', 'huggingface_hub', 'diffusers', 'numpy']\n"
        "print('imported:', [m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True)
    assert "Commands:" in out.stdout
    assert out.stdout.splitlines()[-1] == "imported: []"


def test_list_empty_and_with_models(mflux_home):
    result = invoke("list")
    assert result.exit_code == 0 and result.stdout.split() == ["NAME", "FORMAT", "QUANT", "SIZE", "MODIFIED"]
    make_model(Store(), "schnell")
    make_model(
        Store(),
        "dev-q8",
        "dev",
        quantization={"transformer": {"bits": 8, "group_size": 64, "mode": "affine"}},
    )
    lines = invoke("list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "FORMAT", "QUANT", "SIZE", "MODIFIED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    size = format_size(Store().get("dev-q8").size_bytes)
    assert rows["dev-q8"] == ["dev-q8", "hf", "q8", *size.split(), "just", "now"]
    assert rows["schnell"][:3] == ["schnell", "hf", "-"]


def test_list_json(mflux_home):
    q = {"transformer": {"bits": 4, "group_size": 32, "mode": "affine"}, "text_encoder_2": {"bits": 8}}
    make_model(Store(), "a", "dev", quantization=q)
    make_model(Store(), "b")
    result = invoke("list", "--json")
    assert result.exit_code == 0
    a, b = json.loads(result.stdout)
    assert (a["name"], a["format"], a["variant"], b["variant"]) == ("a", "hf", "dev", "schnell")
    assert {k: a["quantization"][k] for k in ("bits", "group_size", "mode")} == {
        "bits": 4,
        "group_size": 32,
        "mode": "affine",
    }
    assert a["quantization"]["components"] == q
    assert b["quantization"] is None
    assert a["size_bytes"] == Store().get("a").size_bytes > 0
    assert datetime.fromisoformat(a["modified"]).tzinfo is not None


def test_list_available():
    result = invoke("list", "--available")
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["schnell"][:5] == ["schnell", "black-forest-labs/FLUX.1-schnell", "~33.7", "GB", "no"]
    assert rows["dev"][:5] == ["dev", "black-forest-labs/FLUX.1-dev", "~33.7", "GB", "yes"]
    entries = {e["name"]: e for e in json.loads(invoke("list", "--available", "--json").stdout)}
    assert entries["dev"]["gated"] is True and entries["dev"]["stored"] is False
    assert entries["schnell"]["download_size_bytes"] == 33_720_000_000


def test_list_shows_a_broken_model_without_crashing(mflux_home):
    make_model(Store(), "good")
    bad = make_model(Store(), "bad") / "manifest.toml"
    bad.write_text(bad.read_text().replace('format = "hf"', 'format = "onnx"'))
    result = invoke("list", "--json")
    assert result.exit_code == 0 and [m["name"] for m in json.loads(result.stdout)] == ["good"]
    assert result.stderr.startswith("warning: bad is not a usable model") and "'format'" in result.stderr


def test_inspect_json_and_text(mflux_home):
    make_model(Store(), "m", "dev")
    result = invoke("inspect", "m", "--json")
    report = json.loads(result.stdout)
    assert report["name"] == "m" and report["variant"] == "dev" and report["quantization"] is None
    assert set(report["components"]) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    text = invoke("inspect", "m", "--verify", "--tensors").stdout
    assert "verify: OK, 9 files match the manifest" in text and "transformer.w0  (64, 64)  float32" in text


def test_inspect_verify_fails_on_a_flipped_byte(mflux_home):
    path = make_model(Store(), "m")
    weights = path / "transformer" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[200] ^= 0x80
    weights.write_bytes(bytes(data))
    result = invoke("inspect", "m", "--verify")
    assert result.exit_code == 1
    assert "transformer/model.safetensors: sha256 differs" in one_error_line(result)


def test_unknown_model_is_one_line(mflux_home):
    result = invoke("inspect", "shnell")
    assert result.exit_code == 1
    assert one_error_line(result) == (
        "error: unknown model 'shnell' (did you mean 'schnell'? see: mflux list, or mflux list --available)"
    )


def test_corrupt_manifest_is_one_line(mflux_home):
    manifest = make_model(Store(), "m") / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("format_version = 1", 'format_version = "one"'))
    result = invoke("inspect", "m")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert str(manifest) in line and "'format_version'" in line


def test_bad_name_is_one_line_and_changes_nothing(mflux_home):
    make_model(Store(), "m")
    before = sorted(p.relative_to(mflux_home) for p in mflux_home.rglob("*"))
    for args in (
        ["rm", "-y", "../m"],
        ["inspect", "../x"],
        ["quantize", "m", "--bits", "8", "--name", "../x"],
    ):
        result = invoke(*args)
        assert result.exit_code != 0
        assert "../" in one_error_line(result)
    assert sorted(p.relative_to(mflux_home) for p in mflux_home.rglob("*")) == before


def test_rm_frees_what_it_reports(mflux_home):
    a, b = make_model(Store(), "a"), make_model(Store(), "b")
    size = sum(f.stat().st_size for p in (a, b) for f in p.rglob("*") if f.is_file())
    result = invoke("rm", "-y", "a", "b")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"removed a, b (freed {format_size(size)})"
    assert not a.exists() and not b.exists() and Store().list() == []


def test_rm_asks_only_on_a_terminal(mflux_home, monkeypatch):
    make_model(Store(), "a")
    monkeypatch.setattr(mflux.cli, "_interactive", lambda: True)
    result = invoke("rm", "a", input="n\n")
    assert result.exit_code == 1 and Store().exists("a")
    assert "Remove a from" in result.stdout
    result = invoke("rm", "a", input="y\n")
    assert result.exit_code == 0 and not Store().exists("a")


def test_rm_unknown_is_one_line(mflux_home):
    make_model(Store(), "schnell-q8")
    result = invoke("rm", "-y", "schnell-q8", "schnell-q4")
    assert result.exit_code == 1 and Store().exists("schnell-q8")
    assert "unknown model 'schnell-q4' (did you mean 'schnell-q8'" in one_error_line(result)


def test_interrupt_exits_130(mflux_home, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "list", interrupted)
    result = invoke("list")
    assert result.exit_code == 130 and result.stderr.strip() == "error: interrupted"


@pytest.mark.parametrize(
    "args, message",
    [
        # run's settings are checked by mflux.settings (exit 1): tests/test_run_features.py
        (["run", "--prompt", "x", "-q", "7"], "-q/--quantize must be one of 3, 4, 5, 6, 8, got '7'"),
        (["run", "--prompt", "x", "--steps", "two"], "--steps must be a whole number, got 'two'"),
        (["quantize", "--bits", "2"], "--bits must be one of 3, 4, 5, 6, 8, got '2'"),
        (["quantize", "--mode", "fp3"], "--mode must be one of affine,"),
        (["quantize", "--components", "vae"], "--components: vae is not quantizable"),
        (
            ["convert", "x", "--dtype", "int8"],
            "--dtype must be one of bfloat16, float16, float32, got 'int8'",
        ),
        (["nope"], "no such command 'nope'"),
    ],
)
def test_bad_flags_are_one_line(args, message):
    result = invoke(*args)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert message in line and line.endswith("--help)")


def test_multi_value_options():
    @click.command()
    @click.option("--seed", cls=MultiValueOption, type=int)
    @click.option("--lora-paths", cls=MultiValueOption)
    @click.option("--lora-scales", cls=MultiValueOption, type=float)
    @click.option("--steps", type=int)
    def command(seed, lora_paths, lora_scales, steps):
        click.echo(json.dumps([seed, lora_paths, lora_scales, steps]))

    def parse(*args):
        result = CliRunner().invoke(command, list(args))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert parse("--seed", "1", "2", "3") == [[1, 2, 3], [], [], None]
    assert parse("--seed", "1", "--seed", "2") == [[1, 2], [], [], None]
    assert parse("--seed", "1", "2", "--steps", "4", "--seed", "3") == [[1, 2, 3], [], [], 4]
    both = parse(
        "--lora-paths", "a.safetensors", "b.safetensors", "--lora-scales", "1.0", "-0.5", "--steps", "2"
    )
    assert both == [[], ["a.safetensors", "b.safetensors"], [1.0, -0.5], 2]
    assert parse("--seed=7", "8") == [[7, 8], [], [], None]
    result = CliRunner().invoke(command, ["--seed", "1", "x"])
    assert result.exit_code == 2 and "'x' is not a valid integer" in result.output


def test_run_takes_both_seed_styles(mflux_home, monkeypatch):
    import mflux.run

    calls = []
    monkeypatch.setattr(mflux.run, "run", lambda prompt, **kw: calls.append(kw))
    for args in (["--seed", "1", "2", "3"], ["--seed", "1", "--seed", "2", "--seed", "3"]):
        result = invoke(
            "run",
            "--prompt",
            "a cat",
            "--no-pull",
            *args,
            "--lora-paths",
            "a",
            "b",
            "--lora-scales",
            "1",
            "0.5",
        )
        assert result.exit_code == 0, result.output
    for kw in calls:
        assert kw["seeds"] == [1, 2, 3] and kw["lora_paths"] == ["a", "b"] and kw["lora_scales"] == [1.0, 0.5]
        assert kw["pull"] is False


def test_installed_command_errors_in_one_line(mflux_home):
    # A real process of the installed entry point: stderr must be one line, without a traceback.
    manifest = make_model(Store(), "m") / "manifest.toml"
    manifest.write_text("garbage = [")
    env = {**os.environ, "MFLUX_HOME": str(mflux_home)}
    for args, expected in ((["inspect", "shnell"], "error: unknown model 'shnell' (did you mean 'schnell'?"),
                           (["list", "--json"], None),
                           (["inspect", "m"], f"error: {manifest}: not valid TOML")):  # fmt: skip
        result = subprocess.run([MFLUX, *args], capture_output=True, text=True, env=env, timeout=60)
        if expected is None:
            assert result.returncode == 0 and json.loads(result.stdout) == []
            assert result.stderr.startswith("warning: m is not a usable model")
            continue
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(expected), result.stderr
        assert "Traceback" not in result.stderr


def test_read_only_store_via_the_command(mflux_home):
    make_model(Store(), "m")
    result = run_on_read_only_store(mflux_home, [MFLUX, "rm", "-y", "m"])
    assert result.returncode == 1
    assert (
        result.stderr.count("\n") == 1
        and "is not writable" in result.stderr
        and "MFLUX_HOME" in result.stderr
    )
    assert Store().exists("m")


DOC_PAGES = ["README.md"] + [f"docs/{p}.md" for p in ("serve", "train", "devices", "python-api", "models")]


def readme_commands(pages=("README.md",)) -> list[list[str]]:
    # The `mflux ...` lines of the pages' sh blocks, also after `mlx.launch ... --` or `NAME=value`.
    commands = []
    for page in pages:
        text, in_shell = (Path(__file__).parents[1] / page).read_text(), False
        for line in text.replace("\\\n", " ").splitlines():
            if line.strip().startswith("```"):
                in_shell = line.strip() == "```sh"
                continue
            if not in_shell:
                continue
            for part in line.split("&&"):
                words = shlex.split(part.split("  #")[0].strip(" `"))
                if words[:1] == ["mlx.launch"] and "--" in words:
                    words = words[words.index("--") + 1 :]
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]
                if words[:1] == ["mflux"]:
                    commands.append(words[1:])
    return commands


def test_readme_commands_parse():
    # Each `mflux ...` the README and its pages show names a real command whose options and values
    # are accepted; the README alone shows every command.
    commands = readme_commands()
    assert ["run", "--model", "schnell-q8", "--prompt", "Luxury food photograph"] in commands
    assert {c[0] for c in commands} == set(COMMANDS)
    for args in readme_commands(DOC_PAGES):
        ctx = click.Context(cli, info_name="mflux")
        cli.get_command(ctx, args[0]).make_context(args[0], args[1:], parent=ctx)


def help_examples(*command: str) -> list[list[str]]:
    # The `mflux ...` lines of a command's --help epilog.
    text = invoke(*command, "--help").output
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("mflux ")]


def test_the_default_model_is_shown_and_every_run_example_names_a_model():
    # Without -m a run pulls schnell (about 34 GB): --help says so, and no example does it unasked
    text = " ".join(invoke("run", "--help").output.split())
    assert "(default: schnell, pulled when missing: about 34 GB)" in text
    runs = [c for c in readme_commands(DOC_PAGES) + help_examples() + help_examples("run") if c[0] == "run"]
    assert len(runs) > 10
    # --from/-C runs the model the image was made with
    chosen = {"-m", "--model", "--path", "--from", "-C"}
    assert [c for c in runs if not chosen & set(c)] == []

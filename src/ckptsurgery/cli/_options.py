"""Every option group the commands share, in one place: a command stacks the decorators it
needs, so the same flag reads the same (name, help, default) wherever it appears."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from ckptsurgery.render.tables import TABLE_FORMATS
from ckptsurgery.rules import Rules

if TYPE_CHECKING:
    pass

F = TypeVar("F", bound=Callable[..., Any])


def source_options(f: F) -> F:
    """``--key``, ``--allow-global`` and ``--unsafe-pickle``: every command that reads."""
    f = click.option(
        "--unsafe-pickle",
        is_flag=True,
        help="Unpickle with code execution allowed. Only for files you trust; prints a warning.",
    )(f)
    f = click.option(
        "--allow-global",
        "allow_globals",
        multiple=True,
        metavar="module.Name",
        help="Trust one pickle global (e.g. argparse.Namespace). Repeatable.",
    )(f)
    f = click.option(
        "--key",
        metavar="PATH",
        default=None,
        help="Slash-separated path of the nested state dict to use (e.g. state_dict, model/ema).",
    )(f)
    return f


def fmt_option(f: F, *, dest: str = "fmt") -> F:
    """``--fmt FORMAT``: every command that prints tables (``fmt`` in the command, or
    ``dest`` where ``fmt`` names something else)."""
    return click.option(
        "--fmt",
        dest,
        type=click.Choice(TABLE_FORMATS),
        metavar="FORMAT",
        default="simple",
        show_default=True,
        help=f"Layout of the tables, one of tabulate's formats: {', '.join(TABLE_FORMATS)} "
        "(github and pipe are Markdown tables). --json is not affected.",
    )(f)


def table_fmt_option(f: F) -> F:
    """``--fmt FORMAT`` as ``table_fmt``, for commands whose ``--format`` is the file's."""
    return fmt_option(f, dest="table_fmt")


def verify_option(f: F) -> F:
    """``--no-verify``: every command that writes a checkpoint."""
    return click.option(
        "--no-verify",
        "no_verify",
        is_flag=True,
        help="Do not read OUT back before reporting success (by default its names, shapes, "
        "dtypes and a CRC-32 of every tensor's bytes are checked first).",
    )(f)


def max_shard_size_option(f: F) -> F:
    """``--max-shard-size SIZE``: every command that writes a checkpoint from tensors."""
    return click.option(
        "--max-shard-size",
        metavar="SIZE",
        default=None,
        help="Write safetensors shards of at most SIZE (5GB, 500MB, 2GiB or bytes) and their "
        "index into the output folder, as transformers does.",
    )(f)


def model_options(f: F, *, required: bool = False) -> F:
    """``--model SPEC`` and ``--model-arg K=V`` (``required``: for train and evaluate; the
    gate of remap, merge and diff is optional)."""
    f = click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        metavar="K=V",
        help="Keyword argument for the model factory; V is a Python literal "
        "(num_classes=10). Repeatable.",
    )(f)
    f = click.option(
        "--model",
        "model_spec",
        metavar="SPEC",
        default=None,
        required=required,
        help="torchvision:NAME, timm:NAME, hf:PATH[:CLASS] (a local config.json) or "
        "package.module:factory" + (" (built on the meta device)." if not required else "."),
    )(f)
    return f


def required_model_options(f: F) -> F:
    return model_options(f, required=True)


@dataclass(frozen=True)
class GateFlags:
    """``--model``, ``--model-arg``, ``--allow-missing``, ``--allow-unexpected`` and
    ``--drop-mismatched``, as the command received them."""

    model_spec: str | None
    model_args: tuple[str, ...]
    allow_missing: tuple[str, ...]
    allow_unexpected: tuple[str, ...]
    drop_mismatched: bool


@dataclass(frozen=True)
class WriteFlags:
    """The output options of a surgery command (see :func:`write_options`)."""

    out: str | None
    fmt: str | None  # --format: the file's
    dtype: str | None
    keep_dtype: tuple[str, ...]
    max_shard_size: str | None
    progress: bool | None
    force: bool
    no_verify: bool
    dry_run: bool
    as_json: bool
    table_fmt: str  # --fmt: the tables'
    emit_recipe: str | None

    def library_options(self) -> dict[str, Any]:
        """The library's options (:class:`~ckptsurgery.plan.run.SurgeryOptions`) they set."""
        return {
            "format": self.fmt,
            "force": self.force,
            "dry_run": self.dry_run,
            "verify": not self.no_verify,
            "max_shard_size": self.max_shard_size,
            "dtype": self.dtype,
            "keep_dtype": self.keep_dtype,
        }


def _folded(name: str, kind: Callable[..., Any]) -> Callable[[F], F]:
    """A decorator handing the command the options named like ``kind``'s fields as one
    ``name=kind(...)`` value, so that commands sharing an option group share its handling."""
    fields = tuple(kind.__dataclass_fields__)  # type: ignore[attr-defined]

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in fields}
            return f(*args, **{name: kind(**values)}, **kwargs)

        return cast(F, command)

    return decorate


def gate_options(f: F) -> F:
    """The gate of a surgery that writes, handed over as ``gate_flags``
    (:class:`GateFlags`): ``--model``, ``--model-arg``, ``--allow-missing``,
    ``--allow-unexpected`` and ``--drop-mismatched``."""
    f = _folded("gate_flags", GateFlags)(f)
    f = click.option(
        "--drop-mismatched",
        is_flag=True,
        help="With --model: drop keys whose shape differs from the model's (they become missing).",
    )(f)
    return model_options(allow_options(f))


def write_options(f: F) -> F:
    """What every surgery that writes takes after its sources, handed over as ``write``
    (:class:`WriteFlags`): ``-o``, ``--format``, the cast, shards, progress, ``--force``,
    ``--no-verify``, ``--dry-run``, ``--json``, ``--fmt`` and ``--emit-recipe``."""
    f = _folded("write", WriteFlags)(f)
    opts = [
        click.option(
            "-o",
            "--output",
            "out",
            metavar="OUT",
            default=None,
            help="Output file; format from its extension (.safetensors, .pt, .pth, .bin). "
            "With --max-shard-size, a folder (or its model.safetensors.index.json).",
        ),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["safetensors", "torch"]),
            default=None,
            help="Output format, when the extension does not say.",
        ),
        dtype_options,
        max_shard_size_option,
        progress_option,
        click.option("--force", is_flag=True, help="Replace OUT if it exists."),
        verify_option,
        click.option(
            "--dry-run",
            is_flag=True,
            help="Print the plan (every output tensor, its operation and bytes), the sources "
            "and the gate's report; write nothing.",
        ),
        click.option(
            "--json", "as_json", is_flag=True, help="Print the plan (and result) as JSON."
        ),
        table_fmt_option,
        emit_recipe_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def allow_options(f: F) -> F:
    """``--allow-missing GLOB`` and ``--allow-unexpected GLOB``."""
    f = click.option(
        "--allow-unexpected",
        multiple=True,
        metavar="GLOB",
        help="Checkpoint keys the model lacks that are acceptable. Repeatable.",
    )(f)
    f = click.option(
        "--allow-missing",
        multiple=True,
        metavar="GLOB",
        help="Model keys the checkpoint lacks that are acceptable (e.g. 'fc.*'). Repeatable.",
    )(f)
    return f


def rule_options(f: F) -> F:
    """The rule flags, in the order the rules apply, handed to the command as one value:
    ``rules`` (a :class:`Rules`) and ``rules_key`` (the state dict key a ``--rules`` file
    names, or None)."""

    @functools.wraps(f)
    def command(
        *args: Any,
        keep: tuple[str, ...],
        drop: tuple[str, ...],
        strip_prefix: tuple[str, ...],
        replace: tuple[tuple[str, str], ...],
        regex: tuple[tuple[str, str], ...],
        add_prefix: str,
        rules_file: str | None,
        **kwargs: Any,
    ) -> Any:
        flags = Rules(
            keep=keep,
            drop=drop,
            strip_prefix=strip_prefix,
            replace=replace,
            regex=regex,
            add_prefix=add_prefix,
        )
        rules, rules_key = flags, None
        if rules_file is not None:
            from_file, rules_key = Rules.from_toml(rules_file)
            rules = from_file | flags
        return f(*args, rules=rules, rules_key=rules_key, **kwargs)

    opts = [
        click.option(
            "--keep",
            multiple=True,
            metavar="GLOB",
            help="Keep only keys matching a glob ('*' matches dots too). Repeatable.",
        ),
        click.option(
            "--drop", multiple=True, metavar="GLOB", help="Remove keys matching a glob. Repeatable."
        ),
        click.option(
            "--strip-prefix",
            multiple=True,
            metavar="P",
            help="Remove a leading prefix. Repeatable, applied in order.",
        ),
        click.option(
            "--replace",
            multiple=True,
            nargs=2,
            metavar="OLD NEW",
            help="Replace a substring. Repeatable, applied in order.",
        ),
        click.option(
            "--regex",
            multiple=True,
            nargs=2,
            metavar="PATTERN REPL",
            help="re.sub on the key. Repeatable, applied in order.",
        ),
        click.option("--add-prefix", default="", metavar="P", help="Prepend to every key."),
        click.option(
            "--rules",
            "rules_file",
            metavar="FILE.toml",
            default=None,
            help="Read the rules from a TOML file (keys as a recipe's [[source]]); "
            "flags given too are applied after the file's.",
        ),
    ]
    wrapped: Any = command
    for opt in reversed(opts):
        wrapped = opt(wrapped)
    return cast(F, wrapped)


DTYPES = ("float32", "float16", "bfloat16")  # ckptsurgery.plan.ops.CAST_DTYPES, torch-free


def dtype_options(f: F) -> F:
    """``--dtype`` and ``--keep-dtype``: every command that writes tensors."""
    f = click.option(
        "--keep-dtype",
        multiple=True,
        metavar="GLOB",
        help="With --dtype: leave keys matching a glob (on the output key) in their source "
        "dtype, e.g. '*.running_*' or '*norm*'. Repeatable.",
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default=None,
        help="Cast floating tensors to this dtype (bits exactly as torch's .to(dtype)); "
        "integer and bool tensors are never cast.",
    )(f)
    return f


def emit_recipe_option(f: F) -> F:
    """``--emit-recipe FILE``: the run as a recipe that `apply` reproduces."""
    return click.option(
        "--emit-recipe",
        metavar="FILE.toml",
        default=None,
        help="Also write this run as a recipe (`ckptsurgery apply FILE.toml` reproduces it); "
        "with --dry-run, only the recipe is written.",
    )(f)


def progress_option(f: F) -> F:
    return click.option(
        "--progress/--no-progress",
        default=None,
        help="A progress bar on stderr while writing (default: for big writes on a terminal).",
    )(f)


def transform_options(f: F) -> F:
    """``--image-size --channels --mean --std``: shared by ``train`` and ``evaluate``."""
    opts = [
        click.option(
            "--image-size",
            type=int,
            default=224,
            show_default=True,
            help="Images are resized (shorter side) and centre-cropped to this square size.",
        ),
        click.option(
            "--channels",
            type=click.Choice(["1", "3"]),
            default="3",
            show_default=True,
            help="1 (grayscale) or 3 (RGB): what the model's first layer takes.",
        ),
        click.option(
            "--mean",
            metavar="M[,M,M]",
            default=None,
            help="Normalisation mean, one value or one per channel (default: ImageNet's).",
        ),
        click.option(
            "--std",
            metavar="S[,S,S]",
            default=None,
            help="Normalisation std, one value or one per channel (default: ImageNet's).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def runtime_options(f: F) -> F:
    """``--device --amp --threads --workers``: shared by ``train`` and ``evaluate``."""
    opts = [
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="cpu, cuda, cuda:N or auto (CUDA when available).",
        ),
        click.option(
            "--amp",
            type=click.Choice(["fp16", "bf16"]),
            is_flag=False,
            flag_value="fp16",
            default=None,
            help="Autocast: fp16 (float16 with gradient scaling, CUDA only; a bare --amp) or "
            "bf16 (bfloat16, CUDA or the CPU).",
        ),
        click.option(
            "--threads", type=int, default=None, help="torch.set_num_threads (CPU threads)."
        ),
        click.option(
            "--workers",
            type=int,
            default=None,
            help="DataLoader processes (default: 0 on 2 cores or fewer, else cores - 1, max 8).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_floats(flag: str, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers", param_hint=flag
        ) from None


def parse_transform(
    image_size: int,
    channels: int | str,
    mean: str | None,
    std: str | None,
    augment: bool = False,
) -> Any:
    from ckptsurgery.train.config import TransformConfig

    return TransformConfig(
        image_size=image_size,
        channels=int(channels),
        mean=parse_floats("--mean", mean),
        std=parse_floats("--std", std),
        augment=augment,
    )

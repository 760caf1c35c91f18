"""Model SPEC -> ``nn.Module``, built on the meta device so that its size costs no memory.

A SPEC is one of:

- ``torchvision:NAME``: a torchvision model builder (``torchvision:resnet50``);
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (the ``timm`` extra);
- ``hf:PATH[:CLASS]``: a ``transformers`` model from a local ``config.json`` (PATH is the
  folder holding it, the file itself, or a Hugging Face cache folder ``models--org--name`` or
  one of its snapshots); CLASS is a ``transformers`` class such as
  ``BertForSequenceClassification`` or ``AutoModelForSequenceClassification`` (default
  ``AutoModel``). ``--model-arg`` overrides config fields (``num_labels=3``). Nothing is
  downloaded and no weights are loaded (the ``hf`` extra);
- ``package.module:attr``: any importable factory; ``attr`` may be dotted
  (``mypkg.nets:Net``, ``mypkg.nets:Net.from_name``).

Keyword arguments come from ``--model-arg K=V`` (:func:`parse_model_args`), V a Python literal.
Nothing is passed on the user's behalf but timm's ``pretrained=False`` (its default, made
explicit so that a changed default never downloads); torchvision already defaults to random
initialisation. A factory that tries to download anyway
fails with a clean :class:`ModelSpecError`.

The model is built under ``torch.device("meta")``: parameters get a shape and a dtype but no
storage, which is all a dry-run match needs, for a model of any size. A factory that cannot run
on meta (it reads a tensor's values while building) is retried on the CPU, and
:attr:`BuiltModel.note` says so.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import os
import socket
import sys
import urllib.error
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["BuiltModel", "ModelSpecError", "build_model", "parse_model_args"]

# Argument names through which factories fetch pretrained weights.
_DOWNLOAD_ARGS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")
# Network errors of third-party clients (requests, urllib3, huggingface_hub), known by name so
# that none of them has to be imported.
_NETWORK_ERROR_NAMES = frozenset(
    {
        "ConnectionError",
        "ConnectTimeout",
        "ReadTimeout",
        "MaxRetryError",
        "NewConnectionError",
        "NameResolutionError",
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "HfHubHTTPError",
    }
)


class ModelSpecError(CheckpointError):
    """A model SPEC or ``--model-arg`` is malformed, or the model cannot be built."""


@dataclass(frozen=True)
class BuiltModel:
    """A model built from a SPEC.

    ``on_meta`` is True when the module was built on the meta device (its tensors have shapes
    and dtypes but no data: fine for matching, not for loading); ``note`` explains a fallback.
    """

    module: nn.Module
    spec: str
    on_meta: bool
    note: str | None = None


def parse_model_args(items: Iterable[str]) -> dict[str, object]:
    """``["num_classes=10", "name='vit'"]`` -> ``{"num_classes": 10, "name": "vit"}``.

    Each value is a Python literal (number, string in quotes, True/False/None, tuple, list,
    dict). A bare word is refused rather than guessed to be a string.
    """
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise ModelSpecError(
                f"--model-arg {item!r} is not K=V with K a Python name; e.g. num_classes=10"
            )
        if key in out:
            raise ModelSpecError(f"--model-arg {key} is given twice")
        out[key] = _literal(key, raw)
    return out


def _literal(key: str, raw: str) -> object:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    hint = {"true": "True", "false": "False", "none": "None", "null": "None"}.get(raw.lower())
    if hint is not None:
        fix = f"write {key}={hint}"
    elif raw.replace("-", "_").replace(".", "_").isidentifier():
        fix = f"quote a string: {key}={raw!r}"
    elif not raw:
        fix = f"give a value, e.g. {key}=None"
    else:
        fix = "use a number, a quoted string, True/False/None, or a tuple/list/dict of those"
    raise ModelSpecError(f"--model-arg {key}={raw}: {raw!r} is not a Python literal; {fix}")


def build_model(
    spec: str,
    model_args: Mapping[str, object] | None = None,
    *,
    device: str | torch.device | None = "meta",
) -> BuiltModel:
    """Build the model named by ``spec`` with keyword arguments ``model_args``.

    ``device="meta"`` (the default) builds without allocating weights, falling back to the CPU
    when the factory cannot run on meta. Any other device builds there directly; ``None``
    leaves the factory's own default.
    """
    import torch

    args = dict(model_args or {})
    factory, label = resolve_factory(spec)
    call = f"{label}({', '.join(f'{k}={v!r}' for k, v in args.items())})"

    dev = torch.device(device) if device is not None else None
    note: str | None = None
    try:
        module = _call(factory, args, dev, call=call, spec=spec)
        built_on = dev
    except _FactoryFailed as failed:
        if dev is None or dev.type != "meta":
            raise failed.as_spec_error() from failed.error
        # Some factories read tensor values while building (``.item()``, numpy), which the
        # meta device cannot do; their weights have to be allocated after all.
        try:
            module = _call(factory, args, torch.device("cpu"), call=call, spec=spec)
        except _FactoryFailed as again:
            raise again.as_spec_error() from again.error
        built_on = torch.device("cpu")
        note = (
            f"{spec} could not be built on the meta device "
            f"({type(failed.error).__name__}: {failed.error}); built on the CPU instead, "
            "which allocates its weights"
        )
    on_meta = built_on is not None and built_on.type == "meta"
    if on_meta and not _all_meta(module):
        on_meta = False
        note = f"{spec} created some of its tensors off the meta device; they hold real memory"
    return BuiltModel(module=module, spec=spec, on_meta=on_meta, note=note)


class _FactoryFailed(Exception):
    def __init__(self, error: Exception, *, call: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.call = call

    def as_spec_error(self) -> ModelSpecError:
        e = self.error
        return ModelSpecError(f"{self.call} failed: {type(e).__name__}: {e}")


def _call(
    factory: Callable[..., Any],
    args: dict[str, object],
    device: torch.device | None,
    *,
    call: str,
    spec: str,
) -> nn.Module:
    from torch import nn

    try:
        if device is None:
            obj = factory(**args)
        else:
            with device:
                obj = factory(**args)
    except ModelSpecError:
        raise
    except Exception as e:
        if _is_network_error(e):
            raise ModelSpecError(_download_message(call, args, e)) from e
        raise _FactoryFailed(e, call=call) from e
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"{call} returned a {type(obj).__name__}, not a torch.nn.Module; "
            f"point the model spec {spec!r} at a function or class that returns the model"
        )
    return obj


def _download_message(call: str, args: Mapping[str, object], e: BaseException) -> str:
    asked = [k for k in _DOWNLOAD_ARGS if args.get(k) not in (None, False)]
    if asked:
        fix = (
            f"remove {', '.join(asked)} from the model arguments: ckptsurgery builds the "
            "architecture only and your checkpoint provides the weights"
        )
    else:
        fix = (
            "this factory downloads something by itself; build the model without network "
            "access (e.g. with a local config) or pre-populate its cache"
        )
    return f"{call} tried to download and failed ({type(e).__name__}: {e}); {fix}"


def _is_network_error(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, urllib.error.URLError | ConnectionError | socket.gaierror):
            return True
        if type(cur).__name__ in _NETWORK_ERROR_NAMES:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _all_meta(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return all(t.is_meta for t in tensors)


def resolve_factory(spec: str) -> tuple[Callable[..., Any], str]:
    """The callable a SPEC names, and a short label for messages. Builds nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("the model spec is empty; e.g. torchvision:resnet50")
    source, sep, name = spec.strip().partition(":")
    if not sep or not name:
        raise ModelSpecError(_no_colon_message(spec))
    if source == "torchvision":
        return _torchvision_factory(name), f"torchvision:{name}"
    if source == "timm":
        return _timm_factory(name), f"timm:{name}"
    if source == "hf":
        return _hf_factory(name, spec=spec)
    return _import_factory(source, name, spec=spec), spec


def _no_colon_message(spec: str) -> str:
    msg = (
        f"model spec {spec!r} is not torchvision:NAME, timm:NAME, hf:PATH[:CLASS] or "
        "package.module:attr (e.g. torchvision:resnet50, mypkg.models:Net)"
    )
    try:
        tv_models: Any = importlib.import_module("torchvision.models")
    except ImportError:
        return msg
    if spec.lower() in tv_models.list_models():
        msg += f"; did you mean torchvision:{spec.lower()}?"
    return msg


def _import_extra(module: str, *, spec: str, extra: str) -> Any:
    """``module``, or :class:`ModelSpecError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise ModelSpecError(
            f"{spec} needs {package}, which is not installed; pip install "
            f"'ckptsurgery[{extra}]' (or pip install {package}) ({e})"
        ) from e


def _torchvision_factory(name: str) -> Callable[..., Any]:
    tv_models = _import_extra("torchvision.models", spec=f"torchvision:{name}", extra="vision")
    names: list[str] = tv_models.list_models()
    if name not in names:
        raise ModelSpecError(f"torchvision has no model {name!r}{_close(name, names)}")
    builder: Callable[..., Any] = tv_models.get_model_builder(name)
    return builder


def _timm_factory(name: str) -> Callable[..., Any]:
    timm = _import_extra("timm", spec=f"timm:{name}", extra="timm")

    def create(**kwargs: Any) -> Any:
        # Explicit, so that no timm version ever fetches weights for us: the checkpoint
        # provides them.
        kwargs.setdefault("pretrained", False)
        try:
            return timm.create_model(name, **kwargs)
        except RuntimeError as e:
            # timm says "Unknown model (name)" for a name it does not know.
            if "unknown model" not in str(e).lower():
                raise
            names = list(timm.list_models())
            raise ModelSpecError(f"timm has no model {name!r}{_close(name, names)}") from e

    return create


def _hf_factory(rest: str, *, spec: str) -> tuple[Callable[..., Any], str]:
    """``hf:PATH[:CLASS]``: a factory that builds CLASS from PATH's config, overrides applied."""
    path, cls_name = _hf_split(rest)
    folder = _hf_config_folder(path, spec=spec)
    transformers = _import_extra("transformers", spec=spec, extra="hf")
    cls_name = cls_name or "AutoModel"
    try:
        cls: Any = getattr(transformers, cls_name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not isinstance(cls, type):
        models = [n for n in dir(transformers) if n.endswith(("Model", "LMHead")) or "For" in n]
        raise ModelSpecError(
            f"{spec}: transformers has no model class {cls_name!r}{_close(cls_name, models)}"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ...
        raise ModelSpecError(
            f"{spec}: {folder / 'config.json'} is not a config transformers can read: "
            f"{type(e).__name__}: {e}"
        ) from e

    def create(**overrides: Any) -> Any:
        for key, value in overrides.items():
            if not hasattr(config, key):
                fields = [*config.to_dict(), "num_labels"]
                raise ModelSpecError(
                    f"{spec}: the config ({type(config).__name__}) has no field {key!r} "
                    f"(--model-arg overrides config fields){_close(key, fields)}"
                )
            setattr(config, key, value)
        if hasattr(cls, "from_config"):  # the Auto* classes
            return cls.from_config(config)
        return cls(config)

    return create, f"hf:{folder}:{cls_name}"


def _hf_split(rest: str) -> tuple[str, str | None]:
    """``PATH[:CLASS]`` -> (PATH, CLASS): a trailing ``:Name`` is a class unless PATH:Name exists."""
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail.isidentifier() and not os.path.exists(rest):
        return head, tail
    return rest, None


def _hf_config_folder(path: str, *, spec: str) -> Path:
    """The folder holding ``config.json``: PATH, its parent (PATH is the file) or, in a Hugging
    Face cache folder (``models--org--name``), the snapshot its ``refs/main`` names (or its
    only snapshot)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == "config.json":
        return p.parent
    if not p.exists():
        raise ModelSpecError(f"{spec}: {str(p)!r} does not exist; give a folder with a config.json")
    if (p / "snapshots").is_dir():
        ref = p / "refs" / "main"
        snaps = sorted(s for s in (p / "snapshots").iterdir() if (s / "config.json").is_file())
        chosen = p / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        if chosen is None or not (chosen / "config.json").is_file():
            if len(snaps) != 1:
                names = ", ".join(s.name for s in snaps) or "none with a config.json"
                raise ModelSpecError(
                    f"{spec}: pick one snapshot of {str(p)!r} ({names}): hf:{p}/snapshots/HASH"
                )
            chosen = snaps[0]
        return chosen
    if not (p / "config.json").is_file():
        raise ModelSpecError(
            f"{spec}: {str(p)!r} has no config.json; hf:PATH needs the folder of a model's "
            "config (save_pretrained writes one; a Hugging Face cache snapshot has one)"
        )
    return p


def _import_factory(module_path: str, attr: str, *, spec: str) -> Callable[..., Any]:
    if not all(p.isidentifier() for p in module_path.split(".")):
        raise ModelSpecError(
            f"model spec {spec!r}: {module_path!r} is not a dotted module path; "
            "expected package.module:attr, torchvision:NAME or timm:NAME"
        )
    if not all(p.isidentifier() for p in attr.split(".")):
        raise ModelSpecError(
            f"model spec {spec!r}: {attr!r} is not a (dotted) attribute name such as "
            "Net or Net.from_name"
        )
    # As with `python -m` (and uvicorn), a model defined in the current folder can be named.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        raise ModelSpecError(_not_found_message(module_path, spec, e)) from e
    except Exception as e:
        raise ModelSpecError(
            f"model spec {spec!r}: importing {module_path!r} failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        if added:
            sys.path.remove(cwd)
    where = f"module {module_path!r}"
    path = module_path + ":"
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelSpecError(
                f"model spec {spec!r}: {where} has no attribute {part!r}{_close(part, public)}"
            )
        obj = getattr(obj, part)
        path += part
        where = repr(path)
        path += "."
    from torch import nn

    if isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r} names a model instance; point it at the class or function "
            "that builds it, so that it can be built on the meta device"
        )
    if not callable(obj):
        raise ModelSpecError(
            f"model spec {spec!r} names a {type(obj).__name__}, which cannot be called to "
            "build a model; point it at a class or a function"
        )
    factory: Callable[..., Any] = obj
    return factory


def _not_found_message(module_path: str, spec: str, e: ModuleNotFoundError) -> str:
    missing = e.name or module_path
    if module_path == missing or module_path.startswith(missing + "."):
        return (
            f"model spec {spec!r}: cannot import {module_path!r}: no module named {missing!r} "
            "(looked in the current folder and the Python path)"
        )
    return (
        f"model spec {spec!r}: importing {module_path!r} failed because it needs "
        f"{missing!r}, which is not installed"
    )


def _close(name: str, names: Iterable[str]) -> str:
    pool = list(names)
    by_lower = {n.lower(): n for n in pool}
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
    if not found:
        return ""
    return "; did you mean " + ", ".join(by_lower[f] for f in found) + "?"

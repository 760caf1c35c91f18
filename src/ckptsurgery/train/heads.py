"""Finding a model's classifier head by name, and replacing it for a new number of classes.

The head is the ``nn.Linear`` that produces the logits. It is found, in this order:

1. ``head=NAME`` (``--head``) when given;
2. timm's ``model.get_classifier()``;
3. the first of ``fc``, ``classifier``, ``head``, ``heads.head``, ``heads`` that the model has;
4. otherwise the last ``nn.Linear`` the model registers.

A head found through ``get_classifier()`` is replaced through the model's own
``reset_classifier(num_classes)`` when it has one (timm's models: the model's ``num_classes``
follows), then initialised as below; any other head by putting a new ``nn.Linear`` in its place.

A name that is a container (torchvision's VGG ``classifier``, a ``Sequential`` of dropout and
linear layers) resolves to the last ``nn.Linear`` inside it: ``classifier`` -> ``classifier.6``.
The result is a :class:`Head`, whose ``how`` says which rule found it, so that the choice can
always be printed. Selection is by name, never by position in ``parameters()``.

Models with auxiliary classifiers (torchvision's GoogLeNet and Inception v3 with
``aux_logits=True``) are refused: their training-mode output is a tuple of logits that a plain
cross-entropy cannot train. Build them with ``aux_logits=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptsurgery.train.errors import HeadError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["HEAD_NAMES", "Head", "find_head", "head_keys", "is_head_key", "replace_head"]

HEAD_NAMES = ("fc", "classifier", "head", "heads.head", "heads")
# torchvision's GoogLeNet (aux1, aux2) and Inception v3 (AuxLogits) auxiliary classifiers.
_AUX_NAMES = ("aux1", "aux2", "AuxLogits")
TIMM_HOW = "timm get_classifier()"
HEAD_STD = 0.01  # the SSL linear-evaluation protocols' initialisation (MoCo, DINO, MAE)


@dataclass(frozen=True)
class Head:
    """The classifier head: the qualified name of an ``nn.Linear`` and how it was found."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    how: str  # "--head classifier", "timm get_classifier()", "named 'fc'", "last nn.Linear"

    def describe(self) -> str:
        return (
            f"head: {self.name} (Linear {self.in_features} -> {self.out_features}; "
            f"found by {self.how})"
        )


def find_head(model: nn.Module, name: str | None = None) -> Head:
    """The classifier head of ``model``; see the module docstring for the search order.

    Raises :class:`HeadError` when ``name`` does not exist or holds no ``nn.Linear``, when the
    model has no ``nn.Linear`` at all, or when it has auxiliary classifiers.
    """
    _refuse_aux_heads(model)
    modules = dict(model.named_modules())
    if name is not None:
        name = name.removesuffix(".weight").removesuffix(".bias")
        if name not in modules or not name:
            close = [n for n in modules if n and (n.endswith(name) or name in n)][:5]
            hint = f"; modules with similar names: {', '.join(close)}" if close else ""
            raise HeadError(f"--head {name!r}: the model has no module of that name{hint}")
        return _resolve(modules, name, how=f"--head {name}")

    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        # timm's models say which module is their classifier.
        classifier = get_classifier()
        for qualified, module in modules.items():
            if qualified and module is classifier:
                return _resolve(modules, qualified, how=TIMM_HOW)

    for candidate in HEAD_NAMES:
        if candidate in modules and _last_linear(modules, candidate) is not None:
            return _resolve(modules, candidate, how=f"its name '{candidate}'")

    last = _last_linear(modules, "")
    if last is None:
        raise HeadError(
            f"{type(model).__name__} has no nn.Linear to use as the classifier head; "
            "the trainer replaces a Linear head only (name one with --head)"
        )
    return _resolve(modules, last, how="being the last nn.Linear (pass --head to choose)")


def replace_head(
    model: nn.Module,
    head: Head,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
) -> Head:
    """Put a fresh ``nn.Linear(in_features, num_classes)`` where ``head`` is, in place.

    The new layer has the old one's device, dtype and bias setting, weights drawn from
    N(0, 0.01²) and a zero bias (the SSL linear-evaluation initialisation). It is always fresh,
    even when the class count is unchanged. Returns the new :class:`Head`.
    """
    import torch
    from torch import nn

    if num_classes < 1:
        raise HeadError(f"a classifier needs at least one class, got {num_classes}")
    if head.how == TIMM_HOW:
        reset = _reset_classifier(model, head, num_classes, generator=generator)
        if reset is not None:
            return reset
    old = model.get_submodule(head.name)
    if not isinstance(old, nn.Linear):
        raise HeadError(f"{head.name} is a {type(old).__name__}, not an nn.Linear")
    weight = old.weight
    device = torch.device("cpu") if weight.is_meta else weight.device
    new = nn.Linear(
        old.in_features,
        num_classes,
        bias=old.bias is not None,
        device=device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.normal_(0.0, HEAD_STD, generator=generator)
        if new.bias is not None:
            new.bias.zero_()
    if weight.is_meta:
        new = new.to("meta")
    parent_name, _, attr = head.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # setattr on the parent keeps its place in a Sequential (the key "6" is replaced in place).
    setattr(parent, attr, new)
    return Head(
        name=head.name,
        in_features=old.in_features,
        out_features=num_classes,
        bias=new.bias is not None,
        how=head.how,
    )


def _reset_classifier(
    model: nn.Module, head: Head, num_classes: int, *, generator: torch.Generator | None
) -> Head | None:
    """``model.reset_classifier(num_classes)``, the new Linear initialised as a fresh head's;
    None when the model has no ``reset_classifier`` or it did not leave a Linear at the head's
    place with the same input features (the caller then replaces the head itself)."""
    import torch
    from torch import nn

    reset = getattr(model, "reset_classifier", None)
    if not callable(reset):
        return None
    old = model.get_submodule(head.name)
    device = old.weight.device if isinstance(old, nn.Linear) else torch.device("cpu")
    reset(num_classes)
    try:
        new = model.get_submodule(head.name)
    except AttributeError:
        return None
    if not isinstance(new, nn.Linear) or new.in_features != head.in_features:
        return None
    if new.weight.device != device:
        new.to(device)
    if device.type != "meta":
        with torch.no_grad():
            new.weight.normal_(0.0, HEAD_STD, generator=generator)
            if new.bias is not None:
                new.bias.zero_()
    return Head(
        name=head.name,
        in_features=new.in_features,
        out_features=num_classes,
        bias=new.bias is not None,
        how=f"{head.how}, replaced by reset_classifier({num_classes})",
    )


def head_keys(model: nn.Module, head: Head) -> list[str]:
    """The state-dict keys of the head (``fc.weight``, ``fc.bias``)."""
    return [k for k in model.state_dict(keep_vars=True) if is_head_key(k, head)]


def is_head_key(key: str, head: Head) -> bool:
    return key.startswith(head.name + ".")


def _resolve(modules: dict[str, nn.Module], name: str, *, how: str) -> Head:
    from torch import nn

    linear_name = _last_linear(modules, name)
    if linear_name is None:
        kind = type(modules[name]).__name__
        raise HeadError(
            f"the head {name!r} ({kind}) holds no nn.Linear; the trainer replaces a Linear "
            "head only (name a Linear with --head)"
        )
    linear = modules[linear_name]
    assert isinstance(linear, nn.Linear)  # _last_linear returns Linear modules only
    if linear_name != name:
        how = f"{how}, its last Linear"
    return Head(
        name=linear_name,
        in_features=linear.in_features,
        out_features=linear.out_features,
        bias=linear.bias is not None,
        how=how,
    )


def _last_linear(modules: dict[str, nn.Module], prefix: str) -> str | None:
    """The name of the last ``nn.Linear`` at ``prefix`` or below it ("" = the whole model)."""
    from torch import nn

    found = None
    for qualified, module in modules.items():
        inside = not prefix or qualified == prefix or qualified.startswith(prefix + ".")
        if inside and qualified and isinstance(module, nn.Linear):
            found = qualified
    return found


def _refuse_aux_heads(model: nn.Module) -> None:
    aux = [n for n in _AUX_NAMES if getattr(model, n, None) is not None]
    if getattr(model, "aux_logits", False) or aux:
        names = ", ".join(aux) or "aux_logits=True"
        globs = " ".join(f"--allow-unexpected '{n}.*'" for n in aux)
        raise HeadError(
            f"{type(model).__name__} has auxiliary classifiers ({names}), whose training output "
            "is a tuple the trainer does not train; build it without them: --model-arg "
            f"aux_logits=False{f' (and {globs} for weights that have them)' if globs else ''}"
        )

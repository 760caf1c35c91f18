"""Model SPECs: parsing, building on meta, and errors that say what to do."""

from __future__ import annotations

import itertools
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckptsurgery.errors import CheckpointError
from ckptsurgery.models import BuiltModel, ModelSpecError, build_model, parse_model_args

FACTORIES = """
import urllib.error

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = nn.Linear(width, 2)

    @classmethod
    def from_name(cls, name, **kwargs):
        return cls(width={"small": 3, "big": 8}[name], **kwargs)


def needs_values(width=4):
    net = Net(width)
    # Reading a value is impossible on meta: this factory must fall back to the CPU.
    scale = float(torch.ones(1).sum().item())
    net.fc.weight.data.mul_(scale)
    return net


def downloads(weights=None):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def not_a_model():
    return (Net(), "transforms")


def numpy_buffer():
    import numpy as np

    net = Net()
    # torch.from_numpy ignores the default device: this buffer is real even under meta.
    net.register_buffer("table", torch.from_numpy(np.ones(3)))
    return net


def broken():
    raise ValueError("width must be positive")


instance = Net()
NUMBER = 3
"""

_counter = itertools.count()


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a fresh importable module holding the factories above."""
    name = f"cs_test_factories_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# --- parse_model_args -----------------------------------------------------------------------


def test_parse_model_args_literals() -> None:
    args = parse_model_args(
        ["num_classes=10", "pretrained=False", "name='x'", "dims=(1, 2)", "p = 0.5", "w=None"]
    )
    assert args == {
        "num_classes": 10,
        "pretrained": False,
        "name": "x",
        "dims": (1, 2),
        "p": 0.5,
        "w": None,
    }
    assert parse_model_args([]) == {}
    assert parse_model_args(["cfg={'a': [1, 2]}", "s='a=b'"]) == {
        "cfg": {"a": [1, 2]},
        "s": "a=b",
    }


def test_parse_model_args_bare_word_asks_for_quotes() -> None:
    with pytest.raises(ModelSpecError, match=r"name=vit_b.*not a Python literal.*name='vit_b'"):
        parse_model_args(["name=vit_b"])


def test_parse_model_args_lowercase_true_hint() -> None:
    with pytest.raises(ModelSpecError, match=r"write pretrained=False"):
        parse_model_args(["pretrained=false"])


@pytest.mark.parametrize("item", ["num_classes", "=3", "2x=1", "a.b=1"])
def test_parse_model_args_refuses_malformed(item: str) -> None:
    with pytest.raises(ModelSpecError, match=r"is not K=V"):
        parse_model_args([item])


def test_parse_model_args_refuses_garbage_and_repeats() -> None:
    with pytest.raises(ModelSpecError, match=r"not a Python literal"):
        parse_model_args(["x=[1,"])
    with pytest.raises(ModelSpecError, match=r"give a value"):
        parse_model_args(["x="])
    with pytest.raises(ModelSpecError, match=r"given twice"):
        parse_model_args(["x=1", "x=2"])


def test_model_spec_error_is_a_checkpoint_error() -> None:
    assert issubclass(ModelSpecError, CheckpointError)


# --- torchvision ----------------------------------------------------------------------------


def test_torchvision_model_is_built_on_meta() -> None:
    built = build_model("torchvision:resnet18")
    assert isinstance(built, BuiltModel)
    assert built.spec == "torchvision:resnet18"
    assert built.on_meta and built.note is None
    assert all(p.is_meta for p in built.module.parameters())
    assert tuple(built.module.state_dict()["fc.weight"].shape) == (1000, 512)


def test_model_args_reach_the_builder() -> None:
    built = build_model("torchvision:resnet18", {"num_classes": 10})
    assert tuple(built.module.state_dict()["fc.weight"].shape) == (10, 512)


def test_build_on_cpu_when_asked() -> None:
    built = build_model("torchvision:resnet18", device="cpu")
    assert not built.on_meta
    assert all(p.device.type == "cpu" for p in built.module.parameters())


def test_huge_model_on_meta_is_quick_and_allocates_nothing() -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    built = build_model("torchvision:vit_h_14")
    elapsed = time.perf_counter() - start
    params = list(built.module.parameters())
    assert built.on_meta
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) > 600_000_000  # 2.5 GB if it were real
    assert elapsed < 10
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 500


def test_unknown_torchvision_name_suggests_close_ones() -> None:
    with pytest.raises(ModelSpecError, match=r"torchvision has no model 'resnet181'.*resnet18"):
        build_model("torchvision:resnet181")
    with pytest.raises(ModelSpecError, match=r"did you mean .*resnet50"):
        build_model("torchvision:ResNet50")


def test_bad_model_arg_for_the_builder_is_a_clean_error() -> None:
    with pytest.raises(ModelSpecError, match=r"torchvision:resnet18\(nope=1\) failed: TypeError"):
        build_model("torchvision:resnet18", {"nope": 1})


def test_spec_without_colon_suggests_torchvision() -> None:
    with pytest.raises(ModelSpecError, match=r"did you mean torchvision:resnet18\?"):
        build_model("resnet18")
    with pytest.raises(ModelSpecError, match=r"empty"):
        build_model("  ")


# --- package.module:attr --------------------------------------------------------------------


def test_import_spec_class_and_dotted_classmethod(factories: str) -> None:
    built = build_model(f"{factories}:Net", {"width": 5})
    assert built.on_meta
    assert tuple(built.module.state_dict()["fc.weight"].shape) == (2, 5)
    built = build_model(f"{factories}:Net.from_name", {"name": "big"})
    assert tuple(built.module.state_dict()["fc.weight"].shape) == (2, 8)


def test_import_spec_of_a_torchvision_function() -> None:
    built = build_model("torchvision.models:resnet18")
    assert built.on_meta


def test_factory_that_cannot_run_on_meta_falls_back_to_cpu(factories: str) -> None:
    built = build_model(f"{factories}:needs_values")
    assert not built.on_meta
    assert built.note is not None and "built on the CPU instead" in built.note
    assert all(p.device.type == "cpu" for p in built.module.parameters())


def test_tensors_created_off_meta_are_noted(factories: str) -> None:
    built = build_model(f"{factories}:numpy_buffer")
    assert not built.on_meta
    assert built.note is not None and "off the meta device" in built.note


def test_bad_module_path(factories: str) -> None:
    with pytest.raises(ModelSpecError, match=r"cannot import 'no_such_pkg_xyz.models'"):
        build_model("no_such_pkg_xyz.models:Net")
    with pytest.raises(ModelSpecError, match=r"not a dotted module path"):
        build_model("my-pkg:Net")


def test_module_in_cwd_is_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "local_models_in_cwd.py").write_text(
        "from torch import nn\n\ndef net(width=3):\n    return nn.Linear(width, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    path = [p for p in sys.path if p not in ("", ".", str(tmp_path))]
    monkeypatch.setattr(sys, "path", list(path))
    built = build_model("local_models_in_cwd:net", {"width": 5})
    assert built.module.weight.shape == (2, 5)
    assert sys.path == path  # the current folder is on the path only while importing


def test_module_whose_dependency_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_missing_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSpecError, match=r"needs 'no_such_dependency_xyz'"):
        build_model("needs_missing_dep:Net")


def test_bad_attribute_suggests_close_names(factories: str) -> None:
    with pytest.raises(ModelSpecError, match=rf"module '{factories}' has no attribute 'Nett'.*Net"):
        build_model(f"{factories}:Nett")
    with pytest.raises(
        ModelSpecError, match=rf"'{factories}:Net' has no attribute 'from_nam'.*from_name"
    ):
        build_model(f"{factories}:Net.from_nam")


def test_spec_must_name_a_factory(factories: str) -> None:
    with pytest.raises(ModelSpecError, match=r"names a int"):
        build_model(f"{factories}:NUMBER")
    with pytest.raises(ModelSpecError, match=r"names a model instance"):
        build_model(f"{factories}:instance")
    with pytest.raises(ModelSpecError, match=r"returned a tuple, not a torch.nn.Module"):
        build_model(f"{factories}:not_a_model")


def test_factory_error_is_wrapped(factories: str) -> None:
    with pytest.raises(ModelSpecError, match=r"broken\(\) failed: ValueError: width must be"):
        build_model(f"{factories}:broken")


def test_download_attempt_is_a_clean_error(factories: str) -> None:
    with pytest.raises(ModelSpecError, match=r"tried to download.*remove weights"):
        build_model(f"{factories}:downloads", {"weights": "DEFAULT"})
    with pytest.raises(ModelSpecError, match=r"tried to download.*downloads something by itself"):
        build_model(f"{factories}:downloads")


# --- timm -----------------------------------------------------------------------------------


def test_timm_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ModelSpecError, match=r"pip install timm"):
        build_model("timm:resnet18")


# The real timm (pretrained=False, num_classes, unknown names) is tested in
# test_model_targets.py.


# --- import cost ----------------------------------------------------------------------------


def test_importing_the_modules_does_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import ckptsurgery.models, ckptsurgery.match, ckptsurgery.keygroups
        assert "torch" not in sys.modules, "torch was imported"
        assert "torchvision" not in sys.modules, "torchvision was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)

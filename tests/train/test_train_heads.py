"""The classifier head: found by name (printed how), replaced for the class count, initialised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_support import TINY_VIT, TINY_VIT_ARGS, write_tiny_nets
from torch import nn

from ckptsurgery.models import build_model
from ckptsurgery.train.errors import HeadError
from ckptsurgery.train.heads import find_head, head_keys, replace_head


@pytest.mark.parametrize(
    ("spec", "args", "name", "in_features", "how"),
    [
        ("torchvision:resnet18", {}, "fc", 512, "'fc'"),
        ("torchvision:vit_b_16", {}, "heads.head", 768, "'heads.head'"),
        ("torchvision:vgg11", {}, "classifier.6", 4096, "'classifier', its last Linear"),
        ("torchvision:efficientnet_b0", {}, "classifier.1", 1280, "its last Linear"),
        ("torchvision:convnext_tiny", {}, "classifier.2", 768, "its last Linear"),
        ("torchvision:swin_t", {}, "head", 768, "'head'"),
        ("torchvision:densenet121", {}, "classifier", 1024, "'classifier'"),
        (TINY_VIT, TINY_VIT_ARGS, "heads.head", 16, "'heads.head'"),
    ],
)
def test_head_is_found_by_name(
    spec: str, args: dict[str, object], name: str, in_features: int, how: str
) -> None:
    model = build_model(spec, args).module  # on meta: structure only
    head = find_head(model)
    assert (head.name, head.in_features) == (name, in_features)
    assert how in head.how
    assert head.name in head.describe() and head.how in head.describe()


def test_replace_keeps_the_place_in_a_sequential_and_the_state_dict_order() -> None:
    model = build_model("torchvision:vgg11").module
    before = list(model.state_dict())
    head = replace_head(model, find_head(model), 7)
    assert head.out_features == 7
    assert isinstance(model.classifier[6], nn.Linear)
    assert model.classifier[6].weight.shape == (7, 4096)
    assert list(model.state_dict()) == before
    assert head_keys(model, head) == ["classifier.6.weight", "classifier.6.bias"]


def test_new_head_is_normal_0_01_with_zero_bias() -> None:
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU())
    model.fc = nn.Linear(64, 1000)
    head = replace_head(model, find_head(model), 500, generator=torch.Generator().manual_seed(0))
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    assert w.shape == (500, 64) and head.out_features == 500
    assert abs(float(w.std()) - 0.01) < 0.0005
    assert abs(float(w.mean())) < 0.001
    assert torch.equal(b, torch.zeros(500))


def test_head_override_and_its_errors() -> None:
    model = build_model("torchvision:vgg11").module
    assert find_head(model, "classifier.3").name == "classifier.3"
    head = find_head(model, "classifier")
    assert head.name == "classifier.6" and head.how.startswith("--head classifier")
    assert find_head(model, "classifier.6.weight").name == "classifier.6"
    with pytest.raises(HeadError, match="no module of that name"):
        find_head(model, "clasifier")
    with pytest.raises(HeadError, match=r"holds no nn\.Linear"):
        find_head(model, "features")


def test_last_linear_is_the_fallback_and_no_linear_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_nets(tmp_path)
    monkeypatch.chdir(tmp_path)
    head = find_head(build_model("tinynets:Unnamed").module)
    assert head.name == "out" and "last nn.Linear" in head.how
    with pytest.raises(HeadError, match=r"no nn\.Linear"):
        find_head(build_model("tinynets:NoLinear").module)
    with pytest.raises(HeadError, match=r"no nn\.Linear"):
        find_head(build_model("torchvision:squeezenet1_0").module)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    ("name", "aux"), [("googlenet", "aux1, aux2"), ("inception_v3", "AuxLogits")]
)
def test_aux_heads_are_refused_unless_disabled(name: str, aux: str) -> None:
    with pytest.raises(HeadError, match=rf"auxiliary classifiers \({aux}\).*aux_logits=False"):
        find_head(build_model(f"torchvision:{name}").module)
    model = build_model(f"torchvision:{name}", {"aux_logits": False, "init_weights": False})
    assert find_head(model.module).name == "fc"


def test_timm_style_get_classifier_wins() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)  # a name the search knows, but not the classifier
            self.logits = nn.Linear(4, 3)

        def get_classifier(self) -> nn.Module:
            return self.logits

    head = find_head(Net())
    assert head.name == "logits" and head.how == "timm get_classifier()"


def test_replace_on_meta_stays_on_meta() -> None:
    model = build_model("torchvision:resnet18").module
    replace_head(model, find_head(model), 3)
    assert model.fc.weight.is_meta and model.fc.weight.shape == (3, 512)

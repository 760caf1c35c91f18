"""Parameter groups by name for each mode, their checks, and ratio-keeping schedules.

Run for a torchvision ResNet-18 and a (tiny) torchvision ViT.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_train_support import TINY_VIT, TINY_VIT_ARGS
from torch import nn

from ckptsurgery.models import build_model
from ckptsurgery.train.config import TrainConfig
from ckptsurgery.train.errors import GroupCheckError, TrainError
from ckptsurgery.train.groups import (
    build_optimizer,
    check_groups,
    group_rows,
    group_table,
    layer_ids,
    plan_groups,
    set_trainable,
)
from ckptsurgery.train.heads import Head, find_head, replace_head
from ckptsurgery.train.runtime import autograd_node_kinds
from ckptsurgery.train.schedule import build_scheduler, lr_factor

MODELS = {
    "resnet18": ("torchvision:resnet18", {}, "fc"),
    "vit": (TINY_VIT, TINY_VIT_ARGS, "heads.head"),
}


def setup(
    which: str, mode: str, **options: object
) -> tuple[nn.Module, Head, torch.optim.Optimizer, TrainConfig]:
    spec, args, _ = MODELS[which]
    model = build_model(spec, args, device="cpu").module
    head = replace_head(model, find_head(model), 5)
    config = TrainConfig(model=spec, data="d", out="o", mode=mode, lr=0.01, **options)  # type: ignore[arg-type]
    set_trainable(model, head, mode)
    optimizer = build_optimizer(model, plan_groups(model, head, config), config)
    check_groups(optimizer, model, head, mode)
    return model, head, optimizer, config


@pytest.fixture(params=sorted(MODELS))
def which(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def names_in(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_linear_probe_trains_exactly_the_head(which: str) -> None:
    model, _, optimizer, _ = setup(which, "linear-probe")
    head_names = {f"{MODELS[which][2]}.weight", f"{MODELS[which][2]}.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == head_names
    assert names_in(optimizer, model) == {"head": head_names}
    assert [g["lr"] for g in optimizer.param_groups] == [0.01]


def test_full_trains_everything_at_lr(which: str) -> None:
    model, _, optimizer, _ = setup(which, "full")
    everything = {n for n, _ in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    assert names_in(optimizer, model) == {"all": everything}
    assert [g["lr"] for g in optimizer.param_groups] == [0.01]


def test_discriminative_head_at_ten_times(which: str) -> None:
    model, _, optimizer, _ = setup(which, "discriminative")
    head = MODELS[which][2]
    groups = names_in(optimizer, model)
    assert groups["head"] == {f"{head}.weight", f"{head}.bias"}
    assert groups["backbone"] == {n for n, _ in model.named_parameters()} - groups["head"]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"backbone": 0.01, "head": pytest.approx(0.1)}
    assert all(g["weight_decay"] == 1e-3 for g in optimizer.param_groups)


def test_head_lr_mult_is_honoured() -> None:
    _, _, optimizer, _ = setup("vit", "discriminative", head_lr_mult=3.0)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.03)


def test_group_table_lists_each_group_with_counts() -> None:
    model, _, optimizer, _ = setup("resnet18", "discriminative")
    rows = group_rows(optimizer)
    assert [r["group"] for r in rows] == ["backbone", "head"]
    assert rows[1]["tensors"] == 2 and rows[1]["parameters"] == 512 * 5 + 5
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in model.parameters())
    text = group_table(optimizer)
    header = text.splitlines()[0].split()
    assert header == ["group", "tensors", "parameters", "lr", "weight", "decay"]
    assert "0.1" in text and "2,565" in text


def test_checks_catch_a_parameter_in_two_groups_and_a_missing_one() -> None:
    model, head, optimizer, _ = setup("vit", "discriminative")
    # torch refuses this when building; a group edited afterwards is caught before step 1.
    optimizer.param_groups[0]["params"].append(model.heads.head.weight)
    with pytest.raises(GroupCheckError, match=r"heads.head.weight is in two optimizer groups"):
        check_groups(optimizer, model, head, "discriminative")
    short = torch.optim.SGD([{"name": "a", "params": [model.heads.head.weight]}], lr=0.1)
    with pytest.raises(GroupCheckError, match="trainable but in no group"):
        check_groups(short, model, head, "full")


def test_checks_catch_a_linear_probe_that_trains_more_than_the_head() -> None:
    model, head, optimizer, _ = setup("resnet18", "linear-probe")
    model.conv1.weight.requires_grad_(True)
    with pytest.raises(GroupCheckError, match="trainable but in no group"):
        check_groups(optimizer, model, head, "linear-probe")
    optimizer.add_param_group({"name": "oops", "params": [model.conv1.weight]})
    with pytest.raises(GroupCheckError, match="not exactly the head's"):
        check_groups(optimizer, model, head, "linear-probe")


def step_through(optimizer: torch.optim.Optimizer, scheduler: object, n: int) -> list[list[float]]:
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for _ in range(n):
            lrs.append([g["lr"] for g in optimizer.param_groups])
            scheduler.step()  # type: ignore[attr-defined]
    return lrs


@pytest.mark.parametrize("kind", ["step", "cosine"])
@pytest.mark.parametrize("mode", ["discriminative", "full", "linear-probe"])
def test_scheduler_moves_every_group_and_keeps_the_ratio(which: str, mode: str, kind: str) -> None:
    _, _, optimizer, _ = setup(which, mode, layer_decay=0.5 if mode == "full" else None)
    base = [g["lr"] for g in optimizer.param_groups]
    scheduler = build_scheduler(
        optimizer, kind, epochs=6, steps_per_epoch=3, warmup_epochs=1, min_lr_ratio=0.1
    )
    history = step_through(optimizer, scheduler, 18)
    for lrs in history:
        for lr, b in zip(lrs, base, strict=True):
            assert lr / b == pytest.approx(lrs[0] / base[0])  # same factor on every group
    for i in range(len(base)):
        column = [lrs[i] for lrs in history]
        assert min(column) < max(column)  # every group moves
        assert max(column) == pytest.approx(base[i])  # warmup reaches the base lr
    if kind == "cosine":
        # The floor is a fraction of each group's own lr: the last of 15 steps after warmup
        # is at t = 14/15 of the way down to it.
        last = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 14 / 15))
        for i, b in enumerate(base):
            assert history[-1][i] == pytest.approx(last * b)


def test_lr_factor_shapes() -> None:
    warm = lr_factor("none", epochs=4, steps_per_epoch=2, warmup_epochs=2)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    step = lr_factor("step", epochs=7, steps_per_epoch=1, warmup_epochs=1, gamma=0.5)
    assert [step(s) for s in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    cos = lr_factor("cosine", epochs=2, steps_per_epoch=2, min_lr_ratio=0.2)
    assert cos(0) == 1.0
    assert cos(2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_scheduler_state_is_plain_and_resumes() -> None:
    _, _, optimizer, _ = setup("vit", "discriminative")
    scheduler = build_scheduler(optimizer, "cosine", epochs=3, steps_per_epoch=4)
    step_through(optimizer, scheduler, 5)
    state = scheduler.state_dict()
    assert state["last_epoch"] == 5 and state["lr_lambdas"] == [None, None]
    _, _, optimizer2, _ = setup("vit", "discriminative")
    again = build_scheduler(optimizer2, "cosine", epochs=3, steps_per_epoch=4)
    again.load_state_dict(state)
    assert step_through(optimizer, scheduler, 3)[1:] == step_through(optimizer2, again, 3)[1:]


def test_layer_decay_groups_for_resnet_stages_and_vit_blocks() -> None:
    model, _, optimizer, _ = setup("resnet18", "discriminative", layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    # stem 0, layer1..layer4 = 1..4; the head at lr x 10
    assert lrs == pytest.approx(
        {
            "backbone.0": 0.01 * 0.5**4,
            "backbone.1": 0.01 * 0.5**3,
            "backbone.2": 0.01 * 0.5**2,
            "backbone.3": 0.01 * 0.5,
            "backbone.4": 0.01,
            "head": 0.1,
        }
    )
    assert names_in(optimizer, model)["backbone.0"] == {"conv1.weight", "bn1.weight", "bn1.bias"}
    vit = build_model(TINY_VIT, TINY_VIT_ARGS).module
    ids = layer_ids([n for n, _ in vit.named_parameters() if not n.startswith("heads.")])
    assert ids["class_token"] == ids["conv_proj.weight"] == ids["encoder.pos_embedding"] == 0
    assert ids["encoder.layers.encoder_layer_0.ln_1.weight"] == 1
    assert ids["encoder.layers.encoder_layer_1.mlp.0.weight"] == 2
    assert ids["encoder.ln.weight"] == 3
    with pytest.raises(TrainError, match="knows ResNet stages"):
        layer_ids(["features.0.weight", "features.1.weight"])


def test_config_refuses_layer_decay_in_linear_probe() -> None:
    with pytest.raises(TrainError, match="--layer-decay"):
        TrainConfig(model="m", data="d", out="o", mode="linear-probe", layer_decay=0.7)


def test_no_decay_norm_bias_splits_each_group_by_name(which: str) -> None:
    model, head, optimizer, _ = setup(
        which, "discriminative", weight_decay=0.05, decay_norm_bias=False
    )
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone", "backbone.no_decay", "head", "head.no_decay"}
    names = names_in(optimizer, model)
    assert names["head"] == {f"{head.name}.weight"}
    assert names["head.no_decay"] == {f"{head.name}.bias"}
    # In these two models "a norm layer's or a bias" is exactly "a vector": BN/LN scales and
    # shifts, biases (MHA's in_proj_bias too); convs, linears and embeddings keep decaying.
    vectors = {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert names["backbone.no_decay"] == vectors - names["head.no_decay"]
    norm_weight = "bn1.weight" if which == "resnet18" else "encoder.ln.weight"
    assert norm_weight in names["backbone.no_decay"]
    assert {g["weight_decay"] for g in optimizer.param_groups if "no_decay" in g["name"]} == {0}
    assert groups["backbone"]["weight_decay"] == 0.05
    # Same lr as its twin, and the schedule keeps every ratio.
    assert groups["backbone.no_decay"]["lr"] == groups["backbone"]["lr"]
    assert groups["head.no_decay"]["lr"] == groups["head"]["lr"] == 0.1


def test_weight_decay_on_everything_by_default(which: str) -> None:
    _, _, optimizer, _ = setup(which, "full", weight_decay=0.05)
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("all", 0.05)]


def test_linear_probe_records_no_autograd_graph_through_the_backbone(which: str) -> None:
    """No backward through the frozen backbone: one forward records the head's nodes only."""
    spec, args, _ = MODELS[which]
    model, _, _, _ = setup(which, "linear-probe")
    model.eval()
    size = args.get("image_size", 32)
    kinds = autograd_node_kinds(model(torch.randn(2, 3, size, size)))
    assert kinds == ["AccumulateGrad", "AccumulateGrad", "AddmmBackward0", "TBackward0"], spec

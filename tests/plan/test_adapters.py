"""The shape adapters (rows, in-chans, resample-pos-embed): equal to timm's functions, their
shapes known from headers, bound to output names, checked before any byte is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import raw
from safetensors.torch import load_file, save_file

from ckptsurgery.errors import MergeError, RuleError
from ckptsurgery.io import open_checkpoint
from ckptsurgery.merge import average_files, merge_files
from ckptsurgery.plan.adapt import (
    AdapterError,
    InChans,
    ResamplePosEmbed,
    Rows,
    adapter_from_dict,
    format_indices,
    parse_grid,
    parse_indices,
    read_indices,
)
from ckptsurgery.plan.adapters import adapt_in_chans, resample_pos_embed, take_rows
from ckptsurgery.plan.build import build_plan
from ckptsurgery.recipe import parse_recipe
from ckptsurgery.rules import Rules
from ckptsurgery.surgery import remap

timm = pytest.importorskip("timm", reason="the adapters are checked against timm's functions")
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models import adapt_input_conv  # noqa: E402

TOL = 1e-6


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got.double() - want.double()).abs().max().item() <= TOL


# -- the math against timm ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (16, 3, 7, 7), (4, 2, 5, 5)])
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_in_chans_equals_timm(dtype: torch.dtype, shape: tuple[int, ...], channels: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    before = raw(w)
    want = adapt_input_conv(channels, w.clone(), base_chans=shape[1])
    got = adapt_in_chans(w, channels)
    close(got, want)
    assert got.shape == (shape[0], channels, *shape[2:])
    assert raw(w) == before  # the input is never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize(
    ("size", "interpolation", "antialias"),
    [
        ((24, 24), "bicubic", True),
        ((7, 7), "bicubic", True),  # downsampling: where antialias matters
        ((10, 16), "bicubic", False),
        ((20, 20), "bilinear", True),
        ((9, 9), "bilinear", False),
        ((21, 21), "nearest", False),
        ((6, 6), "area", False),
    ],
)
def test_resample_equals_timm(
    dtype: torch.dtype,
    prefix: int,
    size: tuple[int, int],
    interpolation: str,
    antialias: bool,
) -> None:
    posemb = torch.randn(1, prefix + 14 * 14, 32, generator=torch.Generator().manual_seed(1))
    posemb = posemb.to(dtype)
    want = resample_abs_pos_embed(
        posemb,
        list(size),
        num_prefix_tokens=prefix,
        interpolation=interpolation,
        antialias=antialias,
    )
    got = resample_pos_embed(
        posemb,
        size,
        old_size=(14, 14),
        prefix_tokens=prefix,
        interpolation=interpolation,
        antialias=antialias,
    )
    close(got, want)
    assert raw(got[:, :prefix]) == raw(posemb[:, :prefix])  # prefix tokens kept as they are


def test_resample_non_square_grid_and_flat_layout() -> None:
    posemb = torch.randn(1, 1 + 12 * 16, 8, generator=torch.Generator().manual_seed(2))
    want = resample_abs_pos_embed(posemb, [18, 24], old_size=[12, 16], num_prefix_tokens=1)
    close(resample_pos_embed(posemb, (18, 24), old_size=(12, 16)), want)
    # [tokens, dim], as CLIP stores it: the same numbers without the leading 1
    close(resample_pos_embed(posemb[0], (18, 24), old_size=(12, 16)), want[0])
    # the same grid: the tensor itself, as timm returns it
    assert resample_pos_embed(posemb, (12, 16), old_size=(12, 16)) is posemb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_rows_are_the_rows_bit_for_bit(dtype: torch.dtype) -> None:
    t = (torch.randn(50, 3) * 10).to(dtype)
    idx = [4, 0, 4, 49, 7]  # any order, repeats allowed
    got = take_rows(t, idx)
    assert got.shape == (5, 3) and got.dtype == dtype
    assert raw(got) == raw(t[idx])


# -- index and grid text -----------------------------------------------------------------------


def test_parse_indices() -> None:
    assert parse_indices("0,5,7-9") == (0, 5, 7, 8, 9)
    assert parse_indices("3\n1 # a comment\n\n2, 2\n") == (3, 1, 2, 2)
    for bad, fragment in [
        ("a", "'a' is not a row index"),
        ("-1", "'-1' is not a row index"),
        ("1.5", "'1.5'"),
        ("9-7", "runs backwards"),
        ("", "no row index"),
    ]:
        with pytest.raises(AdapterError, match=fragment):
            parse_indices(bad)


@pytest.mark.parametrize(
    "indices", [(0, 1, 2, 3, 7, 5), (1,), (3, 4), (9, 8, 7), tuple(range(1000)), (0, 0, 1, 2, 3)]
)
def test_format_indices_round_trips(indices: tuple[int, ...]) -> None:
    assert parse_indices(format_indices(indices)) == indices
    assert format_indices(range(10)) == "0-9"


def test_read_indices(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("207\n208\n# retrievers\n1-3\n")
    assert read_indices(tmp_path / "classes.txt") == (207, 208, 1, 2, 3)
    with pytest.raises(AdapterError, match="does not exist"):
        read_indices(tmp_path / "nope.txt")
    (tmp_path / "bad.txt").write_text("1\nx\n")
    with pytest.raises(AdapterError, match=r"bad\.txt.*'x'"):
        read_indices(tmp_path / "bad.txt")


def test_parse_grid() -> None:
    assert parse_grid("24x24") == (24, 24)
    assert parse_grid("12X16") == (12, 16)
    assert parse_grid("7") == (7, 7)
    for bad in ("24x", "0x4", "axb", "-3"):
        with pytest.raises(AdapterError):
            parse_grid(bad)


def test_adapter_values_check_their_parameters() -> None:
    with pytest.raises(AdapterError, match="channels must be a whole number >= 1"):
        InChans("conv1.weight", 0)
    with pytest.raises(AdapterError, match="interpolation 'cubic'"):
        ResamplePosEmbed("pos_embed", (24, 24), interpolation="cubic")
    with pytest.raises(AdapterError, match="antialias applies to bicubic and bilinear only"):
        ResamplePosEmbed("pos_embed", (24, 24), interpolation="nearest", antialias=True)
    assert ResamplePosEmbed("pos_embed", "8x8", interpolation="nearest").antialias is False
    with pytest.raises(AdapterError, match="row indices must be whole numbers"):
        Rows("fc.*", [1, -2])
    assert Rows("fc.*", "0-2").indices == (0, 1, 2)


# -- plans from headers ------------------------------------------------------------------------


def vit_like(tmp_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {
        "cls_token": torch.randn(1, 1, 8, generator=g),
        "pos_embed": torch.randn(1, 1 + 4 * 4, 8, generator=g),
        "patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g),
        "patch_embed.proj.bias": torch.randn(8, generator=g),
        "head.weight": torch.randn(100, 8, generator=g),
        "head.bias": torch.randn(100, generator=g),
        "steps": torch.tensor(7),
    }
    path = tmp_path / "vit.safetensors"
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path)
    return path


ALL = (
    Rows("head.weight", [3, 1, 4]),
    InChans("patch_embed.proj.weight", 1),
    ResamplePosEmbed("pos_embed", (6, 6)),
)


def plan_of(path: Path, adapters: tuple[object, ...], **kw: object) -> object:
    with open_checkpoint(path) as ckpt:
        return build_plan([ckpt], [Rules()], mode="remap", adapters=adapters, **kw)  # type: ignore[arg-type]


def test_plan_shapes_come_from_headers(tmp_path: Path) -> None:
    plan = plan_of(vit_like(tmp_path), ALL)
    infos = plan.infos  # type: ignore[attr-defined]
    assert infos["head.weight"].shape == (3, 8)
    assert infos["head.bias"].shape == (3,)  # the bias beside a matching weight
    assert infos["patch_embed.proj.weight"].shape == (8, 1, 4, 4)
    assert infos["pos_embed"].shape == (1, 37, 8)
    assert infos["pos_embed"].nbytes == 37 * 8 * 4
    ops = {e.name: e.op.describe() for e in plan.entries}  # type: ignore[attr-defined]
    assert ops["head.weight"] == ops["head.bias"] == "rows 3 of 100"
    assert ops["patch_embed.proj.weight"] == "in-chans 3->1"
    assert ops["pos_embed"] == "resample-pos-embed 4x4->6x6"
    assert ops["cls_token"] == "copy"


def test_remap_writes_what_timm_computes(tmp_path: Path) -> None:
    src = vit_like(tmp_path, torch.bfloat16)
    out = tmp_path / "out.safetensors"
    remap(src, out, Rules(), adapters=ALL)
    got, sd = load_file(out), load_file(src)
    close(got["patch_embed.proj.weight"], adapt_input_conv(1, sd["patch_embed.proj.weight"]))
    close(got["pos_embed"], resample_abs_pos_embed(sd["pos_embed"], [6, 6]))
    assert raw(got["head.weight"]) == raw(sd["head.weight"][[3, 1, 4]])
    assert raw(got["head.bias"]) == raw(sd["head.bias"][[3, 1, 4]])
    assert raw(got["cls_token"]) == raw(sd["cls_token"])


def test_adapters_apply_after_renaming_and_before_the_cast(tmp_path: Path) -> None:
    src = vit_like(tmp_path)
    out = tmp_path / "out.safetensors"
    result = remap(
        src,
        out,
        Rules(replace=[("head", "fc")]),
        adapters=(Rows("fc.*", "0-9"),),
        dtype="bfloat16",
    )
    e = {x.name: x for x in result.plan.entries}["fc.weight"]
    assert e.op.describe() == "rows 10 of 100 ->bfloat16"
    assert e.info.shape == (10, 8) and e.info.dtype == "bfloat16" and e.info.nbytes == 160
    got = load_file(out)["fc.weight"]
    assert raw(got) == raw(load_file(src)["head.weight"][:10].to(torch.bfloat16))
    # the bytes the cast saves are the cast's, not the rows left out
    assert result.plan.bytes_saved == sum(
        x.info.nbytes for x in result.plan.entries if x.op.param("dtype")
    )


def test_tied_tensors_stay_tied(tmp_path: Path) -> None:
    emb = torch.randn(20, 4)
    src = tmp_path / "lm.pth"
    torch.save({"embed.weight": emb, "lm_head.weight": emb}, src)
    out = tmp_path / "out.pth"
    result = remap(src, out, Rules(), adapters=(Rows("*.weight", [5, 2]),))
    assert result.plan.ties == {"lm_head.weight": "embed.weight"}
    sd = torch.load(out, weights_only=True)
    assert raw(sd["lm_head.weight"]) == raw(emb[[5, 2]])
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()


@pytest.mark.parametrize(
    ("adapter", "fragment"),
    [
        (Rows("head.*", [100]), r"index 100 is out of range for head.bias \[100\] \(100 rows"),
        (Rows("steps", [0]), r"steps has shape \[\]"),
        (InChans("head.weight", 1), r"head.weight has shape \[100, 8\]; this adapter needs a conv"),
        (
            ResamplePosEmbed("patch_embed.proj.weight", (6, 6)),
            r"proj.weight has shape \[8, 3, 4, 4\]; this adapter needs a position embedding",
        ),
        (ResamplePosEmbed("head.weight", (6, 6)), r"\[100, 8\] has 99 tokens after 1 prefix"),
        (ResamplePosEmbed("pos_embed", (6, 6), prefix_tokens=0), "17 tokens .* not a square grid"),
        (ResamplePosEmbed("pos_embed", (6, 6), old_size=(2, 4)), "not 2x4 = 8"),
        (ResamplePosEmbed("cls_token", (6, 6)), "not more than the 1 prefix tokens"),
    ],
)
def test_bad_shapes_are_refused_from_headers(
    tmp_path: Path, adapter: object, fragment: str
) -> None:
    with pytest.raises(RuleError, match=fragment):
        plan_of(vit_like(tmp_path), (adapter,))


def test_in_chans_refuses_integer_tensors(tmp_path: Path) -> None:
    path = tmp_path / "int.safetensors"
    save_file({"conv.weight": torch.zeros(2, 3, 1, 1, dtype=torch.int32)}, path)
    with pytest.raises(RuleError, match=r"conv\.weight is int32"):
        plan_of(path, (InChans("conv.weight", 1),))


def test_one_adapter_per_tensor_and_unused_ones_are_notes(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match=r"head\.weight is matched by two adapters"):
        plan_of(vit_like(tmp_path), (Rows("head.*", [0]), Rows("head.weight", [1])))
    plan = plan_of(vit_like(tmp_path), (Rows("classifier.*", [0]),))
    assert plan.notes == ("--rows 'classifier.*' 0 matched no key",)  # type: ignore[attr-defined]


def test_merge_adapts_the_union_and_average_refuses(tmp_path: Path) -> None:
    a = vit_like(tmp_path)
    b = tmp_path / "extra.safetensors"
    save_file({"extra": torch.ones(3)}, b)
    out = tmp_path / "merged.safetensors"
    merge_files([a, b], out, adapters=(Rows("head.*", [0, 1]),))
    assert load_file(out)["head.bias"].shape == (2,)
    with pytest.raises(MergeError, match="not to an average"):
        average_files([a, a], None, dry_run=True, adapters=(Rows("head.*", [0]),))


# -- recipes -----------------------------------------------------------------------------------


def test_recipe_adapt_tables(tmp_path: Path) -> None:
    vit_like(tmp_path)
    (tmp_path / "classes.txt").write_text("3\n1\n")
    recipe = parse_recipe(
        """
        [[source]]
        path = "vit.safetensors"

        [[adapt]]
        op = "rows"
        key = "head.*"
        indices_file = "classes.txt"

        [[adapt]]
        op = "in-chans"
        key = "patch_embed.proj.weight"
        channels = 4

        [[adapt]]
        op = "resample-pos-embed"
        key = "pos_embed"
        size = [6, 8]
        prefix_tokens = 1
        interpolation = "bilinear"
        antialias = false

        [output]
        path = "out.safetensors"
        """.replace("\n        ", "\n"),
        base=tmp_path,
    )
    assert recipe.adapters == (
        Rows("head.*", [3, 1]),
        InChans("patch_embed.proj.weight", 4),
        ResamplePosEmbed("pos_embed", (6, 8), interpolation="bilinear", antialias=False),
    )
    for a in recipe.adapters:
        assert adapter_from_dict(a.to_dict()) == a


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ('op = "cols"\nkey = "x"', "line 4: [[adapt]] #1 op: op must be one of"),
        ('op = "rows"\nkey = "x"', "[[adapt]] #1 indices: give one of"),
        ('op = "rows"\nkey = "x"\nindices = "1,b"', "line 6: [[adapt]] #1 indices: 'b'"),
        ('op = "rows"\nkey = "x"\nindices = [1, -1]', "row indices must be whole numbers"),
        ('op = "rows"\nkey = "x"\nindices_file = "none.txt"', "indices_file: indices file"),
        ('op = "in-chans"\nkey = "x"\nchannel = 1', "line 6: [[adapt]] #1 channel: unknown field"),
        ('op = "in-chans"\nkey = "x"\nchannels = "1"', "channels must be a whole number"),
        ('op = "resample-pos-embed"\nkey = "x"\nsize = [1]', "size must be a grid"),
        ('op = "in-chans"\nchannels = 1', "key: must be the output key or a glob"),
    ],
)
def test_recipe_adapt_problems(tmp_path: Path, table: str, fragment: str) -> None:
    vit_like(tmp_path)
    text = (
        f'[[source]]\npath = "vit.safetensors"\n[[adapt]]\n{table}\n'
        '[output]\npath = "out.safetensors"\n'
    )
    with pytest.raises(RuleError) as e:
        parse_recipe(text, base=tmp_path, name="r.toml")
    assert fragment in str(e.value)

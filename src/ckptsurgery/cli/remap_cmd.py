from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ckptsurgery.cli._adapters import adapter_options
from ckptsurgery.cli._options import (
    GateFlags,
    WriteFlags,
    gate_options,
    rule_options,
    source_options,
    write_options,
)
from ckptsurgery.cli._surgery import surgery_command
from ckptsurgery.rules import Rules
from ckptsurgery.surgery import remap

if TYPE_CHECKING:
    from ckptsurgery.plan.adapt import Adapter
    from ckptsurgery.plan.run import SurgeryResult


@click.command("remap")
@click.argument("src")
@rule_options
@write_options
@adapter_options
@gate_options
@source_options
def remap_cmd(
    src: str,
    rules: Rules,
    rules_key: str | None,
    write: WriteFlags,
    adapters: tuple[Adapter, ...],
    gate_flags: GateFlags,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """Filter and rename the keys of SRC and write the result to OUT.

    Rules apply in this order: --keep, --drop, --strip-prefix, --replace, --regex,
    --add-prefix. Tensors are copied bit-exactly, or cast with --dtype (integer and bool
    tensors never are; --keep-dtype spares more); OUT is written atomically and SRC is never
    modified. --dry-run prints the plan: every output tensor, its operation and bytes.

    With --model, the renamed keys are first matched against the model (as `diff` does): the
    report is printed and nothing is written (exit 1) unless they fit, allowing the keys given
    with --allow-missing / --allow-unexpected.

    Shape adapters, applied to the renamed keys: --rows keeps rows of a head (and its bias),
    --in-chans adapts a first convolution to N input channels, --resample-pos-embed resamples
    a ViT position embedding to another grid (the last two as timm does).

    \b
    Example (the backbone of a MoCo checkpoint, checked against the model first):
      ckptsurgery remap moco_v2.pth.tar -o resnet50.safetensors \\
          --keep 'module.encoder_q.*' --drop 'module.encoder_q.fc.*' \\
          --strip-prefix module.encoder_q. \\
          --model torchvision:resnet50 --allow-missing 'fc.*'

    \b
    Example (a sharded Hugging Face checkpoint, resharded into 5 GB safetensors shards):
      ckptsurgery remap llama-7b/ -o llama-7b-st/ --max-shard-size 5GB

    \b
    Example (a ViT trained at 224 for 384 inputs, 10 of its classes, checked first):
      ckptsurgery remap vit_224.pth -o vit_384.safetensors \\
          --resample-pos-embed pos_embed 24x24 --rows 'head.*' 0-9 \\
          --model timm:vit_tiny_patch16_384 --model-arg num_classes=10

    \b
    Example (bfloat16, BatchNorm statistics kept in float32, saved as a recipe too):
      ckptsurgery remap resnet50.pth -o resnet50-bf16.safetensors --dtype bfloat16 \\
          --keep-dtype '*.running_*' --emit-recipe resnet50-bf16.toml
    """
    src_key = key or rules_key

    def run(**options: Any) -> SurgeryResult:
        return remap(
            src,
            write.out,
            rules,
            key=src_key,
            allow_globals=allow_globals,
            unsafe_pickle=unsafe_pickle,
            **options,
        )

    def payload(result: SurgeryResult) -> dict[str, Any]:
        part = result.plan.sources[0]
        out: dict[str, Any] = {"source": src, "key": part.key, "output": write.out}
        out["rules"] = rules.to_dict()
        out.update(part.keys.to_dict())
        if result.written is not None:
            out.update(tensors=result.written.tensors)
        return out

    surgery_command(
        "remap",
        write,
        gate_flags,
        sources=[(src, src_key, rules)],
        run=run,
        given_key=src_key,
        payload=payload,
        adapters=adapters,
    )

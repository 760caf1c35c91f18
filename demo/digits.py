"""Real weights, real data: an MNIST CNN fine-tuned on the UCI handwritten digits, four ways.

    python demo/digits.py [OUT] [--seed 0] [--epochs 30]      # `make demo` runs it

Needs the demo extra (``pip install -e '.[demo]'``): ``digit-recognizer-py`` (MIT) ships a CNN
trained on MNIST (``digit_recognizer/models/handwriting_model.pth``, keys ``conv_layers.*``,
``fc_layers.*``), and scikit-learn ships the UCI digits (``load_digits``: 1,797 8x8 images).

1. The digits become an ImageFolder tree in MNIST's format (28x28, the digit scaled to 20x20
   and centred, white on black): a fixed, stratified half is ``test``; of the other half, 10
   images per class are ``train`` and 20 per class ``val`` (which picks the best epoch).
2. The checkpoint is scanned, inspected and diffed against ``ckptsurgery.demo_models:DigitNet``,
   whose layers have other names; ``diff --suggest`` proposes rules; a recipe
   (``demo/digits_recipe.toml``) renames it, gated on the model.
3. ``ckptsurgery train`` four times with one seed: from scratch (no weights), linear probe, full
   and discriminative fine-tuning; ``ckptsurgery evaluate`` puts each best epoch on ``test``.
4. One table: mode, test accuracy, time. ``OUT/summary.json`` holds the same numbers.
5. timm's recipe: full fine-tuning again with an EMA of the weights (``--ema``), label
   smoothing and the 3 best epochs kept and averaged (``--keep-top-k 3 --average-top-k``);
   the raw (best epoch), EMA and averaged weights side by side on ``test``.

Every step is a ``ckptsurgery`` command, printed before it runs (they run in this process, through
the command line's own entry point, so that torch is imported once).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL = "ckptsurgery.demo_models:DigitNet"
# MNIST's input: 1x28x28, normalised with MNIST's mean and std (as digit-recognizer-py does).
TRANSFORM = ["--image-size", "28", "--channels", "1", "--mean", "0.1307", "--std", "0.3081"]
TRAIN_PER_CLASS = 10
VAL_PER_CLASS = 20
# mode, --mode, from the MNIST weights?, --lr. Scratch gets a larger lr (its best, so that the
# baseline is not a straw man); discriminative trains the backbone at 0.001 and the head at 10x.
RUNS = (
    ("scratch", "full", False, 0.05),
    ("linear probe", "linear-probe", True, 0.01),
    ("full", "full", True, 0.01),
    ("discriminative", "discriminative", True, 0.001),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="demo-out/digits", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    missing = [m for m in ("sklearn", "digit_recognizer") if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"Error: the digits demo needs {' and '.join(missing)}: pip install -e '.[demo]'",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / "data"

    heading("1. The UCI digits (scikit-learn) as an ImageFolder tree in MNIST's format")
    counts = export_digits(data)
    print(", ".join(f"{split}: {n} images" for split, n in counts.items()))

    heading("2. A real MNIST CNN (digit-recognizer-py): what is in it, and is it safe to load?")
    ckpt = out / "mnist_cnn.pth"
    shutil.copyfile(mnist_checkpoint(), ckpt)
    run("scan", ckpt)
    run("inspect", ckpt)

    heading("3. Does it fit DigitNet? No: other names. --suggest finds every layer's new name")
    run("diff", ckpt, "--model", MODEL, "--suggest", check=False)

    heading("4. The recipe: the suggested renames, MNIST's head dropped for a fresh one")
    recipe = out / "digits_recipe.toml"
    shutil.copyfile(HERE / "digits_recipe.toml", recipe)
    print(recipe.read_text().strip())
    run("apply", recipe)
    weights = out / "digitnet_mnist.safetensors"
    run("diff", weights, "--model", MODEL, "--allow-missing", "head.*")

    heading(f"5. Fine-tune four ways (seed {args.seed}, {args.epochs} epochs), evaluate on test")
    rows = []
    for name, mode, pretrained, lr in RUNS:
        run_dir = out / "runs" / name.replace(" ", "-")
        options = ["--mode", mode, "--lr", str(lr), "--epochs", str(args.epochs)]
        options += ["--batch-size", str(args.batch_size), "--seed", str(args.seed)]
        if pretrained:
            options += ["--weights", weights]
        started = time.perf_counter()
        run("train", "--model", MODEL, "--data", data, "-o", run_dir, *options, *TRANSFORM)
        seconds = time.perf_counter() - started
        result = run(
            "evaluate", "--model", MODEL, "--weights", run_dir / "best.safetensors",
            "--data", data, *TRANSFORM, "--json", capture=True,
        )  # fmt: skip
        test = json.loads(result)
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        rows.append(
            {
                "mode": name,
                "weights": "MNIST" if pretrained else "none (scratch)",
                "test_top1": test["top1"],
                "test_loss": test["loss"],
                "test_samples": test["samples"],
                "best_epoch": max(epochs, key=lambda m: (m["top1"], -m["val_loss"]))["epoch"],
                "seconds": round(seconds, 1),
            }
        )

    heading(f"6. Test accuracy on {rows[0]['test_samples']} held-out UCI digits")
    print(table(rows))

    heading("7. timm's recipe: an EMA of the weights and the 3 best epochs averaged")
    run_dir = out / "runs" / "full-ema-averaged"
    run(
        "train", "--model", MODEL, "--data", data, "-o", run_dir, "--weights", weights,
        "--mode", "full", "--lr", "0.01", "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed), *TRANSFORM,
        "--ema", "0.9", "--label-smoothing", "0.1", "--keep-top-k", "3", "--average-top-k",
    )  # fmt: skip
    recipe = {}
    for name, file in RECIPE_WEIGHTS:
        result = run(
            "evaluate", "--model", MODEL, "--weights", run_dir / file, "--data", data,
            *TRANSFORM, "--json", capture=True,
        )  # fmt: skip
        recipe[name] = json.loads(result)["top1"]
    print(f"\nTest accuracy, the same run's weights side by side ({run_dir}):")
    print(side_by_side(recipe))
    summary = {"seed": args.seed, "runs": rows, "recipe": recipe}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n(the numbers are in {out / 'summary.json'}; the runs in {out / 'runs'}/)")
    return 0


def export_digits(root: Path) -> dict[str, int]:
    """Write ``root/{train,val,test}/<digit>/<index>.png`` (see the module docstring)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=0.5, stratify=labels, random_state=0)
    rng = np.random.default_rng(0)  # the split is fixed: it does not follow --seed
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": sorted(test.tolist())}
    for digit in range(10):
        pool = rng.permutation(rest[labels[rest] == digit]).tolist()
        splits["train"] += pool[:TRAIN_PER_CLASS]
        splits["val"] += pool[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS]
    for split, ids in splits.items():
        for i in ids:
            # 0..16 -> 0..255; MNIST draws a 20x20 digit in the middle of 28x28.
            pixels = (images[i].reshape(8, 8) * (255 / 16)).round().astype(np.uint8)
            digit_img = Image.fromarray(pixels, "L").resize((20, 20), Image.Resampling.BILINEAR)
            canvas = Image.new("L", (28, 28))
            canvas.paste(digit_img, (4, 4))
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            canvas.save(folder / f"{i:04d}.png")
    return {split: len(ids) for split, ids in splits.items()}


def mnist_checkpoint() -> Path:
    """The installed package's checkpoint, found without importing the package."""
    spec = importlib.util.find_spec("digit_recognizer")
    assert spec is not None and spec.submodule_search_locations  # checked in main()
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "handwriting_model.pth"


def run(*args: Any, check: bool = True, capture: bool = False) -> str:
    """Print ``$ ckptsurgery ARGS`` and run it, in this process (torch is imported once).

    It is the command line's own entry point, so output, errors and exit codes are exactly a
    shell user's. ``capture`` returns what it printed on stdout (and prints it too).
    """
    from ckptsurgery.cli import cli

    words = [str(a) for a in args]
    print(f"\n$ ckptsurgery {shlex.join(words)}", flush=True)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout) if capture else contextlib.nullcontext():
            cli.main(words, prog_name="ckptsurgery")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    if capture:
        print(stdout.getvalue().strip())
    if check and code != 0:
        raise SystemExit(f"Error: `ckptsurgery {words[0]}` exited with {code}")
    if not check:
        print(f"(exit code {code})")
    sys.stdout.flush()
    return stdout.getvalue()


RECIPE_WEIGHTS = (
    ("raw (best epoch)", "best.safetensors"),
    ("EMA", "ema.safetensors"),
    ("averaged (top 3)", "averaged.safetensors"),
)


def side_by_side(top1: dict[str, float]) -> str:
    widths = [max(len(name), 6) for name in top1]
    header = "  ".join(name.ljust(w) for name, w in zip(top1, widths, strict=True))
    values = "  ".join(f"{v:.4f}".ljust(w) for v, w in zip(top1.values(), widths, strict=True))
    return "\n".join([header, "  ".join("-" * w for w in widths), values])


def heading(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    header = ("mode", "weights", "test accuracy", "test loss", "time (s)")
    cells = [
        (
            r["mode"],
            r["weights"],
            f"{r['test_top1']:.4f}",
            f"{r['test_loss']:.4f}",
            f"{r['seconds']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Training speed of ``ckptsurgery train`` against a hand-written PyTorch loop, side by side.

    python benchmarks/bench_train.py                  # the whole table (a few minutes, 1 thread)
    python benchmarks/bench_train.py --epochs 4 --rounds 3 --images 16

Same model (torchvision resnet18, 10 classes), same data (an ImageFolder of 64x64 PNGs,
generated into a temporary folder), same transform, same batch (32), one CPU thread, no loader
workers. Each measure is the steady state: the training seconds of every epoch but the first,
as images per second over epochs and rounds; trainer and plain-loop runs alternate. The ratio
is that of the fastest epochs (as ``timeit`` takes the minimum: other load only ever slows an
epoch down), with the ratio of the medians beside it.

Seconds are the process's CPU time by default (``--clock cpu``): with one thread and no loader
workers that is the work done, and it does not move when other programs load the machine.
``--clock wall`` measures wall time instead (on a quiet machine the two agree).

Rows:
  discriminative vs plain   the trainer in discriminative mode (two groups, head at 10x, per-
                            step cosine schedule, progress bar and epoch lines on stderr)
                            against the plain loop (SGD with the same two groups, forward,
                            cross-entropy, backward, step). Target: >= 0.95x.
  linear probe vs full      the trainer in linear-probe mode against full mode. Target: >= 2.5x
                            (the frozen backbone builds no autograd graph: no backward through
                            it). The autograd graph of one linear-probe forward is also counted:
                            it must hold the head's nodes only.
  trainer's own work        what the trainer does per step beyond the plain loop (schedule
                            step, logits check, loss sum on the device, progress bar), timed
                            alone: microseconds against a step of about a second.
  --help                    wall time of ``ckptsurgery --help`` in a fresh interpreter (median
                            of 5; torch is not imported). Target: < 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ckptsurgery.models import build_model
from ckptsurgery.train import TrainConfig, TransformConfig, train
from ckptsurgery.train.data import build_transform, image_folder
from ckptsurgery.train.heads import find_head, replace_head

MODEL = "torchvision:resnet18"
SIZE = 64
BATCH = 32
CLASSES = 10
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def make_data(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(CLASSES):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 2
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def trainer_epochs(data: Path, work: Path, mode: str, epochs: int) -> list[float]:
    """Images per second of each epoch of ``ckptsurgery train`` (training time only)."""
    out = work / f"run-{mode}"
    config = TrainConfig(
        model=MODEL,
        data=str(data),
        out=str(out),
        mode=mode,  # type: ignore[arg-type]
        epochs=epochs,
        batch_size=BATCH,
        lr=0.01,
        transform=TransformConfig(image_size=SIZE),
        threads=1,
        workers=0,
        device="cpu",
        force=True,
        progress=True,  # logging on: the bar and the epoch lines go to stderr
    )
    from ckptsurgery.train import loop

    # The trainer times its epochs with time.perf_counter; give it this benchmark's clock.
    real_time = loop.time
    loop.time = types.SimpleNamespace(perf_counter=clock)  # type: ignore[assignment]
    try:
        result = train(config, log=lambda line: print(line, file=sys.stderr), show=lambda _: None)
    finally:
        loop.time = real_time
    n = len(image_folder(data / "train", None))
    return [n / m["train_seconds"] for m in result.metrics]


def plain_epochs(data: Path, epochs: int) -> list[float]:
    """Images per second of each epoch of the loop anyone would write by hand."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = build_model(MODEL, {}, device="cpu").module
    head = replace_head(model, find_head(model), CLASSES)
    dataset = image_folder(data / "train", build_transform(TransformConfig(SIZE), train=True))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0)
    head_params = [p for n, p in model.named_parameters() if n.startswith(head.name + ".")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(head.name + ".")]
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": 0.01}, {"params": head_params, "lr": 0.1}],
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-3,
    )
    rates = []
    for _ in range(epochs):
        model.train()
        start = clock()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            torch.autograd.backward(loss)
            optimizer.step()
        rates.append(len(dataset) / (clock() - start))
    return rates


def linear_probe_graph() -> tuple[int, list[str]]:
    """The autograd nodes one linear-probe forward records, as the trainer sets it up."""
    from ckptsurgery.train.groups import set_trainable
    from ckptsurgery.train.runtime import autograd_node_kinds

    model = build_model(MODEL, {}, device="cpu").module
    head = replace_head(model, find_head(model), CLASSES)
    set_trainable(model, head, "linear-probe")
    model.eval()
    kinds = autograd_node_kinds(model(torch.randn(2, 3, SIZE, SIZE)))
    return len(kinds), kinds


def help_seconds(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ckptsurgery", "--help"], check=True, stdout=subprocess.DEVNULL
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def steady(rates: list[float]) -> list[float]:
    return rates[1:] if len(rates) > 1 else rates  # the first epoch warms up


def rounds(n: int, *runs: Callable[[], list[float]]) -> list[list[float]]:
    """Run each of ``runs`` ``n`` times, interleaved; the steady epochs of each, pooled."""
    pooled: list[list[float]] = [[] for _ in runs]
    for _ in range(n):
        for i, run in enumerate(runs):
            pooled[i] += steady(run())
    return pooled


def step_overhead(steps: int = 2000) -> float:
    """Seconds per step of the trainer's additions to the plain loop, timed on their own."""
    import io
    from contextlib import redirect_stderr

    from ckptsurgery.train.runtime import Progress, autocast, check_logits
    from ckptsurgery.train.schedule import build_scheduler

    layer = torch.nn.Linear(4, CLASSES)
    optimizer = torch.optim.SGD([{"params": layer.parameters(), "lr": 0.1, "name": "all"}])
    scheduler = build_scheduler(optimizer, "cosine", epochs=10, steps_per_epoch=10)
    progress = Progress(True, 10, lambda _: None)
    logits, loss = torch.randn(BATCH, CLASSES), torch.tensor(1.0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        for i in range(steps):
            with autocast(torch.device("cpu"), False):
                check_logits(logits, BATCH, CLASSES)
            scheduler.step()
            loss_sum += loss.detach().double() * BATCH
            progress.step(0, i % 10, loss)
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (first dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each")
    parser.add_argument("--images", type=int, default=32, help="training images per class")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="see above")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        data = make_data(work / "data", args.images)
        pairs = [
            (
                "discriminative vs plain loop",
                lambda: trainer_epochs(data, work, "discriminative", args.epochs),
                lambda: plain_epochs(data, args.epochs),
                0.95,
            ),
            (
                "linear probe vs full (trainer)",
                lambda: trainer_epochs(data, work, "linear-probe", args.epochs),
                lambda: trainer_epochs(data, work, "full", args.epochs),
                2.5,
            ),
        ]
        for name, run_a, run_b, floor in pairs:
            rates_a, rates_b = rounds(args.rounds, run_a, run_b)
            medians = statistics.median(rates_a) / statistics.median(rates_b)
            rows.append((name, max(rates_a), max(rates_b), medians, floor))
    overhead = step_overhead()
    nodes, names = linear_probe_graph()
    seconds = help_seconds()

    print(
        f"\nresnet18, {SIZE}x{SIZE}, batch {BATCH}, 1 thread, {args.clock} clock, "
        f"torch {torch.__version__}"
    )
    print(f"{'measure':<32}  {'fastest epochs':<24}  {'ratio':>6}  {'medians':>7}  target    ok")
    for name, a, b, medians, floor in rows:
        ok = "yes" if a / b >= floor else "NO"
        value = f"{a:.1f} vs {b:.1f} img/s"
        target = f">= {floor}x"
        print(f"{name:<32}  {value:<24}  {a / b:>5.2f}x  {medians:>6.2f}x  {target:<8}  {ok}")
    share = overhead / (BATCH / rows[0][2])
    print(
        f"{'trainer-only work per step':<32}  {f'{overhead * 1e6:.0f} us':<24}  "
        f"{share:>6.2%} of a step"
    )
    ok = "yes" if seconds < 1 else "NO"
    print(f"{'ckptsurgery --help':<32}  {f'{seconds:.2f} s':<24}  {'':>6}  {'':>7}  < 1 s     {ok}")
    graph_ok = "yes" if set(names) <= {"AddmmBackward0", "TBackward0", "AccumulateGrad"} else "NO"
    print(f"linear-probe autograd graph: {nodes} nodes ({', '.join(names)}); head only: {graph_ok}")


if __name__ == "__main__":
    main()

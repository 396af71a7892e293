"""The main job: train a small MLP on scikit-learn's bundled digits data with the fused focal loss.

No download: `load_digits` ships inside scikit-learn.
"""

import torch
from torch import nn
from tqdm import tqdm

from .focal_loss import FocalLoss


def load_digits_split(seed=0, device="cpu"):
    """Standardised digits (1797 x 64, 10 classes), split 60 / 20 / 20 into train / val / test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    parts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val),
             "test": slice(n_train + n_val, None)}
    return {k: (x[s].to(device), y[s].to(device)) for k, s in parts.items()}


def make_mlp(n_in=64, n_hidden=128, n_classes=10):
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_classes))


def train(model, loss_fn, train_xy, eval_xy, *, epochs=30, batch_size=64, lr=1e-3, seed=0,
          desc="train"):
    """Adam, no weight decay. Yields (epoch, mean train loss, held-out accuracy) per epoch."""
    x, y = train_xy
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(eval_xy[0]).argmax(1) == eval_xy[1]).float().mean().item()
        yield epoch, total / count, acc


def run(epochs=30, seed=0, device="cpu", gamma="flsd-53"):
    torch.manual_seed(seed)
    data = load_digits_split(seed, device)
    model = make_mlp().to(device)
    loss_fn = FocalLoss(gamma=gamma)
    print(f"digits: {len(data['train'][1])} train / {len(data['val'][1])} held-out samples, "
          f"FocalLoss(gamma={gamma!r}) on {device}")
    for epoch, loss, acc in train(model, loss_fn, data["train"], data["val"], epochs=epochs,
                                  seed=seed, desc=f"FocalLoss {gamma}"):
        tqdm.write(f"epoch {epoch:3d}  train loss {loss:.4f}  held-out accuracy {100 * acc:.2f}%")
    return model

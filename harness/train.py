"""The paper's training recipe for one run: NT-ASGD, variable BPTT, AR/TAR, clipping, checkpoints.

`train_model(config, corpus)` trains, validates every epoch, tests once with the best (averaged, once
averaging is on) weights and returns a `TrainResult`. It imports no tracking or search library: pruning
and logging plug in through the per-epoch callback, which may raise to stop the run.
"""

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.config import RunConfig
from harness.data import Corpus, batchify, bptt_positions, get_batch
from harness.errors import UserError
from harness.model import AWDLSTM, detach_state

CHECK_EVERY = 20  # batches between finite-loss checks (a check syncs the GPU)


@dataclass(frozen=True)
class EpochResult:
    """Metrics of one epoch, as logged (step = epoch)."""

    epoch: int
    train_loss: float
    train_ppl: float
    val_loss: float
    val_ppl: float
    lr: float
    epoch_seconds: float
    tokens_per_s: float
    averaging: bool  # validated with averaged weights (NT-ASGD has triggered)


@dataclass(frozen=True)
class TrainResult:
    """The outcome of a finished run; test_* are None when the test split was not evaluated (search trials)."""

    config: RunConfig
    epochs: tuple
    best_epoch: int
    best_val_ppl: float
    test_loss: float | None
    test_ppl: float | None
    averaged_from_epoch: int | None
    seconds: float
    checkpoint: Path | None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to try."""


def perplexity(loss: float) -> float:
    """exp(loss), inf past float range."""
    try:
        return math.exp(loss)
    except OverflowError:  # loss > ~709.78
        return math.inf


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: AWDLSTM, source: torch.Tensor, bptt: int) -> float:
    """Mean cross-entropy per token over a batchified split (L, B), state carried across segments."""
    model.eval()
    state = model.init_state(source.size(1))
    total, count = source.new_zeros((), dtype=torch.float64), 0
    for i, seq_len in bptt_positions(source, bptt, None):
        inputs, targets = get_batch(source, i, seq_len)
        logits, state, _, _ = model(inputs, state)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
        count += targets.numel()
    return total.item() / count


class NTASGD:
    """Non-monotonically triggered ASGD (paper section 3): SGD that switches to averaged SGD (t0=0, lambd=0)
    once validation stops improving; `opt` is the torch optimizer in use."""

    def __init__(self, model: AWDLSTM, config: RunConfig):
        self.model, self.recipe = model, config.train
        self.averaging = False
        self.history: list[float] = []  # validation losses while not averaging
        self.opt = torch.optim.SGD(model.parameters(), lr=self.recipe.lr, weight_decay=self.recipe.weight_decay)

    def start_averaging(self):
        # All trainable parameters go to the new optimizer, as to the first.
        self.opt = torch.optim.ASGD(
            self.model.parameters(), lr=self.recipe.lr, t0=0, lambd=0.0, weight_decay=self.recipe.weight_decay
        )
        self.averaging = True

    def should_trigger(self, val_loss: float) -> bool:
        """Non-monotone trigger, as the reference code has it (main.py): switch when this epoch's loss is
        worse than the best of all but the last `nonmono` logged ones, `len(logs) > n and v > min(logs[:-n])`.
        The paper's Algorithm 1 writes the same test as `t > n and v > min(logs[0 .. t-n-1])` but applies
        it every L iterations rather than every epoch; we check once per epoch like the code that produced
        the paper's numbers."""
        n = self.recipe.nonmono
        return (
            self.recipe.optimizer == "nt-asgd" and not self.averaging
            and len(self.history) > n and val_loss > min(self.history[:-n])
        )

    @contextlib.contextmanager
    def averaged_weights(self):
        """The model holds the averaged weights inside the block (once averaging), its own ones after."""
        if not self.averaging:
            yield
            return
        # copy_ rather than `.data =`, so parameters that alias a flat weight buffer keep aliasing it.
        params = [p for p in self.model.parameters() if p in self.opt.state]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.copy_(self.opt.state[p]["ax"])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, own in zip(params, saved):
                    p.copy_(own)

    def state_dict(self) -> dict:
        return {"averaging": self.averaging, "history": list(self.history), "state": self.opt.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        if saved["averaging"]:
            self.start_averaging()
        self.history = list(saved["history"])
        self.opt.load_state_dict(saved["state"])


def _check_finite(loss: float, epoch: int, batch: int, lr: float):
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"train loss became {loss} at epoch {epoch}, batch {batch} (lr {lr:g}): "
            "lower train.lr, or clip gradients harder with train.clip"
        )


def _resume(path: Path, config: RunConfig, model: AWDLSTM, optimizer: NTASGD):
    """Load last.pt if it belongs to this config; returns (epochs done, epoch results, best)."""
    saved = torch.load(path, weights_only=True, map_location="cpu")
    if saved["config"] != config.to_dict():
        before, after = RunConfig.from_dict(saved["config"]).flat(), config.flat()
        diff = ", ".join(f"{k} {before[k]!r} -> {after[k]!r}" for k in after if before.get(k) != after[k])
        raise UserError(
            f"{path} was made by another config ({diff}); "
            "pass --fresh to start over, or --out for a new folder"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    epochs = [EpochResult(**e) for e in saved["epochs"]]
    return saved["epoch"], epochs, saved["best"]


def train_model(
    config: RunConfig,
    corpus: Corpus,
    *,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
) -> TrainResult:
    """Train one run to the end; resumes from `checkpoint_dir/last.pt` when it exists.

    The test split is evaluated once, with the best weights, and only when `evaluate_test` (a search trial
    must not see it: rates are chosen on validation perplexity alone).
    """
    recipe = config.train
    started = time.perf_counter()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    seed_everything(recipe.seed)
    model = AWDLSTM(corpus.vocab_size, config.model, config.dropout).to(device)
    optimizer = NTASGD(model, config)

    train_tokens = corpus.train[: recipe.train_tokens] if recipe.train_tokens else corpus.train
    valid_tokens = corpus.valid[: recipe.valid_tokens] if recipe.valid_tokens else corpus.valid
    train_data = batchify(train_tokens, recipe.batch_size).to(device)  # (L, B)
    val_data = batchify(valid_tokens, recipe.eval_batch_size).to(device)

    start_epoch, epochs, best = 0, [], {"epoch": 0, "val_loss": math.inf, "model": None}
    last_path = best_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
        if last_path.exists():
            start_epoch, epochs, best_meta = _resume(last_path, config, model, optimizer)
            best = {**best_meta, "model": torch.load(best_path, weights_only=True, map_location=device)["model"]}

    for epoch in range(start_epoch + 1, recipe.epochs + 1):
        # Seeding per epoch makes a resumed run continue exactly as an uninterrupted one would.
        torch.manual_seed(recipe.seed * 100_003 + epoch)
        rng = np.random.default_rng((recipe.seed, epoch))
        train_loss, seconds, n_tokens = _train_epoch(model, optimizer, train_data, recipe, epoch, rng, progress)
        with optimizer.averaged_weights():
            val_loss = evaluate(model, val_data, recipe.bptt)
            if val_loss < best["val_loss"]:
                best = {"epoch": epoch, "val_loss": val_loss, "model": _own_storage(model.state_dict())}
                if best_path is not None:
                    _save(best_path, {"model": best["model"], "config": config.to_dict(),
                                      "metrics": {"epoch": epoch, "val_loss": val_loss,
                                                  "val_ppl": perplexity(val_loss)}})
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"validation loss became {val_loss} at epoch {epoch}: lower train.lr")
        result = EpochResult(
            epoch=epoch, train_loss=train_loss, train_ppl=perplexity(train_loss), val_loss=val_loss,
            val_ppl=perplexity(val_loss), lr=optimizer.opt.param_groups[0]["lr"], epoch_seconds=seconds,
            tokens_per_s=n_tokens / seconds, averaging=optimizer.averaging,
        )
        epochs.append(result)
        if not optimizer.averaging:
            if optimizer.should_trigger(val_loss):
                optimizer.start_averaging()
            optimizer.history.append(val_loss)
        if last_path is not None:
            _save(last_path, {
                "config": config.to_dict(), "epoch": epoch, "model": _own_storage(model.state_dict()),
                "optimizer": optimizer.state_dict(), "epochs": [dataclasses.asdict(e) for e in epochs],
                "best": {"epoch": best["epoch"], "val_loss": best["val_loss"]},
            })
        if on_epoch is not None:
            on_epoch(result)

    test_loss = None
    if evaluate_test:
        model.load_state_dict(best["model"])
        test_data = batchify(corpus.test, recipe.test_batch_size).to(device)
        test_loss = evaluate(model, test_data, recipe.bptt)
    averaged_from = next((e.epoch for e in epochs if e.averaging), None)
    return TrainResult(
        config=config, epochs=tuple(epochs), best_epoch=best["epoch"], best_val_ppl=perplexity(best["val_loss"]),
        test_loss=test_loss, test_ppl=None if test_loss is None else perplexity(test_loss),
        averaged_from_epoch=averaged_from,
        seconds=time.perf_counter() - started, checkpoint=best_path,
    )


def _train_epoch(model, optimizer: NTASGD, train_data, recipe, epoch: int, rng, progress: bool):
    """One pass over the training split; returns (mean loss, seconds, tokens)."""
    model.train()
    state = model.init_state(recipe.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    total, count, checked = train_data.new_zeros((), dtype=torch.float64), 0, 0
    bar = tqdm(total=train_data.numel(), unit="tok", unit_scale=True, desc=f"epoch {epoch}/{recipe.epochs}",
               disable=not progress, leave=False, dynamic_ncols=True)
    started = time.perf_counter()
    for batch, (i, seq_len) in enumerate(bptt_positions(train_data, recipe.bptt, rng if recipe.variable_bptt else None)):
        inputs, targets = get_batch(train_data, i, seq_len)  # (T, B) each
        group = optimizer.opt.param_groups[0]
        base_lr = group["lr"]
        group["lr"] = base_lr * inputs.size(0) / recipe.bptt  # longer segments take proportionally larger steps
        state = detach_state(state)
        logits, state, raw, dropped = model(inputs, state)  # raw/dropped: last layer (T, B, E)
        raw_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = raw_loss + recipe.alpha * dropped.pow(2).mean() + recipe.beta * (raw[1:] - raw[:-1]).pow(2).mean()
        optimizer.opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        optimizer.opt.step()
        group["lr"] = base_lr
        total += raw_loss.detach().double() * targets.numel()
        count += targets.numel()
        bar.update(targets.numel())
        if batch - checked >= CHECK_EVERY:
            checked = batch
            mean = total.item() / count
            _check_finite(mean, epoch, batch, base_lr)
            bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{perplexity(mean):.1f}", lr=f"{base_lr:g}", refresh=False)
    bar.close()
    mean = total.item() / count
    _check_finite(mean, epoch, batch, optimizer.opt.param_groups[0]["lr"])
    return mean, time.perf_counter() - started, count


def _own_storage(state: dict) -> dict:
    """Detached copies: a view into a flat weight buffer would otherwise save the whole buffer with it."""
    return {k: v.detach().clone() for k, v in state.items()}


def _save(path: Path, payload: dict) -> None:
    """Write atomically, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)

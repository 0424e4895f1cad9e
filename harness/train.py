"""The paper's training recipe for one run: NT-ASGD, variable BPTT, AR/TAR, clipping, checkpoints.

`train_model(config, corpus)` trains, validates every epoch, tests once with the best (averaged, once
averaging is on) weights and returns a `TrainResult`. It imports no tracking or search library: pruning
and logging plug in through the per-epoch callback, which may raise to stop the run.
"""

import contextlib
import dataclasses
import errno
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.config import RunConfig
from harness.data import Corpus, batchify, bptt_positions, changed_splits, find_split_files, get_batch
from harness.errors import UserError
from harness.model import AWDLSTM, detach_state

CHECK_EVERY = 20  # batches between finite-loss checks (a check syncs the GPU)
CHECKPOINTS = ("last.pt", "best.pt")  # what a run writes into its checkpoint folder (and each one's .tmp)
# Settings a resumed run may change: the test split is evaluated once, after training, so its batch size
# changes no weight, no validation loss and no epoch. (eval_batch_size is not one: validation losses pick
# the best epoch and trigger NT-ASGD.)
EVALUATION_ONLY = ("train.test_batch_size",)


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
class RunResult:
    """A finished run's summary as a study records it: each field is one of MLflow's summary metrics of the run
    (step 0) and a column of the report; None when not measured (test_* in search trials, no averaging)."""

    best_val_ppl: float
    best_epoch: int  # 1-based
    test_ppl: float | None
    test_loss: float | None  # nats per token
    averaged_from_epoch: int | None  # the epoch NT-ASGD switched to averaging
    seconds: float
    epochs: int  # epochs trained


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

    def summary(self) -> RunResult:
        """The record a trial process sends its coordinator."""
        return RunResult(self.best_val_ppl, self.best_epoch, self.test_ppl, self.test_loss, self.averaged_from_epoch,
                         self.seconds, len(self.epochs))


class TrainingDiverged(RuntimeError):
    """The loss, or a validation or test perplexity, is no measurement (see `measured`); the message says where and
    what to try."""


def measured(ppl) -> bool:
    """Whether a perplexity is a measurement: a finite number below the largest float, which is how MLflow stores an
    infinite one (1.797e308). The one rule for results: a run whose validation or test perplexity is not one diverged
    (failed with its reason, never best, never averaged)."""
    return (isinstance(ppl, (int, float)) and not isinstance(ppl, bool) and math.isfinite(ppl)
            and ppl < sys.float_info.max)


def divergence(result: RunResult) -> str | None:
    """Why a finished run's summary is a diverged run's (its best validation or its test perplexity no measurement),
    or None: the check a coordinator makes on every result before it records one."""
    for name, value in (("best validation", result.best_val_ppl), ("test", result.test_ppl)):
        if value is not None and not measured(value):
            return f"diverged: the {name} perplexity is {value!r}, no measurement; lower train.lr"
    return None


class CheckpointError(UserError):
    """A checkpoint could not be written (disk full, no permission, read-only) or read (damaged, foreign, from
    another config or corpus): the message names the file and what to do. Never the trial's own fault."""


class UnsafeCheckpoint(CheckpointError, pickle.UnpicklingError):
    """A checkpoint holding pickled objects, which the weights-only load refuses (an UnpicklingError too)."""


def check_splits(config: RunConfig, corpus: Corpus) -> None:
    """UserError unless every split the run uses fits its batch size and the training split its bptt.

    Called before anything trains (by `train_model`, and by `ablate` once per variant before the study starts),
    so a setting that would fail at the test evaluation after hours of training is refused at once.
    """
    recipe = config.train
    for split, key, limit in (("train", "train_tokens", recipe.train_tokens),
                              ("valid", "valid_tokens", recipe.valid_tokens)):
        size = len(getattr(corpus, split))
        if limit > size:
            raise UserError(f"train.{key} = {limit} exceeds the {split} split of {corpus.name} ({size:,} tokens); "
                            f"use at most {size:,} (0 = the whole split)")
    uses = (("train", recipe.train_tokens, "batch_size"), ("valid", recipe.valid_tokens, "eval_batch_size"),
            ("test", 0, "test_batch_size"))
    for split, limit, key in uses:
        tokens = limit or len(getattr(corpus, split))
        batch_size = getattr(recipe, key)
        if tokens // batch_size < 2:
            raise UserError(f"train.{key} = {batch_size} is too large for the {split} split of {corpus.name} "
                            f"({tokens:,} tokens): each of its columns needs at least 2 tokens; use at most "
                            f"{max(1, tokens // 2):,}")
    rows = (recipe.train_tokens or len(corpus.train)) // recipe.batch_size
    if recipe.bptt > rows - 1:
        raise UserError(f"train.bptt = {recipe.bptt} is longer than the {rows - 1:,} steps each of the "
                        f"{recipe.batch_size} training columns holds; use at most {rows - 1:,}, or a smaller "
                        "train.batch_size")


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


_START_OVER = "pass --fresh to start over, or --out for a new folder"


def _load(path: Path, device="cpu") -> dict:
    """A checkpoint's dict, loaded weights-only; CheckpointError naming the file when it is missing or damaged."""
    try:
        saved = torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(f"{path}: refused: {_first_line(err)}; {_START_OVER}") from None
    # Parsing a file's bytes fails with many exception types (OSError for a missing file, RuntimeError for a
    # truncated zip, EOFError for an empty one, KeyError for text...): each means this file is no checkpoint.
    except Exception as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _first_line(err)
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason}); {_START_OVER}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of this harness; {_START_OVER}")
    return saved


def _load_best(path: Path, epoch: int, device) -> dict:
    """best.pt's weights; CheckpointError unless they are those of the best epoch last.pt records."""
    saved = _load(path, device)
    recorded = (saved.get("metrics") or {}).get("epoch", epoch)
    if recorded != epoch:
        raise CheckpointError(f"{path} holds epoch {recorded}'s weights, but last.pt's best epoch is {epoch}; "
                              f"{_START_OVER}")
    return saved["model"]


def _first_line(err: Exception) -> str:
    """The error's first sentence (torch's go on for lines of advice that would not fit in one)."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(err).__name__


def _flat(config: dict) -> dict:
    """`section.key -> value` of a saved config dict, whatever version of the harness wrote it."""
    out = {k: v for k, v in config.items() if not isinstance(v, dict)}
    for section, values in config.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
    return out


def _resume(path: Path, config: RunConfig, corpus: Corpus, model: AWDLSTM, optimizer: NTASGD):
    """Load last.pt if it belongs to this config and corpus; returns (epochs done, epoch results, best)."""
    saved = _load(path)
    missing = [k for k in ("config", "epoch", "optimizer", "epochs", "best") if k not in saved]
    if missing or not isinstance(saved["config"], dict):
        raise CheckpointError(f"{path}: not a last.pt of this harness (no {', '.join(missing) or 'config'}); "
                              f"{_START_OVER}")
    _check_layout(path, saved, config.train.epochs)
    before, after = _flat(saved["config"]), config.flat()
    keys = [*after, *(k for k in before if k not in after)]  # the config's own order, then retired keys
    changed = [k for k in keys if before.get(k) != after.get(k) and k not in EVALUATION_ONLY]
    if changed:
        diff = ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        raise CheckpointError(f"{path} was made by another config ({diff}); {_START_OVER}")
    recorded = saved.get("corpus_md5") or {}
    moved = changed_splits(recorded, corpus.md5)
    if moved:
        try:
            files = find_split_files(corpus.path)
        except UserError:
            files = {}
        names = ", ".join(str(files.get(split, f"the {split} split")) for split in moved)
        raise CheckpointError(f"{path}: the corpus changed since this run started ({names}); resuming would train "
                              f"on two datasets: restore it, or {_START_OVER}")
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        epochs = [EpochResult(**e) for e in saved["epochs"]]
    except (RuntimeError, ValueError, TypeError, KeyError) as err:  # other sizes, another vocabulary, old layout
        raise CheckpointError(f"{path}: does not fit this model ({_first_line(err)}); {_START_OVER}") from None
    return saved["epoch"], epochs, saved["best"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layout(path: Path, saved: dict, epochs: int) -> None:
    """CheckpointError unless last.pt's bookkeeping has the types and ranges this harness writes: as strict as a
    study file, since resuming trusts every value (an `epoch: "1"` would crash the loop or skip epochs)."""
    best, done = saved["best"], saved["epoch"]
    problems = [
        (not _is_int(done) or not 0 <= done <= epochs, f"epoch = {done!r} (a whole number in [0, {epochs}])"),
        (not isinstance(saved["epochs"], list) or not all(isinstance(e, dict) for e in saved["epochs"])
         or _is_int(done) and len(saved["epochs"]) != done, "epochs (one record per epoch done)"),
        (not isinstance(best, dict) or not _is_int(best.get("epoch")) or not isinstance(best.get("val_loss"), float),
         f"best = {best!r} (epoch and val_loss)"),
        (not isinstance(saved["optimizer"], dict), "optimizer (a state dict)"),
        (not isinstance(saved.get("corpus_md5", {}), dict), "corpus_md5 (split -> MD5)"),
    ]
    for bad, what in problems:
        if bad:
            raise CheckpointError(f"{path}: damaged or foreign: {what[:200]}; {_START_OVER}")


def adopt_checkpoints(folder: Path, sources: list[Path]) -> str | None:
    """Give a retried trial's empty checkpoint folder the checkpoints of the newest earlier attempt that has them.

    `sources`: the folders of the attempts it replaces, newest first (another machine's, on a shared runs folder).
    Each attempt keeps its own folder, so an attempt still running somewhere (a machine only thought dead) never
    writes into this one. Returns a one-line note when no earlier attempt left a checkpoint (the trial starts
    over); CheckpointError when `folder` already holds another run's checkpoints.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if any((folder / name).exists() for name in CHECKPOINTS):
        raise CheckpointError(f"{folder} already holds checkpoints of another run (of another Optuna storage?); give "
                              "this study its own --runs-dir, or delete that folder")
    for source in sources:
        if not (source / "last.pt").is_file():
            continue
        # best.pt first: within an epoch it is written before last.pt, so this pair is never older than
        # last.pt's record of it (train_model checks that they agree).
        for name in ("best.pt", "last.pt"):
            if (source / name).is_file():
                _link_or_copy(source / name, folder / name)
        return None
    where = ", ".join(str(s) for s in sources[:2]) + (" ..." if len(sources) > 2 else "")
    return f"no checkpoint of its earlier attempt in {where} (another machine's runs folder, not shared?)"


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs nothing and is safe: checkpoints are replaced by rename, never written in place.
    tmp = _tmp(target)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)


def clear_checkpoints(folder: Path) -> list[Path]:
    """Delete the files a run writes into its checkpoint folder (and nothing else); returns those deleted."""
    deleted = []
    for name in CHECKPOINTS:
        for path in (folder / name, _tmp(folder / name)):
            if path.is_file() or path.is_symlink():
                path.unlink()
                deleted.append(path)
    return deleted


def train_model(
    config: RunConfig,
    corpus: Corpus,
    *,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
    resume: bool = True,
    start_over: Callable[[str], None] | None = None,
    on_begin: Callable[[tuple], None] | None = None,
) -> TrainResult:
    """Train one run to the end; resumes from `checkpoint_dir/last.pt` when it exists.

    The test split is evaluated once, with the best weights, and only when `evaluate_test` (a search trial
    must not see it: rates are chosen on validation perplexity alone). With `resume=False` a checkpoint
    already in the folder is another run's: CheckpointError rather than overwriting or continuing it.
    With `start_over`, a checkpoint that cannot be resumed (damaged, cut off, another config's) is deleted and
    the run starts from epoch 1, after `start_over(reason)`; without, that is a CheckpointError.
    `on_begin(epochs)` hears the EpochResults a resumed run restored (empty when it starts at epoch 1).
    Raises UserError before the first step for settings the corpus cannot serve (see check_splits).
    """
    recipe = config.train
    check_splits(config, corpus)
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
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"cannot create the checkpoint folder {checkpoint_dir} ({err.strerror}); "
                                  "choose a writable one") from None
        last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
        if not resume and (last_path.exists() or best_path.exists()):
            raise CheckpointError(f"{checkpoint_dir} already holds checkpoints of another run (of another "
                                  "Optuna storage?); give this study its own --runs-dir, or delete that folder")
        if last_path.exists():
            try:
                start_epoch, epochs, best_meta = _resume(last_path, config, corpus, model, optimizer)
                best = {**best_meta, "model": _load_best(best_path, best_meta["epoch"], device)}
            except CheckpointError as err:
                if start_over is None:
                    raise
                start_over(str(err).removesuffix(f"; {_START_OVER}"))
                clear_checkpoints(checkpoint_dir)
                # A failed load may have filled part of the model: build it again, from the same seed.
                seed_everything(recipe.seed)
                model = AWDLSTM(corpus.vocab_size, config.model, config.dropout).to(device)
                optimizer = NTASGD(model, config)
                start_epoch, epochs, best = 0, [], {"epoch": 0, "val_loss": math.inf, "model": None}
    if on_begin is not None:
        on_begin(tuple(epochs))

    for epoch in range(start_epoch + 1, recipe.epochs + 1):
        # Seeding per epoch makes a resumed run continue exactly as an uninterrupted one would.
        torch.manual_seed(recipe.seed * 100_003 + epoch)
        rng = np.random.default_rng((recipe.seed, epoch))
        train_loss, seconds, n_tokens = _train_epoch(model, optimizer, train_data, recipe, epoch, rng, progress)
        with optimizer.averaged_weights():
            val_loss = evaluate(model, val_data, recipe.bptt)
            if not measured(perplexity(val_loss)):  # before it can become the best weights or reach a callback
                raise TrainingDiverged(f"validation perplexity became {perplexity(val_loss)!r} (loss {val_loss:.4g} "
                                       f"nats per token) at epoch {epoch}: lower train.lr")
            if val_loss < best["val_loss"]:
                best = {"epoch": epoch, "val_loss": val_loss, "model": _own_storage(model.state_dict())}
                if best_path is not None:
                    _save(best_path, {"model": best["model"], "config": config.to_dict(),
                                      "metrics": {"epoch": epoch, "val_loss": val_loss,
                                                  "val_ppl": perplexity(val_loss)}})
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
                "config": config.to_dict(), "corpus_md5": dict(corpus.md5), "epoch": epoch,
                "model": _own_storage(model.state_dict()),
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
        if not measured(perplexity(test_loss)):
            raise TrainingDiverged(f"test perplexity became {perplexity(test_loss)!r} (loss {test_loss:.4g} nats per "
                                   f"token) with the best weights (epoch {best['epoch']}): lower train.lr")
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
    windows = bptt_positions(train_data, recipe.bptt, rng if recipe.variable_bptt else None)
    for batch, (i, seq_len) in enumerate(windows):
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


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _save(path: Path, payload: dict) -> None:
    """Write atomically, so an interrupted or failed save never leaves a broken or partial checkpoint.

    CheckpointError naming the file when it cannot be written (disk full, no permission, read-only); the
    previous checkpoint is then kept and no .tmp file is left behind.
    """
    tmp = _tmp(path)
    try:
        # Through a Python file, so a failed write raises OSError with its errno (torch's own writer would
        # raise a RuntimeError that names no cause); fsync so a crash after the rename keeps whole data.
        with open(tmp, "wb") as out:
            torch.save(payload, out)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):  # also when the write failed before the file existed
            tmp.unlink()
        code = errno.errorcode.get(err.errno)
        cause = f"{err.strerror or err}, {code}" if code else f"{err.strerror or err}"
        raise CheckpointError(f"cannot write the checkpoint {path} ({cause}); free some space or choose a writable "
                              "--out / --runs-dir (the last complete checkpoint is kept)") from None

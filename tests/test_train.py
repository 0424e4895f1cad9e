"""The training recipe: NT-ASGD trigger, variable-BPTT lr scaling, resume, divergence, checkpoints."""

import math
import pickle
import time

import pytest
import torch

from harness.config import DropoutConfig, ModelConfig, RunConfig, TrainConfig
from harness.data import load_corpus
from harness.errors import UserError
from harness.model import AWDLSTM
from harness.train import TrainingDiverged, NTASGD, perplexity, train_model
from helpers import TINY_RATES as AWD, tiny_config as config, tiny_corpus

pytestmark = pytest.mark.fast

def test_nt_asgd_trigger_follows_the_reference_code():
    opt = NTASGD(AWDLSTM(10, ModelConfig(4, 4, 1), DropoutConfig()), config(nonmono=2))
    opt.history = [5.0, 4.0, 3.0]
    assert not opt.should_trigger(3.5)  # better than min(history[:-2]) = 5.0
    assert not opt.should_trigger(5.0)  # as good is not worse
    assert opt.should_trigger(5.5)
    opt.history = [5.0, 4.0]
    assert not opt.should_trigger(9.0)  # needs more than nonmono logged epochs
    opt.history = [5.0, 4.0, 3.0]
    sgd_only = NTASGD(AWDLSTM(10, ModelConfig(4, 4, 1), DropoutConfig()), config(nonmono=2, optimizer="sgd"))
    sgd_only.history = opt.history
    assert not sgd_only.should_trigger(9.0)


def test_averaging_covers_every_parameter_and_evaluates_averaged_weights():
    model = AWDLSTM(10, ModelConfig(4, 4, 2), DropoutConfig())
    opt = NTASGD(model, config())
    opt.start_averaging()
    assert isinstance(opt.opt, torch.optim.ASGD)
    assert {id(p) for g in opt.opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    model(torch.randint(10, (3, 2)))[0].sum().backward()
    opt.opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with opt.averaged_weights():
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), opt.opt.state[p]["ax"])
    for p, own in zip(model.parameters(), before):
        assert torch.equal(p.detach(), own)


def test_lr_scales_with_sequence_length(monkeypatch):
    seen = []
    real_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    lengths = []
    real_forward = AWDLSTM.forward
    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    monkeypatch.setattr(AWDLSTM, "forward", lambda self, x, s=None: lengths.append(x.size(0)) or real_forward(self, x, s))
    train_model(config(epochs=1, lr=4.0), tiny_corpus(), progress=False)
    train_lengths = lengths[: len(seen)]
    assert len(set(train_lengths[:-1])) > 3, "variable BPTT drew one length only"
    assert seen == pytest.approx([4.0 * n / 10 for n in train_lengths])


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    corpus = tiny_corpus()
    whole = train_model(config(epochs=3), corpus, checkpoint_dir=tmp_path / "a", progress=False)

    class Interrupted(Exception):
        pass

    def interrupt_after_first(e):
        if e.epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_model(config(epochs=3), corpus, checkpoint_dir=tmp_path / "b", on_epoch=interrupt_after_first,
                    progress=False)
    resumed = train_model(config(epochs=3), corpus, checkpoint_dir=tmp_path / "b", progress=False)
    assert [e.val_loss for e in resumed.epochs] == [e.val_loss for e in whole.epochs]
    assert resumed.test_loss == whole.test_loss


def test_resume_refuses_another_config(tmp_path):
    train_model(config(epochs=1), tiny_corpus(), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(UserError) as error:
        train_model(config(epochs=1, lr=2.0, clip=0.5), tiny_corpus(), checkpoint_dir=tmp_path, progress=False)
    assert str(error.value) == (f"{tmp_path / 'last.pt'} was made by another config (train.lr 5.0 -> 2.0, "
                                "train.clip 0.25 -> 0.5); pass --fresh to start over, or --out for a new folder")


def test_perplexity_is_exp_of_the_loss_until_it_overflows():
    assert perplexity(math.log(42.0)) == pytest.approx(42.0)
    assert perplexity(705.0) == math.exp(705.0)  # finite: not inf before the float range ends
    assert perplexity(710.0) == math.inf and perplexity(math.inf) == math.inf


def test_checkpoint_is_state_dict_config_and_metrics(tmp_path):
    result = train_model(config(epochs=2), tiny_corpus(), checkpoint_dir=tmp_path / "runs" / "awd", progress=False)
    assert result.checkpoint == tmp_path / "runs" / "awd" / "best.pt"
    best = torch.load(result.checkpoint, weights_only=True)
    assert set(best) == {"model", "config", "metrics"}
    assert best["config"] == config(epochs=2).to_dict()
    assert best["metrics"]["epoch"] == result.best_epoch
    assert best["metrics"]["val_ppl"] == pytest.approx(result.best_val_ppl)
    assert best["metrics"]["val_loss"] == pytest.approx(math.log(result.best_val_ppl))
    for name, tensor in best["model"].items():  # no view dragging a whole flat weight buffer along
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
    model = AWDLSTM(40, ModelConfig(16, 24, 2), AWD)
    model.load_state_dict(best["model"])


def test_divergence_stops_with_the_reason():
    # The loss is checked every CHECK_EVERY = 20 batches (a check syncs the GPU): the first check stops it.
    with pytest.raises(TrainingDiverged) as error:
        train_model(config(lr=1e38, clip=0.0), tiny_corpus(), progress=False)
    assert str(error.value) == ("train loss became nan at epoch 1, batch 20 (lr 1e+38): lower train.lr, "
                                "or clip gradients harder with train.clip")


def test_divergence_in_an_epoch_shorter_than_the_check_interval_is_caught_at_its_end():
    with pytest.raises(TrainingDiverged) as error:  # 9 batches: the end-of-epoch check catches it
        train_model(config(lr=1e38, clip=0.0, variable_bptt=False), tiny_corpus(n_train=400), progress=False)
    assert str(error.value).startswith("train loss became nan at epoch 1, batch 9 (lr 1e+38): lower train.lr")


def test_threads_setting_is_applied_and_zero_leaves_torch_alone():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train_model(config(epochs=1, threads=1), tiny_corpus(n_train=200), progress=False)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        train_model(config(epochs=1, threads=0), tiny_corpus(n_train=200), progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_callback_sees_every_epoch_and_can_stop_the_run():
    seen = []

    class Stop(Exception):
        pass

    def on_epoch(e):
        seen.append(e)
        if e.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_model(config(epochs=5), tiny_corpus(), on_epoch=on_epoch, progress=False)
    assert [e.epoch for e in seen] == [1, 2]
    assert all(e.tokens_per_s > 0 and e.epoch_seconds > 0 and math.isfinite(e.val_ppl) for e in seen)


def test_timings_are_durations_and_throughput_counts_training_tokens():
    started = time.perf_counter()
    result = train_model(config(epochs=2, train_tokens=2000, batch_size=4), tiny_corpus(), progress=False)
    wall = time.perf_counter() - started
    assert sum(e.epoch_seconds for e in result.epochs) <= result.seconds <= wall
    for e in result.epochs:  # every target token of the (500, 4) batchified slice: 499 rows x 4
        assert e.tokens_per_s * e.epoch_seconds == pytest.approx(499 * 4)
        assert e.train_ppl == pytest.approx(math.exp(e.train_loss)) and e.val_ppl == pytest.approx(math.exp(e.val_loss))


def test_each_epoch_of_each_seed_draws_its_own_dropout_masks(monkeypatch):
    seeds = []
    real_forward = AWDLSTM.forward

    def forward(model, tokens, state=None):
        if torch.is_grad_enabled() and state is not None and all((h == 0).all() for h, _ in state):
            seeds.append(torch.initial_seed())  # the first training batch of an epoch
        return real_forward(model, tokens, state)

    monkeypatch.setattr(AWDLSTM, "forward", forward)
    for seed in (1, 2):
        train_model(config(epochs=2, seed=seed), tiny_corpus(n_train=200), progress=False)
    assert len(seeds) == 4 and len(set(seeds)) == 4, seeds


@pytest.mark.slow
@pytest.mark.needs("ptb")
def test_short_real_ptb_run_lowers_validation_perplexity():
    corpus = load_corpus("ptb")
    run = RunConfig("ptb", "awd", ModelConfig(32, 64, 2), AWD, TrainConfig(
        epochs=3, batch_size=10, eval_batch_size=10, test_batch_size=10, bptt=20, lr=20.0, seed=1,
        train_tokens=15000, valid_tokens=3000, threads=1))
    result = train_model(run, corpus, progress=False)
    val = [e.val_ppl for e in result.epochs]
    assert val[-1] < val[0] < corpus.vocab_size, val
    assert math.isfinite(result.test_ppl) and result.test_ppl < corpus.vocab_size


class _NotATensor:
    """Anything a weights-only load must refuse to unpickle."""


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_resume_loads_weights_only_and_refuses_pickled_objects(tmp_path, name):
    train_model(config(epochs=1), tiny_corpus(n_train=400), checkpoint_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / name, weights_only=True)
    torch.save({**saved, "extra": _NotATensor()}, tmp_path / name)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_model(config(epochs=1), tiny_corpus(n_train=400), checkpoint_dir=tmp_path, progress=False)


def test_seed_everything_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    from harness.train import seed_everything

    seed = 2**32 + 2**31 + 7  # numpy's global seed must be < 2**32: it gets the seed modulo 2**32
    seed_everything(seed)
    drawn = (random.random(), np.random.random(), torch.rand(()).item())
    expected = (random.Random(seed).random(), np.random.RandomState(seed % 2**32).random_sample(),
                torch.rand((), generator=torch.Generator().manual_seed(seed)).item())
    assert drawn == expected


def test_progress_bar_shows_epoch_tokens_loss_ppl_and_lr_and_is_cleared(monkeypatch):
    import functools
    import io

    from harness import train

    for progress in (None, False):  # None: the default, which shows the bar
        out = io.StringIO()
        monkeypatch.setattr(train, "tqdm", functools.partial(train.tqdm, file=out, mininterval=0))
        train_model(config(epochs=1), tiny_corpus(), **({} if progress is None else {"progress": progress}))
        text = out.getvalue()
        if progress is False:
            assert text == ""
            continue
        last_render = text.rstrip("\r ").split("\r")[-1]  # e.g. epoch 1/1:  97%|...| 2.90k/3.00k [...,
        assert last_render.startswith("epoch 1/1:")          #      2.37ktok/s, loss=3.706, lr=5, ppl=40.7]
        assert "k/3.00k" in last_render and "ktok/s" in last_render  # tokens, SI-scaled
        loss = float(last_render.split("loss=")[1].split(",")[0])
        assert f"ppl={math.exp(loss):.1f}" in last_render and "lr=5," in last_render
        assert text.endswith("\r") and not text.endswith("\n")  # leave=False: the finished bar is erased

"""Each step of the paper's training recipe (Merity et al. 2017, section 3 and 4.2; awd-lstm-lm main.py),
observed through train_model, evaluate and NTASGD on a tiny model: what the optimizer steps on, what the
loss is, which weights validation and test see, which state is carried. Each test fails when its step is wrong.

Run: .venv/bin/python -m pytest -q tests/test_recipe.py   (CPU, a few seconds)
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import train
from harness.config import DropoutConfig, ModelConfig
from harness.data import batchify, sample_seq_len
from harness.model import AWDLSTM
from harness.train import NTASGD, evaluate, train_model
from helpers import TINY_RATES as AWD, tiny_config as config, tiny_corpus

pytestmark = pytest.mark.fast


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(actual, expected, **tolerance):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tolerance)


# ---- NT-ASGD: the switch, averaged weights for validation, best weights for test --------------------


class Recorder:
    """Spies on optimizer steps and evaluate calls of one train_model run; evaluate returns scripted losses."""

    def __init__(self, monkeypatch, val_losses, test_batch_size):
        self.val_losses, self.test_batch_size = list(val_losses), test_batch_size
        self.steps = []  # (optimizer class name, params before, params after) per step, in order
        self.evals = []  # (kind, params, source, bptt, index of the next step) per evaluate call
        for cls in (torch.optim.SGD, torch.optim.ASGD):
            monkeypatch.setattr(cls, "step", self.spy_step(cls.step))
        monkeypatch.setattr(train, "evaluate", self.fake_evaluate)

    def spy_step(self, real_step):
        def step(opt, *args, **kwargs):
            model_params = [p for group in opt.param_groups for p in group["params"]]
            before = [p.detach().clone() for p in model_params]
            result = real_step(opt, *args, **kwargs)
            self.steps.append((type(opt).__name__, before, [p.detach().clone() for p in model_params]))
            return result

        return step

    def fake_evaluate(self, model, source, bptt):
        kind = "test" if source.size(1) == self.test_batch_size else "val"
        self.evals.append((kind, params_of(model), source, bptt, len(self.steps)))
        return self.val_losses.pop(0) if kind == "val" else 1.0


def test_nt_asgd_switches_validates_averaged_weights_and_tests_the_best(monkeypatch):
    # nonmono=2: epoch 5's 4.2 is worse than min(history[:-2]) = 4.0, so ASGD takes over from epoch 6.
    losses = [5.0, 4.0, 4.5, 4.8, 4.2, 3.9, 3.5, 3.5]  # a tie keeps the earlier best
    rec = Recorder(monkeypatch, losses, test_batch_size=3)
    corpus = tiny_corpus(n_train=600)
    run = config(epochs=8, nonmono=2, valid_tokens=300, test_batch_size=3)
    result = train_model(run, corpus, progress=False)

    assert [e.averaging for e in result.epochs] == [False] * 5 + [True] * 3
    assert result.averaged_from_epoch == 6 and result.best_epoch == 7
    assert result.best_val_ppl == pytest.approx(math.exp(3.5)) and result.config == run
    assert result.test_loss == 1.0 and result.test_ppl == pytest.approx(math.e)  # what the test evaluation gave
    assert [e.val_loss for e in result.epochs] == losses
    assert all(e.lr == run.train.lr for e in result.epochs)  # the per-batch lr scaling is undone
    val_calls = [call for call in rec.evals if call[0] == "val"]
    assert [call[0] for call in rec.evals] == ["val"] * 8 + ["test"]
    for _, _, source, bptt, _ in val_calls:
        assert torch.equal(source, batchify(corpus.valid[:300], run.train.eval_batch_size)) and bptt == 10
    first_asgd = val_calls[4][4]  # the first step after epoch 5's validation
    names = [name for name, _, _ in rec.steps]
    assert set(names[:first_asgd]) == {"SGD"} and set(names[first_asgd:]) == {"ASGD"}

    for epoch, (_, seen, _, _, n_steps) in enumerate(val_calls, start=1):
        if epoch <= 5:  # SGD: validation sees the weights of the last step
            assert_params_equal(seen, rec.steps[n_steps - 1][2], rtol=0, atol=0)
        else:
            # ASGD with t0=0, lambd=0: the average of the iterates since the switch. torch's ASGD copies
            # the iterate into the average at its first two steps (mu = 1/max(1, step - t0)), so the mean
            # runs over the iterates from the switch's second step on.
            iterates = [after for _, _, after in rec.steps[first_asgd + 1:n_steps]]
            mean = [torch.stack(ps).mean(0) for ps in zip(*iterates)]
            assert_params_equal(seen, mean, rtol=1e-4, atol=1e-6)
            # Training goes on from its own weights, not from the average validation saw.
            if n_steps < len(rec.steps):
                assert_params_equal(rec.steps[n_steps][1], rec.steps[n_steps - 1][2], rtol=0, atol=0)
                assert not all(torch.equal(a, b) for a, b in zip(seen, rec.steps[n_steps - 1][2]))
    # Test: the weights validation saw at the best epoch (7), on the whole test split.
    _, test_params, test_source, test_bptt, _ = rec.evals[-1]
    assert_params_equal(test_params, val_calls[6][1], rtol=0, atol=0)
    assert torch.equal(test_source, batchify(corpus.test, 3)) and test_bptt == 10


def test_a_resumed_run_tests_the_best_weights_saved_before_the_interruption(monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_two(epoch):
        if epoch.epoch == 2:
            raise Stop

    first = Recorder(monkeypatch, [3.0, 4.0], test_batch_size=3)
    with pytest.raises(Stop):
        train_model(config(epochs=3, test_batch_size=3), tiny_corpus(n_train=200), checkpoint_dir=tmp_path,
                    on_epoch=stop_after_two, progress=False)
    best_seen = first.evals[0][1]  # what validation saw at epoch 1, the best
    second = Recorder(monkeypatch, [5.0], test_batch_size=3)
    result = train_model(config(epochs=3, test_batch_size=3), tiny_corpus(n_train=200), checkpoint_dir=tmp_path,
                         progress=False)
    assert result.best_epoch == 1 and [e.val_loss for e in result.epochs] == [3.0, 4.0, 5.0]
    assert [call[0] for call in second.evals] == ["val", "test"]
    assert_params_equal(second.evals[-1][1], best_seen, rtol=0, atol=0)


def test_sgd_only_never_averages_and_search_trials_skip_the_test_split(monkeypatch):
    rec = Recorder(monkeypatch, [5.0, 6.0, 7.0, 8.0], test_batch_size=3)
    result = train_model(config(epochs=4, nonmono=1, optimizer="sgd", test_batch_size=3), tiny_corpus(n_train=400),
                         progress=False, evaluate_test=False)
    assert not any(e.averaging for e in result.epochs) and result.averaged_from_epoch is None
    assert {name for name, _, _ in rec.steps} == {"SGD"}
    assert [call[0] for call in rec.evals] == ["val"] * 4 and result.test_loss is None and result.test_ppl is None
    assert result.best_epoch == 1


def test_a_non_finite_validation_loss_stops_the_run(monkeypatch):
    Recorder(monkeypatch, [4.0, math.nan], test_batch_size=3)
    with pytest.raises(train.TrainingDiverged) as error:
        train_model(config(epochs=3, test_batch_size=3), tiny_corpus(n_train=200), progress=False)
    assert str(error.value) == "validation perplexity became nan (loss nan nats per token) at epoch 2: lower train.lr"


def test_weight_decay_and_learning_rate_in_both_optimizers():
    """One step on a zero gradient: SGD and ASGD (lambd=0, so no extra decay) both shrink every weight by
    exactly 1 - lr * weight_decay, and ASGD's average then equals its iterate."""
    model = AWDLSTM(10, ModelConfig(4, 4, 2), AWD)
    opt = NTASGD(model, config(lr=0.5, weight_decay=0.1))
    for phase in ("sgd", "asgd"):
        assert {id(p) for g in opt.opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
        before = params_of(model)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.opt.step()
        assert_params_equal(params_of(model), [b * (1 - 0.5 * 0.1) for b in before])
        if phase == "asgd":
            for p in model.parameters():
                torch.testing.assert_close(opt.opt.state[p]["ax"], p.detach())
        opt.start_averaging()
    assert opt.averaging and isinstance(opt.opt, torch.optim.ASGD)


def test_averaged_weights_is_a_no_op_before_averaging():
    model = AWDLSTM(10, ModelConfig(4, 4, 1), DropoutConfig())
    opt = NTASGD(model, config())
    before = params_of(model)
    with opt.averaged_weights():
        assert_params_equal(params_of(model), before, rtol=0, atol=0)
    assert not opt.averaging


def test_optimizer_state_round_trips():
    model = AWDLSTM(10, ModelConfig(4, 4, 1), DropoutConfig())
    opt = NTASGD(model, config())
    opt.history = [3.0, 2.0]
    opt.start_averaging()
    model(torch.randint(10, (3, 2)))[0].sum().backward()
    opt.opt.step()
    again = NTASGD(model, config())
    again.load_state_dict(opt.state_dict())
    assert again.averaging and again.history == [3.0, 2.0] and isinstance(again.opt, torch.optim.ASGD)
    for p in model.parameters():
        torch.testing.assert_close(again.opt.state[p]["ax"], opt.opt.state[p]["ax"])


# ---- evaluation: eval mode, state carried, mean per token -------------------------------------------


def test_evaluate_is_the_eval_mode_loss_per_token_with_state_carried_across_segments():
    torch.manual_seed(0)
    model = AWDLSTM(40, ModelConfig(16, 24, 2), AWD).train()
    plain = AWDLSTM(40, ModelConfig(16, 24, 2), DropoutConfig())
    plain.load_state_dict(model.state_dict())
    source = batchify(tiny_corpus().valid, 4)  # (150, 4)
    # One pass over the whole split with every rate at 0: what evaluation must compute.
    logits = plain.eval()(source[:-1])[0]
    expected = F.cross_entropy(logits.flatten(0, 1), source[1:].flatten()).item()
    for bptt in (7, 1000):  # short segments carry the state: the same loss as one long segment
        assert evaluate(model, source, bptt) == pytest.approx(expected, rel=1e-5)
    assert not model.training


# ---- one training step: inputs, state, loss, clipping, lr --------------------------------------------


class StepSpy:
    """Records every forward, cross-entropy and backward of train_model's training loop."""

    def __init__(self, monkeypatch):
        self.forwards, self.cross_entropies, self.losses = [], [], []
        real_forward, real_ce, real_backward = AWDLSTM.forward, F.cross_entropy, torch.Tensor.backward

        def forward(model, tokens, state=None):
            out = real_forward(model, tokens, state)
            if torch.is_grad_enabled():  # training; evaluation runs under no_grad
                self.forwards.append((model.training, tokens, state, out))
            return out

        def cross_entropy(logits, targets, *args, **kwargs):
            loss = real_ce(logits, targets, *args, **kwargs)
            if torch.is_grad_enabled():
                self.cross_entropies.append((logits, targets, loss))
            return loss

        def backward(loss, *args, **kwargs):
            self.losses.append(loss.detach().clone())
            return real_backward(loss, *args, **kwargs)

        monkeypatch.setattr(AWDLSTM, "forward", forward)
        monkeypatch.setattr(F, "cross_entropy", cross_entropy)
        monkeypatch.setattr(torch.Tensor, "backward", backward)


def test_training_steps_read_the_batches_in_order_and_carry_detached_state(monkeypatch):
    spy = StepSpy(monkeypatch)
    corpus = tiny_corpus(n_train=900)
    run = config(epochs=2, train_tokens=700, batch_size=5)
    result = train_model(run, corpus, progress=False)
    data = batchify(corpus.train[:700], 5)  # (140, 5)
    epochs, rows = [], []
    for training, tokens, state, out in spy.forwards:
        assert training, "a training forward ran in eval mode"
        rows.append(tokens)
        if state is not None and all((h == 0).all() and (c == 0).all() for h, c in state) and rows[:-1]:
            epochs.append(rows[:-1])
            rows = [tokens]
    epochs.append(rows)
    assert len(epochs) == 2  # the state starts at zero once per epoch
    for inputs in epochs:
        torch.testing.assert_close(torch.cat(inputs), data[:-1], rtol=0, atol=0)  # every row once, in order
    # The state carried into each step is the last one's, with its graph cut.
    for (_, _, state, _), (_, _, _, previous) in zip(spy.forwards[1:], spy.forwards[:-1]):
        if all((h == 0).all() for h, _ in state):
            continue  # a new epoch
        for (h, c), (h_prev, c_prev) in zip(state, previous.state, strict=True):
            assert not h.requires_grad and not c.requires_grad
            assert torch.equal(h, h_prev) and torch.equal(c, c_prev)
    # Targets are the inputs one step later, and train_loss is the mean cross-entropy per token.
    ce_values, counts = [], []
    for (_, tokens, _, _), (_, targets, ce) in zip(spy.forwards, spy.cross_entropies, strict=True):
        assert torch.equal(targets.view_as(tokens)[:-1], tokens[1:])
        ce_values.append(ce.item() * targets.numel())
        counts.append(targets.numel())
    n_first = len(epochs[0])
    assert result.epochs[0].train_loss == pytest.approx(sum(ce_values[:n_first]) / sum(counts[:n_first]))
    assert result.epochs[1].train_loss == pytest.approx(sum(ce_values[n_first:]) / sum(counts[n_first:]))


def test_loss_adds_ar_on_the_dropped_and_tar_on_the_raw_last_layer_output(monkeypatch):
    """Paper section 4.2 / main.py: loss = CE + alpha * mean(dropped^2) + beta * mean((raw[t] - raw[t-1])^2)."""
    spy = StepSpy(monkeypatch)
    train_model(config(epochs=1, alpha=0.7, beta=1.9), tiny_corpus(n_train=600), progress=False)
    assert len(spy.losses) == len(spy.forwards) == len(spy.cross_entropies) > 5
    for (_, _, _, out), (_, _, ce), loss in zip(spy.forwards, spy.cross_entropies, spy.losses):
        assert not torch.equal(out.raw, out.dropped)  # output dropout is on, so the two terms differ
        ar = 0.7 * out.dropped.pow(2).mean()
        tar = 1.9 * (out.raw[1:] - out.raw[:-1]).pow(2).mean()
        torch.testing.assert_close(loss, (ce + ar + tar).detach())


def test_gradients_are_clipped_to_the_global_norm(monkeypatch):
    grads = {}

    def run(clip):
        seen = []
        real_step = torch.optim.SGD.step

        def step(opt, *args, **kwargs):
            seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])
            return real_step(opt, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(torch.optim.SGD, "step", step)
            train_model(config(epochs=1, clip=clip, alpha=0.0, beta=0.0), tiny_corpus(n_train=400), progress=False)
        grads[clip] = seen

    run(0.0)
    run(0.05)
    unclipped, clipped = grads[0.0][0], grads[0.05][0]  # same seed: the same first batch and masks
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unclipped]))
    assert norm > 0.05, "nothing to clip: make the clip smaller"
    for c, u in zip(clipped, unclipped, strict=True):  # all parameters scaled by one factor, to norm 0.05
        torch.testing.assert_close(c, u * (0.05 / norm), rtol=1e-4, atol=1e-7)
    for step_grads in grads[0.05]:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in step_grads]))
        assert total <= 0.05 * (1 + 1e-5)


# ---- variable BPTT -----------------------------------------------------------------------------------


def test_variable_bptt_draws_the_paper_distribution():
    """seq_len = max(5, int(N(base, 5))), base = bptt w.p. 0.95 else bptt / 2 (main.py)."""
    rng = np.random.default_rng(0)
    draws = np.array([sample_seq_len(rng, 70) for _ in range(20_000)])
    half = draws < 52  # the two modes, 70 and 35, lie 7 standard deviations apart
    assert abs(half.mean() - 0.05) < 5 * math.sqrt(0.05 * 0.95 / len(draws))
    full = draws[~half]
    assert abs(full.mean() - 69.5) < 0.2 and abs(full.std() - 5) < 0.2  # int() truncates: mean 70 - 0.5
    assert abs(draws[half].mean() - 34.5) < 1.0
    assert min(sample_seq_len(rng, 3) for _ in range(1000)) == 5


def test_fixed_bptt_when_variable_bptt_is_off(monkeypatch):
    spy = StepSpy(monkeypatch)
    lrs = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda opt, *a, **k: lrs.append(opt.param_groups[0]["lr"]) or real_step(opt, *a, **k))
    train_model(config(epochs=1, variable_bptt=False, lr=3.0), tiny_corpus(n_train=400), progress=False)
    lengths = [tokens.size(0) for _, tokens, _, _ in spy.forwards]
    assert set(lengths[:-1]) == {10} and lengths[-1] <= 10
    assert lrs == pytest.approx([3.0 * n / 10 for n in lengths])

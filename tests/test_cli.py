"""The `train` command as a user types it: progress, per-epoch lines, summary, resume, one-line errors."""

import pytest
import torch

from helpers import REPO, run_harness, study_for_tests

pytestmark = pytest.mark.slow

CPU_STUDY = REPO / "studies" / "cpu-ptb.toml"
SHORT = ["--set", "train.train_tokens=6000", "--set", "train.valid_tokens=3000", "--set", "train.test_batch_size=80"]


def test_train_reports_perplexity_and_resumes(tmp_path, test_corpus):
    study = study_for_tests(CPU_STUDY, test_corpus, tmp_path)
    out = tmp_path / "run"
    first = run_harness("train", study, "--variant", "awd", "--set", "train.epochs=1", *SHORT, "--out", out,
                        cwd=tmp_path)
    assert "awd: 3-layer LSTM emb 200 hidden 400" in first.stdout
    assert "epoch   1/1" in first.stdout and "val ppl" in first.stdout
    assert "test ppl" in first.stdout and "best checkpoint" in first.stdout
    assert torch.load(out / "best.pt", weights_only=True)["config"]["dropout"]["weight"] == 0.5
    # The same command again resumes from last.pt and has nothing left to train.
    again = run_harness("train", study, "--variant", "awd", "--set", "train.epochs=1", *SHORT, "--out", out,
                        cwd=tmp_path)
    assert f"resuming from {out / 'last.pt'}" in again.stdout and "epoch   1/1" not in again.stdout


def test_user_mistakes_are_one_line_without_traceback(tmp_path):
    cases = [
        (["train", CPU_STUDY, "--variant", "awdd"], "unknown variant 'awdd' (did you mean 'awd'?)"),
        (["train", tmp_path / "missing.toml", "--variant", "awd"], "no such study file"),
        (["train", CPU_STUDY, "--variant", "awd", "--set", "dropout.weight=1.0"], "weight = 1.0 is outside [0, 1)"),
        (["train", CPU_STUDY, "--variant", "naive", "--set", "dropout.weight=0.5"], "keeps weight dropout off"),
    ]
    for args, expected in cases:
        proc = run_harness(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert expected in proc.stderr

"""Tests for harness.data: real PTB, the token cache, user errors, batching, and fetching from a local server.

Run: .venv/bin/python -m pytest -q tests/test_data.py  (CPU, a few seconds; the only network used is 127.0.0.1).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PTB_DATA_DIR, write_corpus

PTB = PTB_DATA_DIR / "ptb" if PTB_DATA_DIR else None
from harness import data
from harness.errors import UserError

pytestmark = pytest.mark.fast

# Whitespace tokens plus one <eos> per line, counted independently with awk '{n += NF + 1}'.
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keep every test off the user's cache and data folders and away from any proxy."""
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.DATA_URL_ENV, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def refuse_cache_writes_under(folder: Path, monkeypatch) -> None:
    """Make the cache probe treat folder as a read-only mount (needed for root, who ignores permission bits)."""
    probe = data._writable_dir
    monkeypatch.setattr(data, "_writable_dir", lambda path: not path.is_relative_to(folder) and probe(path))


def forbid_tokenising(monkeypatch) -> None:
    """Fail the test if a load tokenises instead of reading the cache."""

    def fail(*args):
        raise AssertionError("tokenised although a valid cache exists")

    monkeypatch.setattr(data, "_tokenize_splits", fail)


@pytest.fixture(scope="module")
def ptb(tmp_path_factory):
    """PTB loaded once from its folder (maybe read-only) with its cache in a temp dir, not beside it."""
    cache_dir = tmp_path_factory.mktemp("ptb-cache")
    listing = sorted(os.listdir(PTB))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(data.CACHE_DIR_ENV, str(cache_dir))
        refuse_cache_writes_under(PTB, mp)
        corpus = data.load_corpus(str(PTB), fetch_missing=False, log=lambda line: None)
    return corpus, cache_dir, listing


@pytest.mark.slow
@pytest.mark.needs("ptb")
def test_ptb_loads_with_known_sizes(ptb):
    corpus, _, listing = ptb
    assert corpus.name == "ptb" and corpus.path == PTB
    assert corpus.vocab_size == 10_000 == len(set(corpus.vocab))
    assert {split: len(getattr(corpus, split)) for split in PTB_TOKENS} == PTB_TOKENS
    assert corpus.unk_counts == {"valid": 0, "test": 0}
    assert corpus.md5 == data.KNOWN_CORPORA["ptb"].md5
    for split in PTB_TOKENS:
        ids = getattr(corpus, split)
        assert ids.dtype == torch.int64 and ids.dim() == 1
        assert 0 <= int(ids.min()) and int(ids.max()) < corpus.vocab_size
    # Ids follow first appearance in train: the file starts " aer banknote berlitz ...".
    assert [corpus.vocab[i] for i in corpus.train[:3]] == ["aer", "banknote", "berlitz"]
    assert corpus.vocab.count("<eos>") == 1 and corpus.vocab.count("<unk>") == 1
    assert sorted(os.listdir(PTB)) == listing  # nothing written beside the shared data


@pytest.mark.slow
@pytest.mark.needs("ptb")
def test_ptb_second_load_uses_cache(ptb, monkeypatch):
    corpus, cache_dir, _ = ptb
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(cache_dir))
    refuse_cache_writes_under(PTB, monkeypatch)
    forbid_tokenising(monkeypatch)
    logs = []
    again = data.load_corpus(str(PTB), fetch_missing=False, log=logs.append)
    assert any("from cache" in line for line in logs)
    assert again.vocab == corpus.vocab and again.unk_counts == corpus.unk_counts
    for split in PTB_TOKENS:
        assert torch.equal(getattr(again, split), getattr(corpus, split))


def test_changed_file_invalidates_cache(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "toy")
    first = data.load_corpus(str(folder), log=lambda line: None)
    assert len(list((folder / ".cache").glob("toy-*.pt"))) == 1

    (folder / "train.txt").write_text("a b c\nb c d zeta\n", encoding="utf-8")
    changed = data.load_corpus(str(folder), log=lambda line: None)
    assert "zeta" in changed.vocab and "zeta" not in first.vocab
    assert changed.md5["train"] != first.md5["train"]

    # Back to the original content: both versions are cached under their own key, so no tokenising.
    (folder / "train.txt").write_text("a b c\nb c d\n", encoding="utf-8")
    forbid_tokenising(monkeypatch)
    restored = data.load_corpus(str(folder), log=lambda line: None)
    assert restored.vocab == first.vocab and torch.equal(restored.train, first.train)


def test_read_only_corpus_folder_falls_back_to_cache_dir(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "toy")
    user_cache = tmp_path / "user-cache"  # $AWD_CACHE_DIR, set by isolated_env
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:
            refuse_cache_writes_under(folder, monkeypatch)
        first = data.load_corpus(str(folder), log=lambda line: None)
        assert not (folder / ".cache").exists()
        assert len(list(user_cache.glob("toy-*.pt"))) == 1
        forbid_tokenising(monkeypatch)
        again = data.load_corpus(str(folder), log=lambda line: None)
        assert torch.equal(again.train, first.train)
    finally:
        folder.chmod(0o755)


def test_writable_dir_probe_creates_a_real_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert not data._writable_dir(blocker / "cache")  # mkdir under a file fails, whoever runs the test
    assert data._writable_dir(tmp_path / "new" / "cache")
    assert list((tmp_path / "new" / "cache").iterdir()) == []  # the probe file is gone again


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path, monkeypatch, damage):
    folder = write_corpus(tmp_path / "toy")
    first = data.load_corpus(str(folder), log=lambda line: None)
    (cache,) = (folder / ".cache").glob("toy-*.pt")
    content = cache.read_bytes()
    cache.write_bytes(b"not a torch file" if damage == "garbage" else content[: len(content) // 2])

    logs = []
    rebuilt = data.load_corpus(str(folder), log=logs.append)
    assert any("ignoring unreadable cache" in line for line in logs)
    assert torch.equal(rebuilt.train, first.train) and rebuilt.vocab == first.vocab
    forbid_tokenising(monkeypatch)
    data.load_corpus(str(folder), log=lambda line: None)  # the rebuilt cache is good again


def test_unseen_words_map_to_unk_and_are_counted(tmp_path):
    folder = write_corpus(tmp_path / "toy", train="a b c\n", valid="a x y\n", test="z b\n")
    logs = []
    corpus = data.load_corpus(str(folder), log=logs.append)
    assert corpus.vocab == ("a", "b", "c", "<eos>", "<unk>")
    assert corpus.unk_counts == {"valid": 2, "test": 1}
    assert corpus.valid.tolist() == [0, 4, 4, 3]
    assert corpus.test.tolist() == [4, 1, 3]
    unk_lines = [line for line in logs if "<unk>" in line]
    assert unk_lines == ["toy: mapped 2 valid and 1 test tokens unseen in train to <unk>"]


def test_unk_from_train_is_reused(tmp_path):
    folder = write_corpus(tmp_path / "toy", train="a <unk> b\n", valid="q a\n", test="a b\n")
    corpus = data.load_corpus(str(folder), log=lambda line: None)
    assert corpus.vocab.count("<unk>") == 1
    assert corpus.valid[0] == corpus.vocab.index("<unk>")
    assert corpus.unk_counts == {"valid": 1, "test": 0}


@pytest.mark.parametrize("content", ["", "\n   \n\n"])
def test_empty_split_names_the_file(tmp_path, content):
    folder = write_corpus(tmp_path / "toy", valid=content)
    with pytest.raises(UserError, match="valid.txt.*no tokens"):
        data.load_corpus(str(folder), log=lambda line: None)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    folder = write_corpus(tmp_path / "toy", train=b"a b\nc \xff d\n")
    with pytest.raises(UserError) as err:
        data.load_corpus(str(folder), log=lambda line: None)
    assert str(folder / "train.txt") in str(err.value) and "byte offset 6" in str(err.value)


@pytest.mark.parametrize(
    "pattern", ["ptb.{split}.txt", "{split}.txt", "wiki.{split}.tokens"], ids=["ptb", "plain", "wikitext"]
)
def test_split_file_names_are_recognised(tmp_path, pattern):
    names = {split: pattern.format(split=split) for split in ("train", "valid", "test")}
    folder = write_corpus(tmp_path / "toy", names=names)
    assert data.find_split_files(folder) == {split: folder / name for split, name in names.items()}
    assert data.load_corpus(str(folder), log=lambda line: None).vocab_size == 5


def test_ambiguous_or_missing_split_files(tmp_path):
    folder = write_corpus(tmp_path / "toy")
    (folder / "ptb.train.txt").write_text("a\n")
    with pytest.raises(UserError, match="ptb.train.txt and train.txt"):
        data.find_split_files(folder)
    (folder / "ptb.train.txt").unlink()
    (folder / "test.txt").unlink()
    with pytest.raises(UserError, match="split\\(s\\) test"):
        data.find_split_files(folder)


def test_md5sums_mismatch_names_file_expected_and_actual(tmp_path):
    folder = write_corpus(tmp_path / "toy")
    actual = hashlib.md5((folder / "train.txt").read_bytes()).hexdigest()
    (folder / "MD5SUMS").write_text(f"{'0' * 32}  train.txt\n")
    with pytest.raises(UserError) as err:
        data.load_corpus(str(folder), log=lambda line: None)
    assert all(part in str(err.value) for part in ("train.txt", "0" * 32, actual))
    (folder / "MD5SUMS").write_text(f"{actual}  train.txt\n")
    assert data.load_corpus(str(folder), log=lambda line: None).md5["train"] == actual


def test_missing_corpus_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    with pytest.raises(UserError) as err:
        data.load_corpus("ptb", fetch_missing=False)
    assert "`python -m harness data fetch ptb`" in str(err.value) and str(tmp_path / "data" / "ptb") in str(err.value)
    with pytest.raises(UserError) as err:
        data.load_corpus("mine", tmp_path / "elsewhere")
    assert str(tmp_path / "elsewhere" / "mine") in str(err.value) and "train.txt" in str(err.value)


def test_batchify_lays_columns_out_sequence_first():
    batched = data.batchify(torch.arange(11), 3)
    assert batched.tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert data.batchify(torch.arange(12), 3).shape == (4, 3)
    with pytest.raises(ValueError):
        data.batchify(torch.arange(11), 0)
    with pytest.raises(UserError, match="batch_size=8"):
        data.batchify(torch.arange(11), 8)


def test_get_batch_targets_are_inputs_shifted_one_step():
    source = data.batchify(torch.arange(10), 2)  # (5, 2): columns 0..4 and 5..9
    inputs, targets = data.get_batch(source, 1, 2)
    assert inputs.tolist() == [[1, 6], [2, 7]]
    assert targets.tolist() == [[2, 7], [3, 8]]
    inputs, targets = data.get_batch(source, 3, 10)  # clipped: only row 4 is left as a target
    assert inputs.tolist() == [[3, 8]] and targets.tolist() == [[4, 9]]


def test_sample_seq_len_follows_awd_distribution():
    rng = np.random.default_rng(0)
    lengths = np.array([data.sample_seq_len(rng, 70) for _ in range(20_000)])
    assert lengths.min() >= 5 and lengths.dtype.kind == "i"
    near_full = np.mean(np.abs(lengths - 70) <= 20)
    near_half = np.mean(np.abs(lengths - 35) <= 20)
    assert 0.93 < near_full < 0.97 and 0.03 < near_half < 0.07
    assert 67 < lengths[np.abs(lengths - 70) <= 20].mean() < 71  # int() truncates toward zero: about -0.5
    assert min(data.sample_seq_len(rng, 5) for _ in range(1000)) == 5


@pytest.mark.parametrize("rng", [None, np.random.default_rng(1)], ids=["fixed", "sampled"])
def test_bptt_positions_cover_source_once(rng):
    source = data.batchify(torch.arange(4_003), 4)  # (1000, 4)
    windows = list(data.bptt_positions(source, 35, rng))
    starts = [i for i, _ in windows]
    assert starts[0] == 0 and all(i + n == j for (i, n), j in zip(windows, starts[1:]))
    assert sum(n for _, n in windows) == source.size(0) - 1
    if rng is None:
        assert [n for _, n in windows[:-1]] == [35] * (len(windows) - 1)
    batches = [data.get_batch(source, i, n) for i, n in windows]
    assert torch.equal(torch.cat([x for x, _ in batches]), source[:-1])
    assert torch.equal(torch.cat([y for _, y in batches]), source[1:])


# Fetching: a real HTTP server on 127.0.0.1 serves archives built here; nothing else is ever contacted.

TOY_PTB = {"train": b"the cat sat\non the mat\n", "valid": b"the cat\n", "test": b"the mat sat\n"}


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def write_tgz(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> None:
    """Write a gzipped tar of files (member name -> content) and symlinks (member name -> link target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)


def serve_toy_ptb(root: Path, monkeypatch, md5: dict[str, str] | None = None, **extra: bytes) -> None:
    """Serve a toy simple-examples.tgz laid out like the real one and register its MD5s for "ptb"."""
    members = {f"simple-examples/data/ptb.{split}.txt": content for split, content in TOY_PTB.items()}
    write_tgz(root / "simple-examples.tgz", {**members, **extra})
    known = md5 or {split: hashlib.md5(content).hexdigest() for split, content in TOY_PTB.items()}
    monkeypatch.setitem(data.KNOWN_CORPORA, "ptb", dataclasses.replace(data.KNOWN_CORPORA["ptb"], md5=known))


@pytest.mark.slow
def test_fetch_verifies_writes_md5sums_and_loads(tmp_path, server, monkeypatch):
    root, base_url = server
    # A hostile extra member must not land anywhere: only the registry's members are extracted.
    serve_toy_ptb(root, monkeypatch, **{"simple-examples/../../escaped.txt": b"x"})
    logs = []
    folder = data.fetch_corpus("ptb", tmp_path / "data", base_url=base_url, log=logs.append)

    assert folder == tmp_path / "data" / "ptb"
    assert sorted(p.name for p in folder.iterdir()) == ["MD5SUMS", "ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    assert not list(tmp_path.rglob("escaped.txt"))
    size = (root / "simple-examples.tgz").stat().st_size
    assert f"ptb: {size:,} / {size:,} bytes" in logs
    sums = (folder / "MD5SUMS").read_text().splitlines()
    assert sums == [f"{hashlib.md5(TOY_PTB[s]).hexdigest()}  ptb.{s}.txt" for s in ("train", "valid", "test")]

    corpus = data.load_corpus("ptb", tmp_path / "data", fetch_missing=False, log=lambda line: None)
    assert corpus.vocab == ("the", "cat", "sat", "<eos>", "on", "mat")
    assert len(corpus.train) == 8 and corpus.unk_counts == {"valid": 0, "test": 0}


@pytest.mark.slow
def test_load_fetches_missing_known_corpus_from_env_mirror(tmp_path, server, monkeypatch):
    root, base_url = server
    serve_toy_ptb(root, monkeypatch)
    monkeypatch.setenv(data.DATA_URL_ENV, base_url)
    corpus = data.load_corpus("ptb", tmp_path / "data", log=lambda line: None)
    assert corpus.path == tmp_path / "data" / "ptb" and corpus.vocab_size == 6


@pytest.mark.slow
def test_fetch_zip_without_known_md5s(tmp_path, server):
    root, base_url = server
    with zipfile.ZipFile(root / "wikitext-2-v1.zip", "w") as zf:
        for split, content in TOY_PTB.items():
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", content)
    folder = data.fetch_corpus("wikitext-2", tmp_path / "data", base_url=base_url, log=lambda line: None)
    assert data.find_split_files(folder)["train"] == folder / "wiki.train.tokens"
    assert (folder / "MD5SUMS").read_text().startswith(hashlib.md5(TOY_PTB["train"]).hexdigest())


@pytest.mark.slow
def test_fetch_wrong_checksum_names_file_and_md5s(tmp_path, server, monkeypatch):
    root, base_url = server
    wrong = {"train": "0" * 32, "valid": hashlib.md5(TOY_PTB["valid"]).hexdigest()}
    serve_toy_ptb(root, monkeypatch, md5=wrong)
    with pytest.raises(UserError) as err:
        data.fetch_corpus("ptb", tmp_path / "data", base_url=base_url, log=lambda line: None)
    message = str(err.value)
    assert "ptb.train.txt" in message and "0" * 32 in message and hashlib.md5(TOY_PTB["train"]).hexdigest() in message
    assert "python -m harness data fetch ptb" in message
    assert not list((tmp_path / "data" / "ptb").iterdir())  # nothing half-fetched is left behind


@pytest.mark.slow
def test_fetch_refuses_link_members(tmp_path, server, monkeypatch):
    root, base_url = server
    members = {f"simple-examples/data/ptb.{s}.txt": TOY_PTB[s] for s in ("train", "valid")}
    write_tgz(root / "simple-examples.tgz", members, links={"simple-examples/data/ptb.test.txt": "/etc/passwd"})
    with pytest.raises(UserError, match="no regular file 'simple-examples/data/ptb.test.txt'"):
        data.fetch_corpus("ptb", tmp_path / "data", base_url=base_url, log=lambda line: None)


def test_fetch_unreachable_url_fails_fast_with_instructions(tmp_path):
    with socket.socket() as sock:  # bind then close: a port on 127.0.0.1 that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        data.fetch_corpus("ptb", tmp_path / "data", base_url=f"http://127.0.0.1:{port}", log=lambda line: None)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/simple-examples.tgz" in message and "offline" in message
    assert "python -m harness data fetch ptb" in message and str(tmp_path / "data" / "ptb") in message


@pytest.mark.slow
def test_fetch_missing_archive_and_unknown_name(tmp_path, server):
    _, base_url = server
    with pytest.raises(UserError, match="simple-examples.tgz"):
        data.fetch_corpus("ptb", tmp_path / "data", base_url=base_url, log=lambda line: None)
    with pytest.raises(UserError, match="ptb, wikitext-2"):
        data.fetch_corpus("nope", tmp_path / "data")

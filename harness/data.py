"""Word-level corpora: find, fetch, tokenise, cache and batch them for BPTT training.

A corpus is a folder of train/valid/test files (PTB, plain or WikiText names) under $AWD_DATA_DIR
(default ./data). `load_corpus("ptb")` returns token ids, fetching a known corpus on first use and caching
the ids beside it; `python -m harness data fetch ptb` fetches ahead of time (e.g. before going offline).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shlex
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch

from harness.errors import UserError
from harness.paths import check_path

DATA_DIR_ENV = "AWD_DATA_DIR"
CACHE_DIR_ENV = "AWD_CACHE_DIR"
DATA_URL_ENV = "AWD_DATA_URL"

EOS = "<eos>"
UNK = "<unk>"
_SPLITS = ("train", "valid", "test")
# Recognised file names per split: PTB, plain, WikiText.
_SPLIT_NAMES = {split: (f"ptb.{split}.txt", f"{split}.txt", f"wiki.{split}.tokens") for split in _SPLITS}
_MD5SUMS = "MD5SUMS"
# Part of the cache key: bump it whenever tokenisation or the cached layout changes.
_CACHE_FORMAT = 1
_TIMEOUT_S = 30
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Source:
    """Where a known corpus is downloaded from and what its files must hash to."""

    url: str
    members: dict[str, str]  # split -> member path inside the archive
    md5: dict[str, str]  # split -> MD5 of the extracted file; splits missing here are not verified


KNOWN_CORPORA = {
    "ptb": _Source(
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        members={split: f"simple-examples/data/ptb.{split}.txt" for split in _SPLITS},
        md5={
            "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
            "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
            "test": "8b80168b89c18661a38ef683c0dc3721",
        },
    ),
    # We found no per-file MD5s for WikiText-2 that we could confirm, so its files are not verified on
    # fetch; the MD5SUMS written beside them still catches any later change.
    "wikitext-2": _Source(
        url="https://wikitext.smerity.com/wikitext-2-v1.zip",
        members={split: f"wikitext-2/wiki.{split}.tokens" for split in _SPLITS},
        md5={},
    ),
}


# Corpora written here rather than downloaded: `markov`, whose true perplexity is known (harness.synthetic).
GENERATED_CORPORA = ("markov",)


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields elementwise has no single truth value
class Corpus:
    """A tokenised corpus: the vocabulary and the token ids of each split."""

    name: str  # folder name, e.g. "ptb"
    path: Path  # the corpus folder
    vocab: tuple[str, ...] = field(repr=False)  # id -> word, from train only; "<eos>" ends every line
    train: torch.Tensor = field(repr=False)  # int64 (N_train,)
    valid: torch.Tensor = field(repr=False)  # int64 (N_valid,)
    test: torch.Tensor = field(repr=False)  # int64 (N_test,)
    md5: dict[str, str]  # split -> MD5 hex of the split file's content
    unk_counts: dict[str, int]  # "valid"/"test" -> tokens unseen in train, mapped to <unk>

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids."""
        return len(self.vocab)


def default_data_dir() -> Path:
    """The folder holding corpora: $AWD_DATA_DIR, else ./data."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data").expanduser().absolute()


def find_split_files(folder: Path) -> dict[str, Path]:
    """Map "train"/"valid"/"test" to the split files in folder, whichever naming convention they use."""
    found = _match_split_files(folder)
    missing = [split for split in _SPLITS if split not in found]
    if missing:
        wanted = "; ".join(f"{split}: {' or '.join(_SPLIT_NAMES[split])}" for split in missing)
        raise UserError(f"{folder}: no file for split(s) {', '.join(missing)}; expected {wanted}")
    return found


def changed_splits(recorded: dict, md5: dict) -> list:
    """The splits (sorted) whose MD5 differs from the one recorded; a split recorded nowhere is not compared.
    The one rule for "the corpus changed" of a study (harness.study.spec.StudyIdentity) and of a run's checkpoint
    (harness.train)."""
    return [split for split, digest in sorted(md5.items()) if split in recorded and recorded[split] != digest]


def load_corpus(
    name: str, data_dir: Path | None = None, *, fetch_missing: bool = True, log: Callable[[str], object] = print
) -> Corpus:
    """Load a corpus by name under data_dir (or by folder path), fetching a known one if it is missing."""
    folder = _corpus_folder(name, data_dir)
    if len(_match_split_files(folder)) < len(_SPLITS):
        if (folder.name in KNOWN_CORPORA or folder.name in GENERATED_CORPORA) and fetch_missing:
            folder = fetch_corpus(folder.name, folder.parent, log=log)
        else:
            raise UserError(_missing_message(folder))
    files = find_split_files(folder)
    contents = {split: _read_split(path) for split, path in files.items()}
    md5 = {split: hashlib.md5(content).hexdigest() for split, content in contents.items()}

    payload = _read_cache(folder, md5, log)
    if payload is None:
        _verify_md5sums(folder, files, md5)
        payload = _tokenize_splits(files, contents)
        log(
            f"{folder.name}: tokenised {', '.join(f'{len(payload[s]):,} {s}' for s in _SPLITS)} tokens, "
            f"vocab {len(payload['vocab']):,}"
        )
        _write_cache(folder, md5, payload, log)

    unk_counts = payload["unk_counts"]
    if any(unk_counts.values()):
        log(
            f"{folder.name}: mapped {unk_counts['valid']:,} valid and {unk_counts['test']:,} test tokens "
            f"unseen in train to {UNK}"
        )
    return Corpus(
        name=folder.name,
        path=folder,
        vocab=tuple(payload["vocab"]),
        train=payload["train"],
        valid=payload["valid"],
        test=payload["test"],
        md5=md5,
        unk_counts=dict(unk_counts),
    )


def _read_split(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:  # no permission, an I/O error on a failing disk or network mount
        raise UserError(f"{path}: cannot read the corpus file ({err.strerror}); fix its permissions or copy it "
                        "to a readable folder") from None


def fetch_corpus(
    name: str, data_dir: Path | None = None, *, base_url: str | None = None, log: Callable[[str], object] = print
) -> Path:
    """Download a known corpus (or write a generated one) into data_dir/name, verify its files and write MD5SUMS;
    returns the folder."""
    source = KNOWN_CORPORA.get(name)
    data_dir = Path(data_dir).absolute() if data_dir is not None else default_data_dir()
    folder = data_dir / name
    if source is None and name not in GENERATED_CORPORA:
        raise UserError(
            f"unknown corpus {name!r}: `python -m harness data fetch` knows "
            f"{', '.join(sorted([*KNOWN_CORPORA, *GENERATED_CORPORA]))}; for another corpus put its train/valid/test "
            f"files into {folder} yourself"
        )
    if len(_match_split_files(folder)) == len(_SPLITS):
        log(f"{name}: already present in {folder}; delete it to fetch again")
        return folder
    if source is None:
        return _generate(name, folder, log)

    url = _archive_url(source.url, base_url or os.environ.get(DATA_URL_ENV))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {folder} ({err.strerror}); set {DATA_DIR_ENV} to a writable folder") from None
    # Download and extract inside the target folder so the final os.replace never crosses file systems.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        archive = Path(tmp) / "archive.download"
        _download(url, archive, folder, log)
        extracted = _extract_members(archive, source.members, url, Path(tmp))
        md5 = {}
        for split, (path, actual) in extracted.items():
            expected = source.md5.get(split)
            if expected is not None and actual != expected:
                raise UserError(
                    f"{source.members[split]} from {url} has MD5 {actual}, expected {expected}: the download is "
                    f"corrupt or the server holds other data; delete {folder} and run `{_fetch_command(folder)}` "
                    "again, or point base_url/$AWD_DATA_URL at a good mirror"
                )
            md5[split] = actual
        for split, (path, _) in extracted.items():
            os.replace(path, folder / Path(source.members[split]).name)
    (folder / _MD5SUMS).write_text(
        "".join(f"{md5[split]}  {Path(source.members[split]).name}\n" for split in _SPLITS), encoding="utf-8"
    )
    log(f"{name}: fetched into {folder}")
    return folder


def _generate(name: str, folder: Path, log: Callable[[str], object]) -> Path:
    """Write a generated corpus (GENERATED_CORPORA) and its MD5SUMS into folder."""
    from harness import synthetic  # it builds on this module's Corpus and batchify

    try:
        synthetic.write_corpus(folder)
    except OSError as err:
        raise UserError(f"cannot write {folder} ({err.strerror}); set {DATA_DIR_ENV} to a writable folder") from None
    files = find_split_files(folder)
    (folder / _MD5SUMS).write_text("".join(f"{hashlib.md5(files[split].read_bytes()).hexdigest()}  "
                                           f"{files[split].name}\n" for split in _SPLITS), encoding="utf-8")
    log(f"{name}: written into {folder}")
    return folder


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into batch_size columns, (N,) -> (N // batch_size, batch_size), dropping the tail.

    Each column is one contiguous stretch of the corpus and rows advance in time (sequence-first):

        data (11,) = a b c d e f g h i j k      batchify(data, 3) -> (3, 3)    a d g
                                                                                b e h
                                                                                c f i    (j k dropped)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_rows = data.size(0) // batch_size
    if n_rows < 2:
        raise UserError(
            f"cannot batchify {data.size(0):,} tokens into batch_size={batch_size} columns: each column needs at "
            "least 2 tokens (an input and its target); lower batch_size or use a larger split"
        )
    # (N,) -> (B, N // B) gives each column a contiguous stretch; transpose to (N // B, B).
    return data[: n_rows * batch_size].view(batch_size, n_rows).t().contiguous()


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i..i+T of a batchified source as inputs and the rows one step later as targets, both (T, B).

        source (5, 2)    get_batch(source, i=1, seq_len=2)
            a f
            b g     inputs (2, 2) = b g      targets (2, 2) = c h
            c h                     c h                       d i
            d i
            e j
    T = seq_len, clipped so the targets stay inside source.
    """
    seq_len = min(seq_len, source.size(0) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len]


def sample_seq_len(rng: np.random.Generator, bptt: int) -> int:
    """AWD-LSTM variable BPTT: max(5, int(N(base, 5))) with base = bptt w.p. 0.95, else bptt / 2."""
    base = bptt if rng.random() < 0.95 else bptt / 2
    return max(5, int(rng.normal(base, 5)))


def bptt_positions(source: torch.Tensor, bptt: int, rng: np.random.Generator | None) -> Iterator[tuple[int, int]]:
    """Yield (i, seq_len) windows tiling a batchified source once; rng None fixes seq_len at bptt (evaluation)."""
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    n_rows = source.size(0)
    i = 0
    # The last row is only ever a target, so inputs cover rows 0..n_rows-2 and targets rows 1..n_rows-1.
    while i < n_rows - 1:
        seq_len = bptt if rng is None else sample_seq_len(rng, bptt)
        # Yield the clipped length: it is what get_batch returns, so callers scaling the learning rate by
        # seq_len / bptt (as AWD-LSTM does) scale by the window actually trained on.
        seq_len = min(seq_len, n_rows - 1 - i)
        yield i, seq_len
        i += seq_len


def _corpus_folder(name: str, data_dir: Path | None) -> Path:
    """The folder of a corpus given by name (under data_dir) or by path (anything with a slash or ~)."""
    if "/" in name or os.sep in name or name.startswith("~") or name in (".", ".."):
        return check_path(name, f"corpus {name!r}").absolute()
    parent = Path(data_dir).absolute() if data_dir is not None else default_data_dir()
    folder = check_path(parent / name, f"corpus {name!r} in {DATA_DIR_ENV} or --data-dir")
    if name in GENERATED_CORPORA and len(_match_split_files(folder)) < len(_SPLITS):
        # A generated corpus is written where it can be: the data folder may be a read-only shared one.
        if not _writable_dir(folder.parent):
            return _cache_dirs(folder)[1] / "corpora" / name
    return folder


def _match_split_files(folder: Path) -> dict[str, Path]:
    """The split files present in folder (possibly none); two candidates for one split is an error."""
    found = {}
    for split, names in _SPLIT_NAMES.items():
        present = [folder / name for name in names if (folder / name).is_file()]
        if len(present) > 1:
            raise UserError(
                f"{folder}: ambiguous {split} split, found {' and '.join(p.name for p in present)}; "
                "keep one of them"
            )
        if present:
            found[split] = present[0]
    return found


def _fetch_command(folder: Path) -> str:
    """The exact shell command that fetches the known corpus living in folder."""
    command = f"python -m harness data fetch {folder.name}"
    if folder.parent != default_data_dir():
        command = f"{DATA_DIR_ENV}={shlex.quote(str(folder.parent))} {command}"
    return command


def _missing_message(folder: Path) -> str:
    """Why a corpus folder cannot be loaded yet, and what to do about it."""
    name = folder.name
    files = ", ".join(" or ".join(names) for names in _SPLIT_NAMES.values())
    if name in KNOWN_CORPORA or name in GENERATED_CORPORA:
        return (
            f"corpus {name!r} is not in {folder}: run `{_fetch_command(folder)}` to "
            f"{'download' if name in KNOWN_CORPORA else 'write'} it, or put its three files ({files}) into {folder}"
        )
    return (
        f"corpus {name!r} is not in {folder}: put its three files ({files}) into {folder}; "
        f"`python -m harness data fetch` knows only {', '.join(sorted([*KNOWN_CORPORA, *GENERATED_CORPORA]))}"
    )


def _verify_md5sums(folder: Path, files: dict[str, Path], md5: dict[str, str]) -> None:
    """Check the split files against folder/MD5SUMS (md5sum format), if there is one."""
    sums_path = folder / _MD5SUMS
    if not sums_path.is_file():
        return
    expected = {}
    for line_no, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 32:
            raise UserError(f"{sums_path} line {line_no}: expected '<md5>  <file name>', got {line!r}; fix the line")
        expected[parts[1].strip().lstrip("*")] = parts[0].lower()
    for split, path in files.items():
        want = expected.get(path.name)
        if want is not None and want != md5[split]:
            fix = "restore it"
            if folder.name in KNOWN_CORPORA:
                fix = f"delete {folder} and run `{_fetch_command(folder)}`"
            raise UserError(
                f"{path} has MD5 {md5[split]}, but {sums_path} expects {want}: the file changed or is corrupt; "
                f"{fix}, or update {_MD5SUMS} if the change is intended"
            )


def _split_words(path: Path, split: str, content: bytes) -> list[str]:
    """Decode a split file as UTF-8 and split it into words, with EOS closing every line."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 at byte offset {err.start} ({content[err.start:err.start + 4]!r}); "
            "re-encode the file as UTF-8"
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":  # a final newline ends the last line rather than starting an empty one
        lines.pop()
    words = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    if len(words) == len(lines):  # only the EOS markers: no actual words
        raise UserError(f"{path}: the {split} split has no tokens; put the {split} text into this file")
    return words


def _tokenize_splits(files: dict[str, Path], contents: dict[str, bytes]) -> dict:
    """Turn the raw split files into the cache payload: vocab (from train), int64 ids and unk counts."""
    words = {split: _split_words(files[split], split, contents[split]) for split in _SPLITS}
    word_to_id: dict[str, int] = {}
    # Ids follow first appearance in train, as in pytorch/examples word_language_model.
    train_ids = [word_to_id.setdefault(word, len(word_to_id)) for word in words["train"]]
    unk_counts = {split: sum(word not in word_to_id for word in words[split]) for split in ("valid", "test")}
    if any(unk_counts.values()):
        word_to_id.setdefault(UNK, len(word_to_id))
    unk_id = word_to_id.get(UNK)
    payload = {"vocab": list(word_to_id), "unk_counts": unk_counts}
    payload["train"] = torch.tensor(train_ids, dtype=torch.int64)
    for split in ("valid", "test"):
        payload[split] = torch.tensor([word_to_id.get(word, unk_id) for word in words[split]], dtype=torch.int64)
    return payload


def _cache_dirs(folder: Path) -> list[Path]:
    """Where a corpus's token cache may live, preferred first: beside the corpus, then the user cache."""
    fallback = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "awd-ablation"
    return [folder / ".cache", Path(fallback).expanduser()]


def _cache_name(folder: Path, md5: dict[str, str]) -> str:
    """The cache file name: keyed by the content of all three files, so a changed file is never served stale."""
    key = hashlib.md5(" ".join([str(_CACHE_FORMAT)] + [md5[split] for split in _SPLITS]).encode()).hexdigest()
    return f"{folder.name}-{key}.pt"


def _read_cache(folder: Path, md5: dict[str, str], log: Callable[[str], object]) -> dict | None:
    """The cached payload for these file contents, or None if there is no readable one."""
    name = _cache_name(folder, md5)
    for cache_dir in _cache_dirs(folder):
        path = cache_dir / name
        if not path.is_file():
            continue
        try:
            payload = torch.load(path, weights_only=True)
            _check_payload(payload, md5)
        # torch.load fails on a damaged file with many exception types; any of them means "rebuild".
        except Exception as err:
            log(f"{folder.name}: ignoring unreadable cache {path} ({type(err).__name__}: {err}); rebuilding it")
            continue
        log(f"{folder.name}: token ids from cache {path}")
        return payload
    return None


def _check_payload(payload: object, md5: dict[str, str]) -> None:
    """Raise ValueError unless payload has the layout _tokenize_splits produces, for these files."""
    ok = (
        isinstance(payload, dict)
        and payload.get("format") == _CACHE_FORMAT
        and payload.get("md5") == md5
        and isinstance(payload.get("vocab"), list)
        and isinstance(payload.get("unk_counts"), dict)
        and all(
            isinstance(payload.get(split), torch.Tensor)
            and payload[split].dtype == torch.int64
            and payload[split].dim() == 1
            for split in _SPLITS
        )
        and all(isinstance(word, str) for word in payload["vocab"])
    )
    if not ok:
        raise ValueError("unexpected contents")
    for split in _SPLITS:  # an id outside the vocabulary would index past the embedding, or wrap around
        ids = payload[split]
        if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < len(payload["vocab"])):
            raise ValueError(f"{split} token ids outside the vocabulary of {len(payload['vocab'])}")


def _writable_dir(path: Path) -> bool:
    """Whether files can be created in path (made if missing); tried for real, as root ignores permission bits.

    A folder without write bits counts as read-only even for root: it was shared that way on purpose.
    """
    nearest = path if path.exists() else path.parent
    if nearest.exists() and not nearest.stat().st_mode & 0o222:
        return False
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def _write_cache(folder: Path, md5: dict[str, str], payload: dict, log: Callable[[str], object]) -> None:
    """Save the payload to the first writable cache dir, atomically so concurrent loaders never see half a file."""
    cache_dir = next((d for d in _cache_dirs(folder) if _writable_dir(d)), None)
    if cache_dir is None:
        log(f"{folder.name}: no writable cache folder; set {CACHE_DIR_ENV} to one to make the next load instant")
        return
    path = cache_dir / _cache_name(folder, md5)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save({"format": _CACHE_FORMAT, "md5": md5, **payload}, out)
        os.replace(tmp, path)
    # A full disk surfaces as OSError or as torch's RuntimeError; either way the load itself succeeded.
    except (OSError, RuntimeError) as err:
        Path(tmp).unlink(missing_ok=True)
        log(f"{folder.name}: could not write cache {path} ({err}); the next load will tokenise again")
        return
    log(f"{folder.name}: cached token ids at {path}")


def _archive_url(url: str, base_url: str | None) -> str:
    """The archive URL, with its directory replaced by base_url (a mirror or a test server) if given."""
    if not base_url:
        return url
    return f"{base_url.rstrip('/')}/{url.rsplit('/', 1)[-1]}"


def _offline_error(url: str, folder: Path, reason: object) -> UserError:
    """The error for a failed download: what failed and how to get the files without this machine's network."""
    files = ", ".join(Path(member).name for member in KNOWN_CORPORA[folder.name].members.values())
    return UserError(
        f"could not download {url} ({reason}); if this machine is offline, download the archive yourself, "
        f"put the three files {files} into {folder}, and load again; otherwise retry `{_fetch_command(folder)}`"
    )


def _download(url: str, dest: Path, folder: Path, log: Callable[[str], object]) -> None:
    """Stream url to dest, logging progress as bytes so far / total about every 10%."""
    log(f"{folder.name}: downloading {url}")
    try:
        response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as err:  # URLError and HTTPError are OSErrors
        raise _offline_error(url, folder, getattr(err, "reason", err)) from None
    except ValueError as err:  # not a URL at all (no scheme, an unknown one)
        raise UserError(f"cannot download {url!r} ({err}); --url (or ${DATA_URL_ENV}) must be an http(s):// or file:// "
                        "folder URL") from None
    with response, dest.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        step = total // 10 if total else 8 * _CHUNK
        done, next_report = 0, step
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as err:
                raise _offline_error(url, folder, err) from None
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            if done >= next_report or done == total:
                log(f"{folder.name}: {done:,} / {total:,} bytes" if total else f"{folder.name}: {done:,} bytes")
                next_report = done + step
    if total and done != total:
        raise _offline_error(url, folder, f"connection closed after {done:,} of {total:,} bytes")


def _extract_members(archive: Path, members: dict[str, str], url: str, out_dir: Path) -> dict[str, tuple[Path, str]]:
    """Copy only the wanted archive members into out_dir; returns split -> (extracted file, its MD5).

    No archive-supplied path is ever written to: each member is streamed into out_dir under the base name of
    its registry entry, and links or devices are refused, so a hostile archive cannot escape out_dir.
    """
    extracted = {}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for split, member in members.items():
                    try:
                        info = zf.getinfo(member)
                    except KeyError:
                        raise _missing_member(url, member) from None
                    if info.is_dir():
                        raise _missing_member(url, member)
                    with zf.open(info) as stream:
                        extracted[split] = _extract_one(stream, member, out_dir)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for split, member in members.items():
                    try:
                        info = tf.getmember(member)
                    except KeyError:
                        raise _missing_member(url, member) from None
                    if not info.isfile():
                        raise _missing_member(url, member)
                    with tf.extractfile(info) as stream:
                        extracted[split] = _extract_one(stream, member, out_dir)
    # A damaged archive fails in the decompressor or the container format, with these types.
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise UserError(
            f"{url} is not a readable .tgz or .zip archive ({err}); check the URL or base_url/${DATA_URL_ENV}"
        ) from None
    return extracted


def _missing_member(url: str, member: str) -> UserError:
    """The error for an archive that lacks a file the registry expects."""
    return UserError(f"{url} has no regular file {member!r}: the server holds a different archive; use the original")


def _extract_one(stream: IO[bytes], member: str, out_dir: Path) -> tuple[Path, str]:
    """Stream one member into out_dir under its base name; returns the file and the MD5 hex of its content."""
    path = out_dir / Path(member).name
    if path.parent != out_dir or path.name in ("", ".", ".."):
        raise UserError(f"archive member {member!r} does not name a file; fix its entry in KNOWN_CORPORA")
    digest = hashlib.md5()
    with path.open("wb") as out:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return path, digest.hexdigest()

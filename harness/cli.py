"""Command line: `python -m harness COMMAND ...` (train, ablate, worker, plan, report, ui, dashboard, masks, bench,
data fetch). User mistakes surface as one line on stderr and exit code 2, never a traceback.
"""

import argparse
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.errors import UserError
from harness.paths import check_path, os_refusal
from harness.redaction import guard
from harness.study.stores import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, HEARTBEAT, STALE_AFTER

ABLATE_DEFAULTS = {"storage": DEFAULT_STORAGE, "tracking_uri": DEFAULT_TRACKING_URI, "runs_dir": "runs",
                   "reports_dir": "reports", "heartbeat": HEARTBEAT}
UI_HOST = "127.0.0.1"  # the browsers answer this machine only, unless --host says otherwise


MAX_HEARTBEAT = 3600  # seconds; a dead machine's trials would wait STALE_AFTER times this before a retry


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = name.partition(":")
    if name != "cpu" and (kind != "cuda" or colon and not index.isdigit()):
        raise UserError(f"--device {name}: use cpu, cuda, cuda:N or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: {torch.cuda.device_count()} GPUs are visible here (cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}); see CUDA_VISIBLE_DEVICES")
    return name


def _output_dir(value, flag: str) -> Path:
    """The folder an output option names, checked before anything runs: a folder, or one that can be made.

    Tried for real (root ignores permission bits), but a folder without write bits counts as read-only, as in
    harness.data: it was shared that way on purpose.
    """
    path = check_path(value, f"{flag} {value}")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {value}: {path} is a file, not a folder; pass a folder (it is made if missing)")
    nearest = path
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UserError(f"{flag} {value}: {nearest} is a file, so no folder can be made inside it; pass another folder")
    try:
        if not nearest.stat().st_mode & 0o222:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as err:
        raise UserError(f"{flag} {value}: cannot write in {nearest} ({err.strerror}); pass a writable folder") from None
    return path


def _report_folder(value, study: str, flag: str) -> None:
    """UserError unless the report of `study` can be written under the folder `value`: its study folder a folder (or
    one that can be made) and none of the files the report writes there a folder."""
    from harness.report import REPORT_FILES

    folder = _output_dir(Path(value) / study, flag)
    for name in REPORT_FILES:
        if (folder / name).is_dir():
            raise UserError(f"{flag} {value}: {folder / name} is a folder, where the report writes a file; move it")


def _whole(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or high is not None and value > high:
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} must be {bounds}")
        return value
    return parse


def cmd_train(args) -> int:
    """One run of one variant of a study, with a progress bar and a summary."""
    from harness.config import SITES, parse_overrides
    from harness.data import load_corpus
    from harness.study.spec import load_study
    from harness.train import check_splits, clear_checkpoints, train_model

    study = load_study(args.study)
    config = study.run_config(args.variant, parse_overrides(args.set))
    device = _device(args.device)
    out = Path(args.out) if args.out else Path("runs") / study.name / f"{config.variant}-seed{config.train.seed}"
    _output_dir(out, "--out")
    corpus = load_corpus(config.corpus)
    check_splits(config, corpus)  # before the resume message and --fresh: a refused run deletes nothing
    if args.fresh:
        for path in clear_checkpoints(out):  # only what a run writes there, never the folder or other files
            print(f"  --fresh: deleted {path}")
    d, m, recipe = config.dropout, config.model, config.train
    print(f"{study.name} / {config.variant}: {m.n_layers}-layer LSTM emb {m.emb_size} hidden {m.hidden_size}, "
          f"vocab {corpus.vocab_size}, {device}")
    print(f"  dropout ({d.hidden_mode}): " + ", ".join(f"{s} {getattr(d, s):g}" for s in SITES))
    print(f"  {recipe.epochs} epochs, batch {recipe.batch_size}, bptt {recipe.bptt}, lr {recipe.lr:g}, "
          f"{recipe.optimizer}; checkpoints in {out}")
    if (out / "last.pt").exists():
        print(f"  resuming from {out / 'last.pt'}")

    def report(e):
        tag = "  (averaged)" if e.averaging else ""
        print(f"epoch {e.epoch:>3}/{recipe.epochs}  train ppl {e.train_ppl:8.2f}  val ppl {e.val_ppl:8.2f}  "
              f"lr {e.lr:g}  {e.epoch_seconds:6.1f} s  {e.tokens_per_s:8,.0f} tok/s{tag}", flush=True)

    result = train_model(config, corpus, device=device, checkpoint_dir=out, on_epoch=report,
                         progress=not args.no_progress)
    averaged = f", averaging from epoch {result.averaged_from_epoch}" if result.averaged_from_epoch else ""
    print(f"best val ppl {result.best_val_ppl:.2f} (epoch {result.best_epoch}{averaged}); "
          f"test ppl {result.test_ppl:.2f}; {result.seconds:.0f} s; best checkpoint {result.checkpoint}")
    return 0


def _coordinate(args, study) -> bool:
    """Run this machine's share of the study; False when stopped (Ctrl-C, or SIGTERM from a batch system)."""
    from harness.study.coordinator import run_study
    from harness.study.scheduler import discover_slots

    _output_dir(args.runs_dir, "--runs-dir")
    _output_dir(Path(args.runs_dir) / study.name, "--runs-dir")  # its study folder, which the trials write into
    slots = discover_slots(args.devices, args.trials_per_device)

    def stop(signum, frame):
        raise KeyboardInterrupt  # the trials running here are marked interrupted and retried without delay

    signal.signal(signal.SIGTERM, stop)
    try:
        run_study(study, storage=args.storage, tracking_uri=args.tracking_uri, slots=slots,
                     runs_dir=Path(args.runs_dir), heartbeat=args.heartbeat)
    except KeyboardInterrupt:
        print(f"\nstopped; the interrupted trials are marked and will be retried. Resume with the same command:\n"
              f"  python -m harness {args.command} {args.study}" + "".join(f" {a}" for a in _resume_flags(args)),
              file=sys.stderr)
        return False
    return True


def cmd_ablate(args) -> int:
    """Run or resume an ablation study over every device slot, then write its report."""
    from harness.report import build_report
    from harness.study.ledger.storage import dashboard_command
    from harness.study.spec import load_study
    from harness.study.stores import redact
    from harness.study.tracking import ui_command

    study = load_study(args.study)
    _report_folder(args.reports_dir, study.name, "--reports-dir")  # before the study, not after hours of it
    if not _coordinate(args, study):
        return 130
    report = build_report(study, args.tracking_uri, args.storage, Path(args.reports_dir))
    print("conclusions:\n" + "\n".join(f"  - {line}" for line in report.conclusions))
    print(f"results:\n  report      {report.page} (and {report.results_csv.name}, {report.comparisons_csv.name})\n"
          f"  MLflow      {redact(args.tracking_uri)}; browse: {ui_command(args.tracking_uri)}\n"
          f"  Optuna      {redact(args.storage)}; browse: {dashboard_command(args.storage)}\n"
          f"  checkpoints {Path(args.runs_dir) / study.name}")
    return 0


def cmd_worker(args) -> int:
    """Run this machine's device slots on a study shared through PostgreSQL, until nothing is left anywhere."""
    from harness.study.spec import load_study
    from harness.study.stores import redact

    study = load_study(args.study)
    if not _coordinate(args, study):
        return 130
    print(f"{study.name} is complete on every machine; write the report with:\n  python -m harness report "
          f"{args.study} --storage {redact(args.storage)} --tracking-uri {redact(args.tracking_uri)}")
    return 0


def cmd_plan(args) -> int:
    """Runs, epochs, device-hours and wall time of a study on the slots at hand, from a short calibration."""
    from harness.study.plan import left_of, plan_study, read_epoch_times
    from harness.study.stores import redact
    from harness.study.scheduler import discover_slots
    from harness.study.spec import load_study

    study = load_study(args.study)
    slots = discover_slots(args.devices, args.trials_per_device)
    times = read_epoch_times(args.seconds_per_epoch) if args.seconds_per_epoch else None
    under_way = left_of(study, args.storage) if args.storage else None  # before the calibration: fails in seconds
    result = plan_study(study, slots, epoch_times=times, n_slots=args.slots, budget_seconds=args.calibration_seconds)
    print(result.format())
    if args.storage:
        print(result.left(*under_way) if under_way else f"{redact(args.storage)} holds no trial of {study.name} yet: "
              "all of it is left")
    if times is None and all(slot.device == "cpu" for slot in slots):
        print("these are CPU figures: for GPUs, run this plan on one (--devices cuda), or pass --seconds-per-epoch "
              "measured there (make gpu-check writes them)")
    return 0


def cmd_report(args) -> int:
    """Rebuild a study's HTML report from what MLflow and Optuna hold."""
    from harness.report import build_report
    from harness.study.ledger.storage import check_storage
    from harness.study.spec import load_study
    from harness.study.stores import check_tracking

    study = load_study(args.study)
    _report_folder(args.out, study.name, "--out")
    check_tracking(args.tracking_uri)
    check_storage(args.storage)
    report = build_report(study, args.tracking_uri, args.storage, Path(args.out))
    print("\n".join(f"- {line}" for line in report.conclusions))
    print(f"report written: {report.page} (and {report.results_csv.name}, {report.comparisons_csv.name})")
    return 0


def _tool(name: str) -> str:
    """The console script `name` of this environment (beside its python), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise UserError(f"{name} is not installed here; run `make install` (it is in pyproject.toml)")
    return found


def _serve(name: str, argv: list) -> int:
    """Run the console tool `name` until it ends (Ctrl-C, SIGTERM), its output through this command's redaction
    (harness.redaction): the store URL it is given may hold a password, and its errors may print it."""
    tool = subprocess.Popen([_tool(name), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for line in tool.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        tool.terminate()  # a terminal's Ctrl-C reached it too; a SIGTERM sent to this process alone did not
    finally:
        try:
            tool.wait(timeout=30)
        except subprocess.TimeoutExpired:
            tool.kill()
            tool.wait()
    return 0 if tool.returncode in (0, -signal.SIGTERM, -signal.SIGINT) else tool.returncode


def cmd_ui(args) -> int:
    """The MLflow UI on the study's tracking store until Ctrl-C, after printing each study's runs-table link."""
    from harness.study.stores import check_tracking, redact
    from harness.study.tracking import runs_table_links

    check_tracking(args.tracking_uri)
    # A browser on this machine reaches a server listening on every interface at 127.0.0.1.
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    links = runs_table_links(args.tracking_uri, base)
    print(f"MLflow UI on {base} for {redact(args.tracking_uri)} (Ctrl-C stops it)"
          + "".join(f"\n  {name}: {url}" for name, url in links.items()), flush=True)
    return _serve("mlflow", ["ui", "--backend-store-uri", args.tracking_uri, "--host", args.host,
                             "--port", str(args.port)])


def cmd_dashboard(args) -> int:
    """optuna-dashboard on the study's Optuna storage, until Ctrl-C."""
    from harness.study.ledger.storage import check_storage
    from harness.study.stores import redact

    check_storage(args.storage)
    print(f"optuna-dashboard on http://{args.host}:{args.port} for {redact(args.storage)} (Ctrl-C stops it)",
          flush=True)
    return _serve("optuna-dashboard", [args.storage, "--host", args.host, "--port", str(args.port)])


def cmd_masks(args) -> int:
    """Draw the mask diagrams from the real dropout modules."""
    from harness.masks import write_mask_figures

    for path in write_mask_figures(_output_dir(args.out, "--out")):
        print(path)
    return 0


def _resume_flags(args) -> list:
    from harness.study.stores import redact

    flags = []
    for name in ("storage", "tracking_uri", "devices", "trials_per_device", "runs_dir", "reports_dir", "heartbeat"):
        value = getattr(args, name, None)
        if value is not None and value != ABLATE_DEFAULTS.get(name):
            flags.append(f"--{name.replace('_', '-')} {redact(str(value))}")
    return flags


def cmd_bench(args) -> int:
    """Throughput ratios of AWD-LSTM against a plain nn.LSTM stack."""
    import torch

    from harness.bench import ARMS, format_table, run_bench
    from harness.config import CELLS

    if args.scheduler:
        return _bench_scheduler(args.tasks)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    arms = tuple(a.strip() for a in args.arms.split(",")) if args.arms else ARMS
    if not sizes or any(s not in ("paper", "cpu") for s in sizes):
        raise UserError(f"bench --sizes {args.sizes!r}: use a comma list of paper, cpu")
    for name in arms:
        if name not in ARMS:
            raise UserError(f"bench: unknown arm {name!r}; arms: {', '.join(ARMS)}")
    if "plain" not in arms:
        arms = ("plain", *arms)
    cells = tuple(c.strip() for c in args.cells.split(",") if c.strip()) if args.cells else CELLS
    if not cells or any(c not in CELLS for c in cells):
        raise UserError(f"bench --cells {args.cells!r}: use a comma list of {', '.join(CELLS)}")
    rows = run_bench(sizes, rounds=args.rounds, steps=args.steps, device=device, arms=arms, cells=cells)
    print(format_table(rows, device))
    return 0


def _bench_scheduler(n_tasks: int) -> int:
    from harness.bench import bench_slots
    from harness.data import load_corpus
    from harness.study.spec import load_study

    study = load_study(Path(__file__).resolve().parent.parent / "studies" / "smoke.toml")
    config = study.run_config("awd", {"train.train_tokens": 20000, "train.epochs": 2})
    load_corpus(config.corpus)  # fetch and cache before the clock starts
    print(f"scheduler speed-up: {n_tasks} equal trials of the smoke study's awd "
          f"(20k tokens, 2 epochs, 1 thread each), 1 slot then 2")
    seconds = bench_slots(config, n_tasks)
    print(f"speed-up with 2 slots: {seconds[1] / seconds[2]:.2f}x")
    return 0


def cmd_data_fetch(args) -> int:
    """Download a known corpus and verify its checksums."""
    from harness.data import fetch_corpus

    data_dir = _output_dir(args.data_dir, "--data-dir") if args.data_dir else None
    folder = fetch_corpus(args.name, data_dir, base_url=args.url)
    print(f"{args.name} is ready in {folder}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other error (its usage lines drown the message)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one variant of a study")
    p.add_argument("study", help="study file (TOML), e.g. studies/cpu-ptb.toml")
    p.add_argument("--variant", required=True, help="ablation arm, e.g. awd")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. train.epochs=1 (repeatable)")
    p.add_argument("--out", help="checkpoint folder (default runs/STUDY/VARIANT-seedN)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming from --out")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    for command, func, helps in (
        ("ablate", cmd_ablate, "run or resume an ablation study (search, confirmation, tracking, report)"),
        ("worker", cmd_worker, "run this machine's devices on a study shared through PostgreSQL and an MLflow server"),
    ):
        p = sub.add_parser(command, help=helps)
        p.add_argument("study", help="study file, e.g. studies/ablation.toml")
        shared = command == "worker"  # a worker with local files would share nothing
        p.add_argument("--storage", required=shared, default=None if shared else ABLATE_DEFAULTS["storage"],
                       help="Optuna storage URL: sqlite:///FILE, or postgresql://USER@HOST:PORT/DB to share the study "
                            "between machines (password in the URL or PGPASSWORD)")
        p.add_argument("--tracking-uri", required=shared, default=None if shared else ABLATE_DEFAULTS["tracking_uri"],
                       help="MLflow tracking URI: sqlite:///FILE, or http://HOST:PORT of an MLflow server")
        p.add_argument("--devices", help="cpu, cuda or cuda:0,cuda:1 (default: every visible GPU, else the CPU)")
        p.add_argument("--trials-per-device", type=_whole(1),  # discover_slots has the upper bound
                       help="trials at once per GPU, or the number of CPU workers")
        p.add_argument("--runs-dir", default=ABLATE_DEFAULTS["runs_dir"], help="checkpoint folder")
        if command == "ablate":
            p.add_argument("--reports-dir", default=ABLATE_DEFAULTS["reports_dir"], help="where the HTML report goes")
        p.add_argument("--heartbeat", type=_whole(1, MAX_HEARTBEAT), default=ABLATE_DEFAULTS["heartbeat"],
                       help=f"seconds between heartbeats of running trials on PostgreSQL (default {HEARTBEAT}); a "
                            f"trial is retried after {STALE_AFTER} missed; use the same value on every machine")
        p.set_defaults(func=func)

    p = sub.add_parser("plan", help="cost before running: runs, epochs, device-hours and wall time of a study")
    p.add_argument("study", help="study file, e.g. studies/ablation.toml")
    p.add_argument("--devices", help="cpu, cuda or cuda:0,cuda:1 (default: every visible GPU, else the CPU)")
    p.add_argument("--trials-per-device", type=int, help="trials at once per GPU, or the number of CPU workers")
    p.add_argument("--seconds-per-epoch", action="append", default=[], metavar="VARIANT=SECONDS|FILE.json",
                   help="an epoch time measured elsewhere, e.g. awd=63.5 (*=S for every variant), or a JSON file "
                        '{"seconds_per_epoch": {"awd": 63.5}, "device": "..."} or gpu-check.json (repeatable)')
    p.add_argument("--slots", type=int, help="price the study on this many slots like these, e.g. 32 for 4 machines "
                                             "x 8 GPUs with --seconds-per-epoch measured on one of their GPUs")
    p.add_argument("--storage", help="the Optuna storage of a study under way: also say what is left of it (finished "
                                     "runs, and the epochs its retries continue from checkpoints, count as done)")
    p.add_argument("--calibration-seconds", type=float, default=60.0,
                   help="stop calibrating after this long once some variant is measured (default 60)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="rebuild a study's HTML report from MLflow and Optuna")
    p.add_argument("study", help="study file")
    p.add_argument("--storage", default=ABLATE_DEFAULTS["storage"], help="Optuna storage URL")
    p.add_argument("--tracking-uri", default=ABLATE_DEFAULTS["tracking_uri"], help="MLflow tracking URI")
    p.add_argument("--out", default=ABLATE_DEFAULTS["reports_dir"], help="reports folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="the MLflow UI on a study's tracking store")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking URI")
    p.add_argument("--host", default=UI_HOST, help=f"address to listen on (default {UI_HOST}: this machine only)")
    p.add_argument("--port", type=_whole(1, 65535), default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("dashboard", help="optuna-dashboard on a study's Optuna storage")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    p.add_argument("--host", default=UI_HOST, help=f"address to listen on (default {UI_HOST}: this machine only)")
    p.add_argument("--port", type=_whole(1, 65535), default=8080)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("masks", help="draw the dropout mask diagrams from the real modules")
    p.add_argument("--out", default="reports/masks", help="folder for the PNG files")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("bench", help="training throughput vs a plain nn.LSTM stack")
    p.add_argument("--sizes", default="paper,cpu", help="comma list of paper, cpu")
    p.add_argument("--arms", default="", help="comma list of arms (default: plain and every hidden mode)")
    p.add_argument("--cells", default="", help="comma list of cells, each against a plain stack of its torch module "
                   "(default: every cell)")
    p.add_argument("--rounds", type=_whole(1), default=8, help="rounds; the ratio is their median (more = steadier)")
    p.add_argument("--steps", type=_whole(1), default=3, help="training steps per arm per round")
    p.add_argument("--threads", type=_whole(0, 4096), default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--scheduler", action="store_true", help="instead: n equal trials on 1 CPU slot vs 2")
    p.add_argument("--tasks", type=_whole(1), default=6, help="trials for --scheduler")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="corpora")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download a known corpus (ptb, wikitext-2) and verify MD5s, or write the "
                                                 "generated one (markov: its true perplexity is known)")
    f.add_argument("name")
    f.add_argument("--data-dir", help="default $AWD_DATA_DIR or ./data")
    f.add_argument("--url", help="mirror folder that holds the archive")
    f.set_defaults(func=cmd_data_fetch)
    return parser


STUDY_COMMANDS = ("ablate", "worker", "plan", "report", "dashboard")  # the commands that open an Optuna storage


def _quiet_libraries(command: str) -> None:
    """MLflow's and Optuna's own INFO lines (database migrations, "View run" links, "A new study created") would
    drown the live view, which says what happens; and each of its lines shows at once, also through a pipe or a
    log file."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if command in STUDY_COMMANDS:
        import optuna  # its first import sets its logger to INFO: only its own setter stays set

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)


def main(argv=None) -> int:
    # Every line printed from here on, by the harness or a library, and any traceback, has the secrets it was
    # given masked (harness.redaction), argparse's own errors included.
    with guard(sys.argv[1:] if argv is None else argv):
        args = build_parser().parse_args(argv)
        _quiet_libraries(args.command)
        return _run(args)


def _run(args) -> int:
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the OS refused where no check named it first: still the user's fix
        refusal = os_refusal(err, f"python -m harness {args.command}")
        if refusal is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        from harness.train import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"stopped: {err}", file=sys.stderr)
            return 1
        raise

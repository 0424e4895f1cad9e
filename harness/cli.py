"""Command line: `python -m harness COMMAND ...` (train, ablate, worker, report, masks, bench, data fetch).

User mistakes surface as one line on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from harness.errors import UserError
from harness.stores import HEARTBEAT, STALE_AFTER

ABLATE_DEFAULTS = {"storage": "sqlite:///optuna.db", "tracking_uri": "sqlite:///mlflow.db", "runs_dir": "runs",
                   "reports_dir": "reports", "heartbeat": HEARTBEAT}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return name


def cmd_train(args) -> int:
    """One run of one variant of a study, with a progress bar and a summary."""
    from harness.config import load_study, parse_overrides
    from harness.data import load_corpus
    from harness.train import train_model

    study = load_study(args.study)
    config = study.run_config(args.variant, parse_overrides(args.set))
    device = _device(args.device)
    corpus = load_corpus(config.corpus)
    out = Path(args.out) if args.out else Path("runs") / study.name / f"{config.variant}-seed{config.train.seed}"
    if args.fresh and out.exists():
        shutil.rmtree(out)
    d, m, t = config.dropout, config.model, config.train
    print(f"{study.name} / {config.variant}: {m.n_layers}-layer LSTM emb {m.emb_size} hidden {m.hidden_size}, "
          f"vocab {corpus.vocab_size}, {device}")
    print(f"  dropout ({d.hidden_mode}): " + ", ".join(f"{s} {getattr(d, s):g}" for s in
                                                       ("embedding", "input", "hidden", "output", "weight")))
    print(f"  {t.epochs} epochs, batch {t.batch_size}, bptt {t.bptt}, lr {t.lr:g}, {t.optimizer}; checkpoints in {out}")
    if (out / "last.pt").exists():
        print(f"  resuming from {out / 'last.pt'}")

    def report(e):
        tag = "  (averaged)" if e.averaging else ""
        print(f"epoch {e.epoch:>3}/{t.epochs}  train ppl {e.train_ppl:8.2f}  val ppl {e.val_ppl:8.2f}  "
              f"lr {e.lr:g}  {e.epoch_seconds:6.1f} s  {e.tokens_per_s:8,.0f} tok/s{tag}", flush=True)

    result = train_model(config, corpus, device=device, checkpoint_dir=out, on_epoch=report,
                         progress=not args.no_progress)
    averaged = f", averaging from epoch {result.averaged_from_epoch}" if result.averaged_from_epoch else ""
    print(f"best val ppl {result.best_val_ppl:.2f} (epoch {result.best_epoch}{averaged}); "
          f"test ppl {result.test_ppl:.2f}; {result.seconds:.0f} s; best checkpoint {result.checkpoint}")
    return 0


def _coordinate(args, study) -> bool:
    """Run this machine's share of the study; False when stopped (Ctrl-C, or SIGTERM from a batch system)."""
    from harness.ablation import run_ablation
    from harness.scheduler import discover_slots

    slots = discover_slots(args.devices, args.trials_per_device)

    def stop(signum, frame):
        raise KeyboardInterrupt  # the trials running here are marked interrupted and retried without delay

    signal.signal(signal.SIGTERM, stop)
    try:
        run_ablation(study, storage=args.storage, tracking_uri=args.tracking_uri, slots=slots,
                     runs_dir=Path(args.runs_dir), heartbeat=args.heartbeat)
    except KeyboardInterrupt:
        print(f"\nstopped; the interrupted trials are marked and will be retried. Resume with the same command:\n"
              f"  python -m harness {args.command} {args.study}" + "".join(f" {a}" for a in _resume_flags(args)),
              file=sys.stderr)
        return False
    return True


def cmd_ablate(args) -> int:
    """Run or resume an ablation study over every device slot, then write its report."""
    from harness.config import load_study
    from harness.report import build_report
    from harness.ledger import dashboard_command
    from harness.stores import redact
    from harness.tracking import ui_command

    study = load_study(args.study)
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
    from harness.config import load_study
    from harness.stores import redact

    study = load_study(args.study)
    if not _coordinate(args, study):
        return 130
    print(f"{study.name} is complete on every machine; write the report with:\n  python -m harness report "
          f"{args.study} --storage {redact(args.storage)} --tracking-uri {redact(args.tracking_uri)}")
    return 0


def cmd_report(args) -> int:
    """Rebuild a study's HTML report from what MLflow and Optuna hold."""
    from harness.config import load_study
    from harness.ledger import check_storage
    from harness.report import build_report
    from harness.stores import check_tracking

    study = load_study(args.study)
    check_tracking(args.tracking_uri)
    check_storage(args.storage)
    report = build_report(study, args.tracking_uri, args.storage, Path(args.out))
    print("\n".join(f"- {line}" for line in report.conclusions))
    print(f"report written: {report.page} (and {report.results_csv.name}, {report.comparisons_csv.name})")
    return 0


def cmd_masks(args) -> int:
    """Draw the mask diagrams from the real dropout modules."""
    from harness.masks import write_mask_figures

    for path in write_mask_figures(Path(args.out)):
        print(path)
    return 0


def _resume_flags(args) -> list:
    from harness.stores import redact

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

    if args.scheduler:
        return _bench_scheduler(args.tasks)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    arms = tuple(a.strip() for a in args.arms.split(",")) if args.arms else ARMS
    for name in [*sizes, *arms]:
        if name not in ("paper", "cpu", *ARMS):
            raise UserError(f"bench: unknown size or arm {name!r}; sizes: paper, cpu; arms: {', '.join(ARMS)}")
    if "plain" not in arms:
        arms = ("plain", *arms)
    rows = run_bench(sizes, rounds=args.rounds, steps=args.steps, device=device, arms=arms)
    print(format_table(rows, device))
    return 0


def _bench_scheduler(n_tasks: int) -> int:
    from harness.bench import bench_slots
    from harness.config import load_study
    from harness.data import load_corpus

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

    folder = fetch_corpus(args.name, Path(args.data_dir) if args.data_dir else None, base_url=args.url)
    print(f"{args.name} is ready in {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.splitlines()[0])
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
        p.add_argument("--trials-per-device", type=int, help="trials at once per GPU, or the number of CPU workers")
        p.add_argument("--runs-dir", default=ABLATE_DEFAULTS["runs_dir"], help="checkpoint folder")
        if command == "ablate":
            p.add_argument("--reports-dir", default=ABLATE_DEFAULTS["reports_dir"], help="where the HTML report goes")
        p.add_argument("--heartbeat", type=int, default=ABLATE_DEFAULTS["heartbeat"],
                       help=f"seconds between heartbeats of running trials on PostgreSQL (default {HEARTBEAT}); a "
                            f"trial is retried after {STALE_AFTER} missed; use the same value on every machine")
        p.set_defaults(func=func)

    p = sub.add_parser("report", help="rebuild a study's HTML report from MLflow and Optuna")
    p.add_argument("study", help="study file")
    p.add_argument("--storage", default=ABLATE_DEFAULTS["storage"], help="Optuna storage URL")
    p.add_argument("--tracking-uri", default=ABLATE_DEFAULTS["tracking_uri"], help="MLflow tracking URI")
    p.add_argument("--out", default=ABLATE_DEFAULTS["reports_dir"], help="reports folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("masks", help="draw the dropout mask diagrams from the real modules")
    p.add_argument("--out", default="reports/masks", help="folder for the PNG files")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("bench", help="training throughput vs a plain nn.LSTM stack")
    p.add_argument("--sizes", default="paper,cpu", help="comma list of paper, cpu")
    p.add_argument("--arms", default="", help="comma list of arms (default: plain and every hidden mode)")
    p.add_argument("--rounds", type=int, default=8, help="rounds; the ratio is their median (more = steadier)")
    p.add_argument("--steps", type=int, default=3, help="training steps per arm per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--scheduler", action="store_true", help="instead: n equal trials on 1 CPU slot vs 2")
    p.add_argument("--tasks", type=int, default=6, help="trials for --scheduler")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="corpora")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download a known corpus (ptb, wikitext-2) and verify MD5s")
    f.add_argument("name")
    f.add_argument("--data-dir", help="default $AWD_DATA_DIR or ./data")
    f.add_argument("--url", help="mirror folder that holds the archive")
    f.set_defaults(func=cmd_data_fetch)
    return parser


def _quiet_libraries() -> None:
    """MLflow's and Optuna's own INFO lines (database migrations, "View run" links, "Trial finished") would drown
    the live view, which says what happens."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
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

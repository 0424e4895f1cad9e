"""The GPU check: one command that checks and measures the CUDA path and writes one table.

    python -m harness.gpu_check --out DIR        # on a CUDA machine; without one it says what it skipped
    python -m harness.gpu_check --rehearse       # every part on this CPU at toy sizes: the plumbing only
    python -m harness.gpu_check --bundle .gpu-bundle --print-command   # what a bare torch machine lacks
"""

import sys

if sys.version_info < (3, 11):  # before the harness imports: its study files need tomllib (Python 3.11)
    sys.exit(f"the GPU check needs Python >= 3.11 (harness.study.spec reads TOML with tomllib); this is {sys.version}")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from harness.data import default_data_dir  # noqa: E402
from harness.gpu_check.bundle import build_bundle, device_command  # noqa: E402
from harness.gpu_check.check import TOTAL_SECONDS, run_check  # noqa: E402
from harness.gpu_check.parts import PARTS  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check",
                                     description="the GPU check: checks and measures the CUDA path, one table")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for gpu-check.md, .json and .log")
    parser.add_argument("--budget", type=float, default=TOTAL_SECONDS, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma list of parts to run")
    parser.add_argument("--rehearse", action="store_true", help="run the parts on this CPU at toy sizes")
    parser.add_argument("--bundle", metavar="DIR", help="instead: build the carry bundle in DIR (needs pip)")
    parser.add_argument("--print-command", action="store_true", help="instead: print the GPU machine's command")
    args = parser.parse_args(argv)
    if args.bundle or args.print_command:
        bundle = args.bundle or ".gpu-bundle"
        if args.bundle:
            build_bundle(Path(args.bundle), default_data_dir())
        if args.print_command:
            print(f"carry: [\"{bundle}\"]\ncommand:\n{device_command(bundle)}")
        return 0
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - {p.name for p in PARTS})
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(p.name for p in PARTS)}")
    return run_check(Path(args.out), [p for p in PARTS if p.name in names], args.budget, args.rehearse)


if __name__ == "__main__":
    sys.exit(main())

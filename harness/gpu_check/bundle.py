"""What a GPU machine with only torch, numpy and pytest lacks, carried as a bundle: the pure-Python packages the
harness imports at start-up and PTB; and the one command line that runs the check there.
"""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from harness.data import KNOWN_CORPORA, find_split_files
from harness.errors import UserError

REPO = Path(__file__).resolve().parents[2]
# harness.study.scheduler imports joblib (1.6 imports the separate cloudpickle package), harness.train tqdm.
# `--bundle` installs them, without their other dependencies, for PYTHONPATH.
BUNDLE_PACKAGES = ("joblib", "cloudpickle", "tqdm")


def bundle_corpus(data_dir: Path, dest: Path) -> None:
    """Copy PTB's three files from data_dir/ptb to dest/ptb, verified against the published MD5s (MD5SUMS beside)."""
    source = KNOWN_CORPORA["ptb"]
    files = find_split_files(data_dir / "ptb")
    target = dest / "ptb"
    target.mkdir(parents=True, exist_ok=True)
    sums = []
    for split, path in files.items():
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != source.md5[split]:
            raise UserError(f"{path} has MD5 {digest}, not PTB's published {source.md5[split]}: "
                            f"restore it (`python -m harness data fetch ptb`) before bundling")
        shutil.copyfile(path, target / path.name)
        sums.append(f"{digest}  {path.name}\n")
    (target / "MD5SUMS").write_text("".join(sums))


def build_bundle(folder: Path, data_dir: Path, log=print) -> None:
    """folder/site: BUNDLE_PACKAGES at the versions of constraints.txt; folder/data: PTB. Carry it to the GPU."""
    site = folder / "site"
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--only-binary=:all:", "--target", str(site), "-c", str(REPO / "constraints.txt"),
                    *BUNDLE_PACKAGES], check=True)
    bundle_corpus(data_dir, folder / "data")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    log(f"{folder}: {', '.join(BUNDLE_PACKAGES)} and PTB, {size / 2**20:.1f} MB")


def device_command(bundle: str = ".gpu-bundle") -> str:
    """The one shell line that runs the check on a GPU machine from the repository root, writing to $OUT."""
    # The first of python3/python that has torch: the GPU machine's own interpreter, not a bare system one.
    return (f'PY=$(for p in python3 python; do $p -c "import torch" 2>/dev/null && echo $p && break; done); '
            f'PYTHONPATH="$PWD:$PWD/{bundle}/site${{PYTHONPATH:+:$PYTHONPATH}}" AWD_DATA_DIR="$PWD/{bundle}/data" '
            f'"${{PY:?no python3 or python with torch on PATH}}" -m harness.gpu_check --out "$OUT"')

"""Print the mutation score per file from `mutmut results --all true` (run by `make mutants` after mutmut run).

Score = (killed + timeout + segfault) / all mutants: a mutant that makes the tests hang or crash is caught, too. Survivors judged
equivalent are listed, with the reason, in tests/EQUIVALENT_MUTANTS.md.
Run: .venv/bin/python tests/mutation_score.py   (from the repository root, after `mutmut run`)
"""

import collections
import subprocess
import sys
from pathlib import Path

CAUGHT = ("killed", "timeout", "segfault")


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    lines = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for line in lines.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep:
            continue
        module = name.split(".x_")[0].split(".x\u01c1")[0]  # harness.train.x_fn__mutmut_3 / harness.train.xǁClassǁm...
        counts[module][status] += 1
        if status not in CAUGHT:
            survivors.append(f"{name}: {status}")
    if not counts:
        print("no mutation results: run `mutmut run` first")
        return 1
    for module, by_status in sorted(counts.items()):
        total, caught = sum(by_status.values()), sum(by_status[s] for s in CAUGHT)
        detail = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
        print(f"{module.replace('.', '/')}.py: {caught}/{total} caught ({100 * caught / total:.1f}%): {detail}")
    print(f"{len(survivors)} not caught (see `mutmut show NAME`; equivalent ones: tests/EQUIVALENT_MUTANTS.md):")
    print("\n".join(f"  {s}" for s in survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 13: one table of the stored embeddings measured with ``dve compare-tsloo … --results
results/mnist_projection/<setting>``, a thin driver over :func:`dve_repro.decompose.collect_stored`.

    python scripts/projection_table.py results/mnist_projection    # → stored.{csv,md} there
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dve_repro.decompose import collect_stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="folder holding one compare-tsloo results folder per setting")
    print(collect_stored(ap.parse_args().root))


if __name__ == "__main__":
    main()

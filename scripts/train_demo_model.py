"""Train the bundled demo model on synthetic phantoms into models/lung-ct-demo/.

Reproducible: the same seed gives the same weights on the same TensorFlow
build. Takes about 3 minutes on two CPU cores. Same as ``lungnode train --demo``.

    python scripts/train_demo_model.py [--seed N] [--out models/lung-ct-demo]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lungnode.ml.train import train_demo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "lung-ct-demo"
    )
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = train_demo(args.out, seed=args.seed, epochs=args.epochs, verbose=2)
    print(f"bundle written to {out}")


if __name__ == "__main__":
    main()

"""Write one synthetic chest CT series to a folder, for demos and manual tests.

Example::

    python scripts/make_demo_series.py --out demo/ --slices 40 --transfer-syntax JPEGLosslessSV1

Then send it to the node with DCMTK: ``storescu -aec <AE title> <host> <port> demo/``.

``--lesion CLASS`` draws the slices with the synthetic lung phantoms the demo model
was trained on (``lungnode.ml.phantoms``), with a lesion of that class spanning a
few slices, so the demo model has something to find. Without it, the series
shows a plain chest-like phantom. Both are synthetic stand-ins, not patient data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The test-data generators live in tests/support (not shipped in lungnode), so a
# script run as `python scripts/x.py` puts the repository root on sys.path first.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lungnode.domain import CLASS_LABELS  # noqa: E402
from tests.support.synthetic import make_ct_series, write_series  # noqa: E402
from tests.support.synthetic_codecs import (  # noqa: E402
    SUPPORTED_TRANSFER_SYNTAXES,
    resolve_transfer_syntax,
)


def main(argv: list[str] | None = None) -> int:
    names = ", ".join(uid.keyword for uid in SUPPORTED_TRANSFER_SYNTAXES)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--slices", type=int, default=40, help="number of slices (default 40)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--columns", type=int, default=512)
    parser.add_argument(
        "--transfer-syntax",
        default="ExplicitVRLittleEndian",
        help=f"keyword or UID, one of: {names}",
    )
    parser.add_argument("--seed", type=int, default=0, help="phantom noise seed")
    parser.add_argument("--enhanced", action="store_true", help="one Enhanced CT multi-frame")
    parser.add_argument(
        "--lesion",
        choices=[label for label in CLASS_LABELS],
        help="draw the demo model's phantoms with a lesion of this class (Normal: none)",
    )
    args = parser.parse_args(argv)
    slice_hu = None
    if args.lesion:
        if args.rows != args.columns:
            parser.error("--lesion needs square slices (--rows equal to --columns)")
        from lungnode.ml.phantoms import generate_volume

        volume, _mask = generate_volume(args.seed, args.lesion, args.slices, args.rows)
        slice_hu = volume.__getitem__
    try:
        tsyntax = resolve_transfer_syntax(args.transfer_syntax)
        datasets = make_ct_series(
            args.slices,
            rows=args.rows,
            columns=args.columns,
            transfer_syntax=tsyntax,
            seed=args.seed,
            enhanced=args.enhanced,
            slice_hu=slice_hu,
        )
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    paths = write_series(datasets, args.out)
    print(
        f"wrote {len(paths)} file(s) of series {datasets[0].SeriesInstanceUID} "
        f"({tsyntax.name}) to {args.out.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

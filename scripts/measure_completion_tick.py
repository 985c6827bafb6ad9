"""What one tick of the completion timer costs while long series are receiving.

    python scripts/measure_completion_tick.py [--slices 300,1200] [--ticks 50]

The embedded node's completion timer (``pipeline.completion.CompletionWatcher``)
looks at every receiving series twice a second. This registers series of the
given lengths in a fresh SQLite database (rows only, no files), as the intake
would, all of them still receiving, and times ``check_once`` with nothing new
arriving: the cost of a tick while the senders pause or the quiet and grace
timers run. Each length is added in turn, so the last line has every series
receiving at once. One tick first, not timed, reads the series.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lungnode.db.migrate import upgrade  # noqa: E402
from lungnode.db.repo import NodeRepository  # noqa: E402
from lungnode.db.session import make_engine, make_session_factory  # noqa: E402
from lungnode.domain import InstanceFacts  # noqa: E402
from lungnode.pipeline.completion import CompletionWatcher  # noqa: E402
from lungnode.series.assembler import CompletionRules  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def register_series(repo: NodeRepository, association: int, uid: str, slices: int) -> None:
    for index in range(slices):
        facts = InstanceFacts(
            study_instance_uid=f"{uid}.0",
            series_instance_uid=uid,
            sop_instance_uid=f"{uid}.{index + 1}",
            sop_class_uid=CT_IMAGE_STORAGE,
            transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
            modality="CT",
            series_number=1,
            instance_number=index + 1,
            number_of_frames=1,
            position=[-175.0, -175.0, 1.25 * index],
            orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            declared_count=None,
        )
        repo.register_instance(facts, repo.storage_dir / f"{uid}.{index}.dcm", 1, association)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="300,1200", help="series lengths, comma-separated")
    parser.add_argument("--ticks", type=int, default=50, help="timed ticks per line")
    args = parser.parse_args()
    lengths = [int(n) for n in args.slices.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="lungnode-tick-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'lungnode.db'}"
        upgrade(url)
        repo = NodeRepository(make_session_factory(make_engine(url)), Path(tmp))
        association = repo.association_started("BENCH", None)
        # Only a very long quiet timer: every series stays receiving.
        watcher = CompletionWatcher(repo, CompletionRules(quiet_seconds=1e9), lambda _job: None)
        receiving = 0
        for number, slices in enumerate(lengths, start=1):
            register_series(repo, association, f"1.2.826.0.1.3680043.8.498.{number}", slices)
            receiving += slices
            watcher.check_once()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.ticks):
                watcher.check_once()
            wall = (time.perf_counter() - wall) / args.ticks
            cpu = (time.process_time() - cpu) / args.ticks
            print(
                f"{number} series receiving, {receiving} instances: "
                f"{wall * 1e3:.2f} ms a tick ({cpu * 1e3:.2f} ms CPU)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

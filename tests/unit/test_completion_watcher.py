"""The completion timer reads only what arrived since its last tick, and misses nothing.

``pipeline.completion.CompletionWatcher`` on a real SQLite database: each tick
reads the geometry of the instances above the last id it read, with the count
of all of them; when the two do not add up (an instance committed below that id,
as concurrent receiving processes can do on PostgreSQL, or one removed), it reads
the series afresh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from lungnode.db.migrate import upgrade
from lungnode.db.models import Instance
from lungnode.db.repo import NodeRepository
from lungnode.db.session import make_engine, make_session_factory
from lungnode.pipeline.completion import CompletionWatcher
from lungnode.series.assembler import CompletionRules
from tests.support.facts import axial_ct_facts

SERIES = "1.2.826.0.1.3680043.8.498.77"
#: Rules under which only the declared count can complete a series in a test.
RULES = CompletionRules(quiet_seconds=1e6)


@pytest.fixture
def repo(tmp_path: Path) -> NodeRepository:
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    upgrade(url)
    return NodeRepository(make_session_factory(make_engine(url)), tmp_path)


def _register(repo: NodeRepository, association: int, slice_index: int, declared: int) -> None:
    facts = axial_ct_facts(SERIES, slice_index, declared)
    assert repo.register_instance(facts, repo.storage_dir / f"{slice_index}.dcm", 1, association)


def _receiving(
    repo: NodeRepository, slices: tuple[int, ...], declared: int
) -> tuple[int, CompletionWatcher, list[int]]:
    """A series receiving ``slices`` (indices) of ``declared``, and a watcher that has
    ticked once and queued nothing: (association id, watcher, queued job ids)."""
    association = repo.association_started("CT01", None)
    for index in slices:
        _register(repo, association, index, declared)
    queued: list[int] = []
    watcher = CompletionWatcher(repo, RULES, queued.append)
    assert watcher.check_once() == []
    return association, watcher, queued


def test_a_tick_reads_only_the_instances_that_arrived_since_the_last(
    repo: NodeRepository,
) -> None:
    association, watcher, _queued = _receiving(repo, (0, 1, 2, 3, 4), declared=8)

    (series,) = repo.receiving_series()
    last = series.geometry[-1][0]
    assert series.instance_count == 5 and len(series.geometry) == 5
    (held,) = repo.receiving_series({series.series_id: last})
    assert held.instance_count == 5 and held.geometry == []
    for index in range(5, 7):
        _register(repo, association, index, declared=8)
    (held,) = repo.receiving_series({series.series_id: last})
    assert held.instance_count == 7
    assert [row[0] for row in held.geometry] == sorted(row[0] for row in held.geometry)
    assert all(row[0] > last for row in held.geometry) and len(held.geometry) == 2

    assert watcher.check_once() == []  # 7 of 8
    _register(repo, association, 7, declared=8)
    assert len(watcher.check_once()) == 1  # 8 of 8, an even stack: complete
    assert repo.receiving_series() == []


def test_an_instance_committed_below_the_last_id_read_is_counted(
    repo: NodeRepository,
) -> None:
    association, watcher, queued = _receiving(repo, (0, 1, 3, 4), declared=5)  # a gap at 2

    # Slice 2 gets an id below those already read, as a row whose id was taken
    # first but committed last does with several receiving processes.
    _register(repo, association, 2, declared=5)
    with repo.sessions.begin() as session:
        newest = session.scalar(select(func.max(Instance.id)))
        session.execute(update(Instance).where(Instance.id == newest).values(id=0))

    assert len(watcher.check_once()) == 1  # 5 of 5, the gap filled: complete
    assert queued


def test_a_removed_instance_is_not_counted_any_more(repo: NodeRepository) -> None:
    association, watcher, queued = _receiving(repo, (0, 1, 2, 3), declared=5)

    # Slice 1's row goes (not the newest, so that no id is used again); slice 1
    # comes again and slice 4 arrives: 5 instances, 0-4, the declared count. What
    # the watcher held (4) and what is new (2) add up to 6, not to the series' 5.
    with repo.sessions.begin() as session:
        session.execute(delete(Instance).where(Instance.sop_instance_uid == f"{SERIES}.2"))
    _register(repo, association, 1, declared=5)
    _register(repo, association, 4, declared=5)

    assert len(watcher.check_once()) == 1
    assert queued

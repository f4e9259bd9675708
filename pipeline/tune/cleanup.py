"""Free the Train placement group of a trial that Tune stopped.

ASHA stops a trial by ending its Tune actor. The Train controller that actor owns dies with it, and so do the
Train workers (actors die with their owner), but not the workers' placement group: Ray keeps a non-detached
placement group until both its creator actor and the job are gone. Ray Train's own `PlacementGroupCleaner`
removes it once the controller is dead, but it asks the State API (the dashboard) whether the controller is
alive; without a dashboard (the embedded local defaults start Ray without one) or with several Ray instances
on one machine it cannot tell, and the stopped trial's CPUs / GPUs stay reserved until the search ends, so
later trials starve.

`ReportToTune` (search.py) adds the controller's actor id to every result it forwards;
`release_placement_groups` removes the placement groups created by those controllers once they are dead.
`ReleaseStoppedTrials` runs it on the Tune driver as trials end.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ray import tune

CONTROLLER_KEY = "train_controller_actor_id"


def _placement_groups() -> list[Any]:
    """Every placement group record in the GCS (protobuf `PlacementGroupTableData`, with its creator)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    return [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]


def release_placement_groups(controllers: Iterable[str]) -> tuple[int, set[str]]:
    """Remove the live placement groups whose creator is one of `controllers` (actor ids, hex) and is dead.

    Returns (groups removed, controllers still alive that own a live group)."""
    from ray import PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    wanted = set(controllers)
    removed, alive = 0, set()
    for pg in _placement_groups():
        creator = pg.creator_actor_id.hex()
        if creator not in wanted or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
            continue
        if not pg.creator_actor_dead:
            alive.add(creator)
            continue
        remove_placement_group(PlacementGroup(PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed, alive


def release_when_dead(controllers: Iterable[str], timeout_s: float = 60.0) -> int:
    """`release_placement_groups` until no listed controller owns a live group (or `timeout_s`)."""
    pending, total = set(controllers), 0
    deadline = time.time() + timeout_s
    while pending:
        removed, pending = release_placement_groups(pending)
        total += removed
        if not pending or time.time() > deadline:
            break
        time.sleep(1.0)
    return total


class ReleaseStoppedTrials(tune.Callback):
    """Tune callback: once a trial has ended, free its Train placement group if its controller died too."""

    def __init__(self) -> None:
        self.pending: set[str] = set()

    def _add(self, trial: Any) -> None:
        controller = (trial.last_result or {}).get(CONTROLLER_KEY)
        if controller:
            self.pending.add(controller)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._add(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._add(trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.pending:
            removed, alive = release_placement_groups(self.pending)
            if removed:
                print(f"[tune] released {removed} placement group(s) of stopped trial(s)")
            self.pending = alive

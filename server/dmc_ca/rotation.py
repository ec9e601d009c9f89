"""The walk of `dmc-admin bundle rotate`: prepare, wait, activate, wait, retire (SPEC §6).

The walk keeps no state of its own: each step is derived from the authorities' states in
the trust bundle, so an interrupted rotate run again continues where the last one stopped.

- a PREVIOUS authority: wait until the overlap has passed since it stopped signing and
  the CA would accept its retirement (``retirable_at``), then retire it;
- else a PREPARED authority: wait until it has been in the bundle for the propagation
  time, so that every verifier trusts it, then activate it;
- else, if this run has not acted yet, prepare a new authority; otherwise the rotation
  is done.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from dmc.v1 import ca_pb2

__all__ = [
    "Progress",
    "RotationClient",
    "RotationStep",
    "Step",
    "next_step",
    "rotate",
]

_log = logging.getLogger(__name__)

# How often a wait wakes up to report how long is left.
_TICK_SECONDS = 1.0
# Server and client clocks are compared at each wait's end; a second more keeps a retire
# from landing just before the CA's own bound.
_CLOCK_MARGIN = timedelta(seconds=1)


class Step(enum.StrEnum):
    """What the walk does next."""

    PREPARE = "prepare"
    WAIT_PROPAGATION = "wait for propagation"
    ACTIVATE = "activate"
    WAIT_OVERLAP = "wait out the overlap"
    RETIRE = "retire"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class RotationStep:
    """The next step, the authority it concerns, and for a wait, when it ends."""

    step: Step
    authority_id: str = ""
    started: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """A report to show: the step, and for a wait, how long is left of how long."""

    step: Step
    authority_id: str
    remaining: timedelta | None = None
    total: timedelta | None = None


class RotationClient(Protocol):
    """The CA calls the walk needs; the command implements them over gRPC."""

    def bundle(self) -> ca_pb2.TrustBundle: ...

    def prepare(self) -> ca_pb2.Authority: ...

    def activate(self, authority_id: str) -> ca_pb2.Authority: ...

    def retire(self, authority_id: str) -> ca_pb2.Authority: ...


def _time(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def next_step(
    bundle: ca_pb2.TrustBundle,
    *,
    now: datetime,
    propagation: timedelta,
    overlap: timedelta,
    acted: bool,
) -> RotationStep:
    """The step that follows from the bundle's authority states (see the module doc)."""
    previous = [a for a in bundle.authorities if a.state == ca_pb2.PREVIOUS]
    prepared = [a for a in bundle.authorities if a.state == ca_pb2.PREPARED]

    if previous:
        oldest = min(previous, key=lambda a: (_time(a.created_at), a.id))
        stopped = _time(oldest.state_since)
        until = stopped + overlap
        if oldest.HasField("retirable_at"):
            until = max(until, _time(oldest.retirable_at) + _CLOCK_MARGIN)
        if now < until:
            return RotationStep(Step.WAIT_OVERLAP, oldest.id, stopped, until)
        return RotationStep(Step.RETIRE, oldest.id)

    if prepared:
        newest = max(prepared, key=lambda a: (_time(a.created_at), a.id))
        since = _time(newest.created_at)
        until = since + propagation
        if now < until:
            return RotationStep(Step.WAIT_PROPAGATION, newest.id, since, until)
        return RotationStep(Step.ACTIVATE, newest.id)

    return RotationStep(Step.DONE) if acted else RotationStep(Step.PREPARE)


def rotate(
    client: RotationClient,
    *,
    propagation: timedelta,
    overlap: timedelta,
    on_progress: Callable[[Progress], None],
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Walk the rotation to its end; return one line per action taken.

    Interrupting it (Ctrl-C) at any point is safe: the next run reads the states again.
    """
    done: list[str] = []
    while True:
        step = next_step(
            client.bundle(),
            now=clock(),
            propagation=propagation,
            overlap=overlap,
            acted=bool(done),
        )
        if step.step is Step.DONE:
            on_progress(Progress(Step.DONE, ""))
            return done
        if step.until is not None:
            _wait(step, on_progress, clock, sleep)
            continue

        on_progress(Progress(step.step, step.authority_id))
        if step.step is Step.PREPARE:
            authority = client.prepare()
            done.append(f"prepared authority {authority.id}")
        elif step.step is Step.ACTIVATE:
            authority = client.activate(step.authority_id)
            done.append(f"activated authority {authority.id}")
        else:
            authority = client.retire(step.authority_id)
            done.append(f"retired authority {authority.id}")
        _log.info("bundle rotate: %s", done[-1])


def _wait(
    step: RotationStep,
    on_progress: Callable[[Progress], None],
    clock: Callable[[], datetime],
    sleep: Callable[[float], None],
) -> None:
    assert step.until is not None and step.started is not None
    total = max(step.until - step.started, timedelta(0))
    while (remaining := step.until - clock()) > timedelta(0):
        on_progress(Progress(step.step, step.authority_id, remaining, total))
        sleep(min(_TICK_SECONDS, remaining.total_seconds()))
    on_progress(Progress(step.step, step.authority_id, timedelta(0), total))

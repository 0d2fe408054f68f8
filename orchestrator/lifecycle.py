"""A coordinator's lifecycle as an explicit state machine (after llama-swap's process.go).

    stopped ──start──> starting ──healthy──> ready ──stop/swap──> stopping ──exited──> stopped
                          │                                          ^
                          └──────────failed / timed out──────────────┘
    stopped ──shutdown──> shutdown  (the orchestrator service exits; terminal)

``TRANSITIONS`` is the whole table: any change not in it raises
InvalidTransition. ``Lifecycle.transition(expected, new)`` is a compare-and-swap,
so two operations racing on one coordinator cannot both win.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from tightwad.orchestrator.errors import InvalidTransition


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SHUTDOWN = "shutdown"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.SHUTDOWN}),
    State.STARTING: frozenset({State.READY, State.STOPPING}),
    State.READY: frozenset({State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.SHUTDOWN: frozenset(),
}


class Lifecycle:
    def __init__(self, name: str, state: State = State.STOPPED,
                 on_change: Callable[[str, State], None] | None = None):
        self.name = name
        self._state = state
        self._lock = threading.Lock()
        self._on_change = on_change
        if on_change is not None:
            on_change(name, state)

    def __repr__(self) -> str:
        return f"Lifecycle({self.name!r}, {self._state.value})"

    @property
    def state(self) -> State:
        return self._state

    def transition(self, expected: State, new: State) -> None:
        """Move from ``expected`` to ``new``; InvalidTransition if the state is not
        ``expected`` (someone else moved it) or the table has no such edge."""
        with self._lock:
            if self._state is not expected:
                raise InvalidTransition(
                    f"{self.name}: expected to be {expected.value} to go {new.value}, "
                    f"but it is {self._state.value}")
            if new not in TRANSITIONS[expected]:
                allowed = ", ".join(s.value for s in sorted(TRANSITIONS[expected])) or "nothing"
                raise InvalidTransition(
                    f"{self.name}: {expected.value} -> {new.value} is not a valid transition "
                    f"(from {expected.value}: {allowed})")
            self._state = new
        if self._on_change is not None:
            self._on_change(self.name, new)

    def to(self, new: State) -> None:
        """Move from whatever the state is now (still checked against the table)."""
        self.transition(self._state, new)

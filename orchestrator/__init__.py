"""Tightwad's cluster manager: places, starts, hot-swaps and watches models across Docker hosts.

    Orchestrator            tightwad.orchestrator.cluster: status, plan, start, swap, stop, benchmark
    place / footprint       tightwad.orchestrator.placement: the pure layer-placement core
    read_header             tightwad.orchestrator.gguf: a minimal GGUF header reader
    State, TRANSITIONS      tightwad.orchestrator.lifecycle: the coordinator's state machine
    CoordinatorFront        tightwad.orchestrator.front: the stable address swaps switch behind
    python -m tightwad.orchestrator serve    the service (HTTP API, /health, /metrics, front)

Submodules are imported on use, so ``import tightwad.orchestrator`` stays cheap
(the ``tightwad`` CLI imports it for its subcommands).
"""

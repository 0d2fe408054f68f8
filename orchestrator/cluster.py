"""The orchestrator: places, starts, hot-swaps, stops and watches a model across Docker hosts.

    o = Orchestrator(config)
    o.status() -> ClusterStatus             hosts, devices, workers, coordinator, warnings
    o.plan(model) -> Placement              a dry run: nothing is started
    o.start(model, progress=print)          workers (one rpc-server per GPU), then the coordinator
    o.swap(model, progress=print)           a new coordinator; the workers stay
    o.stop(progress=print)                  everything this cluster runs
    o.benchmark(...)                        the coordinator's prompt and generation tok/s

Every operation checks before it touches anything: hosts answer, images are
there, workers are up, and the model fits the pooled free memory (read from
its GGUF header). Containers carry labels (tightwad.orchestrator.containers),
so the state of the cluster is read from the daemons each time; the only
in-process state is each coordinator's Lifecycle, which every change goes
through (tightwad.orchestrator.lifecycle). One operation runs at a time.

Each operation is a mixin in its own module, over the shared state in
tightwad.orchestrator.base:

    sizing          footprint, free memory, plan()
    reporting       status(), watch()
    starting        start()
    swapping        swap()
    stopping        stop()
    benchmarking    benchmark()
"""

from __future__ import annotations

from tightwad.orchestrator.benchmarking import Benchmarking
from tightwad.orchestrator.reporting import Reporting
from tightwad.orchestrator.stopping import Stopping
from tightwad.orchestrator.swapping import Swapping


class Orchestrator(Reporting, Swapping, Stopping, Benchmarking):
    """Places, starts, hot-swaps, stops and watches a model (see the module docstring)."""

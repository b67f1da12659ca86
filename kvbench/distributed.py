"""distributed: spread sweeps over a Ray cluster; the records come back to one writer on the driver.

    kvbench compare comparisons/quick-cpu.toml --ray    # a local Ray cluster over this machine's GPUs or CPU cores
    kvbench compare comparisons/h100.toml --ray-address 10.0.0.5:6379   # join a running cluster (`ray start --head`)
    kvbench run kernels --quick --ray                   # one suite

The unit of work is a group: the cells of one suite x model x method, which share a model load and a method build
(a worker keeps a suite's session, e.g. its loaded model, for every group of that suite and model it is given). A
suite may group its cells otherwise (`Suite.group_key`): the accuracy suite groups every method and protocol of one
task instance, so that a worker runs the instance's dense prefill once for all of them, as a serial run does.
Each worker is a Ray actor holding one GPU (`num_gpus=1`; one CPU where the cluster has no GPU) and measures one cell
per call, so every record reaches the driver as soon as its cell is done. The driver is the only writer: it appends
each record to `<out>/<suite>.jsonl` exactly as a serial run does, so the report, resume (cells already in the file
are never dispatched) and `--rerun` work unchanged. Each record's `env` is the environment of the worker that
measured it, plus `env.worker`: Ray node id and address, host, GPU ids, process id and actor id.

Faults: a worker process that dies (a crash, a kill, the kernel's or Ray's out-of-memory killer) or holds a cell past
`cell_timeout` seconds is replaced by a fresh actor; the cell it held becomes a `failed` (or `oom`) record naming the
worker and is retried once on another worker where the cluster has one; the rest of its group goes back in the queue;
the sweep goes on. A cell that fails inside a healthy worker (an exception, a CUDA out-of-memory) is recorded as a
serial sweep records it, and not retried. Ctrl-C kills the workers, stops the cluster kvbench started (a joined
cluster keeps running) and keeps every record written: a rerun resumes where it stopped.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from kvbench.device import free_memory
from kvbench.errors import KVBenchError
from kvbench.metrics import BUDGET_FRACTION
from kvbench.records import RecordWriter, cell_key, environment, make_record
from kvbench.sweep import Cell, SweepResult, console, measure_cell, method_facts

INSTALL_HINT = 'pip install -e ".[ray]"'
POLL_S = 0.25  # how often the driver looks at timeouts and refreshes the per-worker status


class Source(Protocol):
    """One suite on one model with its methods and options. Picklable: the driver lists its cells, each worker
    rebuilds them from the same description and measures the ones it is sent."""

    suite: str
    model: str

    def cells(self) -> list[Cell]:
        """Every cell of the suite, without measuring anything."""

    def open(self, method: str) -> Callable[[Cell], dict]:
        """A runner for one method's cells (loads what they share, e.g. the model); called on a worker."""

    def options(self) -> dict[str, Any]:
        """What the provenance file records about this run."""

    def show(self, out: Path, records: list[dict]) -> None:
        """Print the table of these records (after a run)."""

    def group_of(self, cell: Cell) -> str:
        """The group a cell is measured in: its method, unless the suite groups otherwise."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise KVBenchError(f"--ray needs Ray, which is not installed here; install it with {INSTALL_HINT} (or pip "
                           "install ray) and run again") from None
    return ray


class Worker:
    """A Ray actor's body: measures the cells of one group at a time, keeping the group's runner between them."""

    def __init__(self, slot: int):
        self.slot = slot
        self.group: str | None = None
        self.runner: Callable[[Cell], dict] | None = None
        self.cells: dict[str, Cell] = {}

    def where(self) -> dict[str, Any]:
        """This worker's environment (as records hold it) and where in the cluster it runs."""
        import ray

        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        info = {"slot": self.slot, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "host": environment().get("host"), "gpu_ids": gpus, "pid": os.getpid(), "actor_id": ctx.get_actor_id()}
        return {**environment(), "worker": info}

    def release(self, everything: bool = False) -> dict[str, dict]:
        """Let go of the group (and with `everything` the sessions too, returning their provenance facts)."""
        self.runner, self.cells, self.group = None, {}, None
        facts = {}
        if everything:
            _SESSIONS.clear()
            facts = {k: {**v, "actor_id": self.where()["worker"]["actor_id"]} for k, v in _FACTS.items()}
            _FACTS.clear()
        free_memory()
        return facts

    def list_cells(self, source: Source) -> tuple[list[Cell], dict[str, Any]]:
        """The source's cells and options as this worker's machine sees them (its device picks a suite's defaults)."""
        return [Cell(c.method, c.params, c.cell) for c in source.cells()], source.options()

    def measure(self, source: Source, group: str, group_key: str, key: str) -> dict:
        if group != self.group:
            self.release()  # the previous group's runner and caches go (a source's session stays: SuiteSource)
            self.group = group
            self.cells = {cell_key(source.suite, c.method, c.cell): c for c in source.cells()
                          if source.group_of(c) == group_key}
        cell = self.cells[key]  # the worker's own Cell: its parsed method was built here
        record = measure_cell(source.suite, cell, lambda c: self._runner(source, c.method)(c))
        record["env"] = self.where()
        return record

    def _runner(self, source: Source, method: str) -> Callable[[Cell], dict]:
        """The group's runner, opened for its first cell's method; it measures every cell of the group."""
        if self.runner is None:  # once per group (a failed load is tried again by the group's next cell)
            self.runner = source.open(method)
        return self.runner


@dataclass
class Group:
    """Cells of one source and group key (Source.group_of: usually one method), dispatched to one worker in order."""

    source: int  # index into the run's sources
    key: str
    cells: list[Cell]
    retry: bool = False  # a fault's retry: a second fault is recorded, not retried again
    avoid: int | None = None  # the slot whose worker failed these cells

    @property
    def name(self) -> str:
        return f"{self.source}/{self.key}"


@dataclass
class Slot:
    """One worker place in the cluster: its current actor, what it measures now and since when."""

    index: int
    actor: Any
    env: dict[str, Any] = field(default_factory=dict)
    group: Group | None = None
    pending: deque = field(default_factory=deque)
    cell: Cell | None = None
    ref: Any = None
    since: float = 0.0
    done: int = 0
    task: Any = None  # its line in the progress display

    def label(self) -> str:
        w = self.env.get("worker", {})
        gpu = f" GPU {','.join(w['gpu_ids'])}" if w.get("gpu_ids") else ""
        return f"worker {self.index} ({w.get('node_ip', '?')}{gpu}, pid {w.get('pid', '?')})"


_POOL: dict[int, Any] = {}  # slot -> its Ray actor: kept between the sweeps of one Ray session


class Cluster:
    """The Ray cluster a sweep runs on: a local one started here over this machine's GPUs (or CPUs) and stopped on
    exit, or an existing one joined by address (left running). Inside an already connected Ray session (a notebook,
    a test), that session is used as it is."""

    def __init__(self, address: str | None = None, workers: int | None = None, start_timeout_s: float = 300.0):
        if workers is not None and workers < 1:
            raise KVBenchError(f"--workers {workers}: need at least 1 worker")
        # Ray's own convention: RAY_ADDRESS names the cluster to join when no address is given
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.workers, self.start_timeout_s = workers, start_timeout_s
        self.started = False  # True: this object started the cluster and stops it
        self.gpu = False
        self.slots = 0
        self.owner = False  # True: this object connected to Ray (started or joined), so it cleans up on exit
        self.pool = _POOL

    def __enter__(self) -> "Cluster":
        ray = import_ray()
        if not ray.is_initialized():
            if self.address is None:
                self._start_local(ray)
            else:
                self._join(ray)
            self.owner = True
        resources = ray.cluster_resources()
        self.gpu = resources.get("GPU", 0) >= 1
        size = int(resources.get("GPU", 0)) if self.gpu else int(resources.get("CPU", 1))
        self.slots = max(1, min(self.workers or size, size))
        return self

    def _start_local(self, ray) -> None:
        import torch

        gpus = torch.cuda.device_count()
        cpus = os.cpu_count() or 1
        workers = self.workers or gpus or cpus
        # one worker per GPU; on a CPU-only machine one per core (Ray then gives each worker one thread)
        ray.init(num_cpus=max(cpus, workers) if gpus else workers, num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False)
        self.started = True
        console.print(f"[dim]ray: started a local cluster: {workers} worker(s) on "
                      f"{f'{gpus} GPU(s)' if gpus else f'{workers} CPU core(s)'}[/]")

    def _join(self, ray) -> None:
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - any failure to connect is the user's address or cluster
            raise KVBenchError(f"--ray-address {self.address}: cannot join a Ray cluster there ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no detail'}); give the head node's "
                               "host:port as `ray status` shows it, or no address for a local cluster") from None
        console.print(f"[dim]ray: joined the cluster at {escape(self.address)}[/]")

    def __exit__(self, *exc) -> None:
        if not self.owner:
            return
        import ray

        for actor in self.pool.values():  # a joined cluster outlives this session; its workers do not
            ray.kill(actor, no_restart=True)
        self.pool.clear()
        ray.shutdown()  # a cluster started here stops with it; a joined one is only disconnected
        self.owner = False

    def describe(self) -> dict[str, Any]:
        return {"address": self.address or "local", "started_here": self.started, "gpu": self.gpu,
                "workers": self.slots}


def _check_reachable(address: str) -> None:
    """A head node's HOST:PORT that answers no connection fails at once (Ray itself retries for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # ray://..., "auto": Ray's own forms, left to Ray
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as e:
        raise KVBenchError(f"--ray-address {address}: nothing answers there ({e.strerror or type(e).__name__}); "
                           "give the head node's HOST:PORT as `ray status` on it shows (`ray start --head` prints "
                           "it), or leave --ray-address out for a local cluster") from None


class Board:
    """The progress display: one bar over every cell of the sweep, one status line per worker."""

    def __init__(self, total: int, show: bool):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[now]}"),
                                 console=console, disable=not show, transient=False)
        self.total = total
        self.all = self.progress.add_task("[bold]all cells", total=total, now="")

    def __enter__(self) -> "Board":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def worker(self, slot: Slot, now: str) -> None:
        if slot.task is None:
            slot.task = self.progress.add_task("", total=None, now="")
        self.progress.update(slot.task, description=f"  {escape(slot.label())}", completed=slot.done,
                             now=escape(now))

    def grow(self) -> None:
        """One more record to come than there are cells: a retry."""
        self.total += 1
        self.progress.update(self.all, total=self.total)

    def advance(self) -> None:
        self.progress.advance(self.all)

    def note(self, text: str) -> None:
        self.progress.console.print(text)


class Dispatcher:
    """The driver's loop: hands groups to idle workers a cell at a time, writes every record that comes back, turns
    dead and hung workers into records and retries, and replaces them."""

    def __init__(self, ray, cluster: Cluster, sources: list[Source], groups: list[Group],
                 writers: dict[str, RecordWriter], results: list[SweepResult], board: Board,
                 cell_timeout: float | None):
        self.ray, self.cluster, self.sources, self.writers = ray, cluster, sources, writers
        self.results, self.board, self.cell_timeout = results, board, cell_timeout
        self.queue: deque[Group] = deque(groups)
        self.refs = [ray.put(s) for s in sources]  # each source is shipped to the object store once
        self.slots: list[Slot] = []
        self.workers: dict[str, dict] = {}  # actor id -> where it ran, for the provenance
        self.retried = 0
        self.run_id = uuid.uuid4().hex[:8]  # group names are unique across the sweeps a kept worker sees
        opts = dict(num_gpus=1, num_cpus=1) if cluster.gpu else dict(num_gpus=0, num_cpus=1)
        self.actor_class = ray.remote(Worker).options(max_restarts=0, max_task_retries=0, **opts)

    def start(self) -> None:
        """The cluster's workers, kept from an earlier sweep of this session or started now."""
        pool = self.cluster.pool
        for i in [i for i in pool if i >= self.cluster.slots]:  # an earlier sweep had more workers
            self.ray.kill(pool.pop(i), no_restart=True)
        for i in range(self.cluster.slots):
            pool.setdefault(i, self.actor_class.remote(i))
        envs = self.ray.get([pool[i].where.remote() for i in range(self.cluster.slots)],
                            timeout=self.cluster.start_timeout_s)
        self.slots = [Slot(i, pool[i], env) for i, env in enumerate(envs)]
        for s in self.slots:
            self.board.worker(s, "idle")

    def finish(self) -> dict[str, list[dict]]:
        """Each worker lets go of its sessions (models, caches) but stays up for the next sweep; returns their
        provenance facts by source, one entry per worker that started the source."""
        facts: dict[str, list[dict]] = {}
        for per_worker in self.ray.get([s.actor.release.remote(everything=True) for s in self.slots]):
            for key, f in per_worker.items():
                facts.setdefault(key, []).append(f)
        return facts

    def run(self) -> None:
        """Until every queued cell has a record (start() first)."""
        while True:
            for s in self.slots:
                if s.ref is None:
                    self._dispatch(s)
            busy = {s.ref: s for s in self.slots if s.ref is not None}
            if not busy:
                break
            ready, _ = self.ray.wait(list(busy), num_returns=1, timeout=POLL_S)
            for ref in ready:
                self._collect(busy[ref])
            self._check_timeouts()
        if self.queue:  # every worker was lost and none could be started again
            left = sum(len(g.cells) for g in self.queue)
            raise KVBenchError(f"ray: no worker left to run the last {left} cell(s); every record so far is "
                               "written: start the cluster again and rerun the same command to resume")

    def stop(self) -> None:
        """Kill every worker of this sweep (Ctrl-C)."""
        for s in self.slots:
            self.ray.kill(s.actor, no_restart=True)
        self.cluster.pool.clear()

    def _take(self, slot: Slot) -> Group | None:
        """The next group for this worker: a fault's retry goes to another worker where there is one."""
        for g in self.queue:
            if g.avoid != slot.index or len(self.slots) == 1:
                self.queue.remove(g)
                return g
        return None

    def _dispatch(self, slot: Slot) -> None:
        if not slot.pending:
            slot.group = self._take(slot)
            if slot.group is None:
                self.board.worker(slot, "idle")
                return
            slot.pending = deque(slot.group.cells)
        g, cell = slot.group, slot.pending.popleft()
        source = self.sources[g.source]
        slot.cell, slot.since = cell, time.monotonic()
        slot.ref = slot.actor.measure.remote(self.refs[g.source], f"{self.run_id}/{g.name}", g.key,
                                             cell_key(source.suite, cell.method, cell.cell))
        self.board.worker(slot, f"{source.suite} {cell.method} {_short(cell.cell)}" + (" (retry)" if g.retry else ""))

    def _collect(self, slot: Slot) -> None:
        ref, cell, group = slot.ref, slot.cell, slot.group
        slot.ref = slot.cell = None
        try:
            record = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # the worker lives; kvbench's own code raised outside a cell
            cause = getattr(e, "cause", None) or e
            self._write(group, self._fault_record(slot, group, cell, "failed", f"{type(cause).__name__}: "
                                                  f"{_first_line(cause)}"), slot)
            return
        except self.ray.exceptions.RayError as e:  # the worker process died
            oom = isinstance(e, self.ray.exceptions.OutOfMemoryError) or "out of memory" in str(e).lower()
            self._fault(slot, group, cell, "oom" if oom else "failed",
                        f"worker died while measuring this cell: {type(e).__name__}: {_first_line(e)}")
            return
        slot.env = record["env"]
        slot.done += 1
        self._write(group, record, slot)

    def _check_timeouts(self) -> None:
        if self.cell_timeout is None:
            return
        now = time.monotonic()
        for s in list(self.slots):  # a slot whose worker cannot be started again leaves the list
            if s.ref is not None and now - s.since > self.cell_timeout:
                group, cell = s.group, s.cell
                s.ref = s.cell = None
                self._fault(s, group, cell, "failed", f"timed out: no result after {now - s.since:.0f} s "
                                                      f"(the per-cell timeout is {self.cell_timeout:g} s)")

    def _fault_record(self, slot: Slot, group: Group, cell: Cell, status: str, reason: str) -> dict:
        """The record of a cell whose worker failed it, with that worker's environment."""
        started = time.time() - (time.monotonic() - slot.since)
        family, fraction = method_facts(Cell(cell.method, cell.params, cell.cell, _parsed(cell.method)))
        record = make_record(self.sources[group.source].suite, cell.method, cell.params, cell.cell, status,
                             {} if fraction is None else {BUDGET_FRACTION: fraction}, reason, _iso(started),
                             round(time.monotonic() - slot.since, 3), family=family)
        record["env"] = slot.env
        return record

    def _fault(self, slot: Slot, group: Group, cell: Cell, status: str, reason: str) -> None:
        """A worker died or hung: record its cell, queue a retry (once) and the rest of its group, replace it."""
        again = not group.retry
        reason += ("; retried once on another worker" if again and len(self.slots) > 1 else
                   "; retried once on a fresh worker" if again else "; this was the retry: not retried again")
        self._write(group, self._fault_record(slot, group, cell, status, reason), slot, quiet=True)
        if slot.pending:
            self.queue.appendleft(Group(group.source, group.key, list(slot.pending)))
        if again:
            self.retried += 1
            self.board.grow()
            self.queue.appendleft(Group(group.source, group.key, [cell], retry=True, avoid=slot.index))
        slot.group, slot.pending = None, deque()
        self.board.note(f"[yellow]ray: {escape(slot.label())}: {status}: {escape(cell.method)} "
                        f"{escape(_short(cell.cell))}: {escape(reason)}[/]")
        self._replace(slot)

    def _replace(self, slot: Slot) -> None:
        """A fresh actor in the slot; a slot whose actor cannot start again (its node is gone) is dropped."""
        self.ray.kill(slot.actor, no_restart=True)
        slot.actor = self.cluster.pool[slot.index] = self.actor_class.remote(slot.index)
        self.board.worker(slot, "restarting")
        try:
            slot.env = self.ray.get(slot.actor.where.remote(), timeout=self.cluster.start_timeout_s)
        except (self.ray.exceptions.RayError, self.ray.exceptions.GetTimeoutError) as e:
            self.board.note(f"[red]ray: {escape(slot.label())} could not be started again ({type(e).__name__}); "
                            "the sweep goes on without it[/]")
            self.ray.kill(slot.actor, no_restart=True)
            self.cluster.pool.pop(slot.index)
            self.slots.remove(slot)
            self.board.worker(slot, "lost")
            return
        self.board.worker(slot, "idle")

    def _write(self, group: Group, record: dict, slot: Slot, quiet: bool = False) -> None:
        """The one writer: append to the suite's JSONL file, count, show."""
        self.writers[record["suite"]].append(record)
        self.results[group.source].add(record)
        worker = (record.get("env") or {}).get("worker")
        if worker:
            self.workers[worker["actor_id"]] = worker
        self.board.advance()
        self.board.worker(slot, "")
        if record["status"] in ("failed", "oom") and not quiet:
            self.board.note(f"[yellow]{record['status']}[/]: {escape(record['method'])} "
                            f"{escape(_short(record['cell']))}: {escape(_first_line(record.get('error')))}")


def _parsed(label: str) -> Any:
    """The method a label names, for a record the driver writes itself; None where this kvbench has no such method."""
    from kvbench.registry import parse_method

    try:
        return parse_method(label)
    except Exception:  # noqa: BLE001 - an unknown or plugin method: the record goes without its family
        return None


def _first_line(x: Any) -> str:
    return (str(x).strip().splitlines() or [""])[0][:200]


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _short(cell: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items() if k not in ("model", "shape", "dtype", "device")
                    and v is not None)[:70]


def plan_groups(sources: list[Source], cells: list[list[Cell]], writers: dict[str, RecordWriter], rerun: bool,
                results: list[SweepResult]) -> list[Group]:
    """Cells not finished yet (unless rerun), grouped by source and group key (Source.group_of) in the order the
    suites list them."""
    done = {suite: set() if rerun else w.done() for suite, w in writers.items()}
    groups: dict[tuple[int, str], Group] = {}
    for i, (source, listed) in enumerate(zip(sources, cells)):
        for c in listed:
            if cell_key(source.suite, c.method, c.cell) in done[source.suite]:
                results[i].already_done += 1
            else:
                key = source.group_of(c)
                groups.setdefault((i, key), Group(i, key, [])).cells.append(c)
    return list(groups.values())


def run_sources(sources: Iterable[Source], out, cluster: Cluster, *, rerun: bool = False,
                cell_timeout: float | None = None, show_progress: bool = True) -> tuple[list[SweepResult], list[str]]:
    """Run every source's cells on the cluster (entered), writing `<out>/<suite>.jsonl` and its provenance as a
    serial run does. Returns one SweepResult per source and the errors of sources whose cells could not be listed
    (their suite said why; the others still run). Ctrl-C kills the workers and re-raises; the records stay."""
    ray, sources, out = import_ray(), list(sources), Path(out)
    writers = {s.suite: RecordWriter(out / f"{s.suite}.jsonl") for s in sources}
    results = [SweepResult() for _ in sources]
    with Board(0, show_progress) as board:
        d = Dispatcher(ray, cluster, sources, [], writers, results, board, cell_timeout)
        try:
            d.start()
            listed, options, errors = _list_cells(ray, d, sources)
            groups = plan_groups(sources, listed, writers, rerun, results)
            d.queue.extend(groups)
            board.total = sum(len(g.cells) for g in groups)
            board.progress.update(board.all, total=board.total)
            d.run()
            facts = d.finish()
        except KeyboardInterrupt:
            d.stop()
            console.print(f"[yellow]ray: interrupted; every record so far is in {escape(str(out))}: the same "
                          "command resumes from there[/]")
            raise
    _write_provenance(out, sources, options, facts, cluster, d)
    if d.retried:
        console.print(f"ray: {d.retried} cell(s) retried after a worker fault")
    return results, errors


def _list_cells(ray, d: Dispatcher, sources: list[Source]) -> tuple[list[list[Cell]], list[dict | None], list[str]]:
    """Every source's cells and options, listed on a worker: its device picks the suites' defaults, as it will
    measure them. A source whose suite refuses (a bad option, an unknown model) is an error; the others go on."""
    refs = [d.slots[0].actor.list_cells.remote(ref) for ref in d.refs]
    listed, options, errors = [], [], []
    for source, ref in zip(sources, refs):
        try:
            cells, opts = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the suite's own error, said as it is
            cause = getattr(e, "cause", None) or e
            errors.append(f"{source.suite}: {type(cause).__name__}: {_first_line(cause)}")
            console.print(f"[red]ray: {escape(errors[-1])}[/]")
            cells, opts = [], None
        listed.append(cells)
        options.append(opts)
    return listed, options, errors


def _write_provenance(out, sources: list[Source], options: list[dict | None], facts: dict[str, list[dict]],
                      cluster: Cluster, d: Dispatcher) -> None:
    """`<suite>.provenance.json` as a serial run writes it, plus the cluster, every worker that made a record, and
    each worker's session facts (e.g. the copy bandwidth the kernel suite measured on its GPU)."""
    from kvbench.telemetry import write_provenance

    workers = sorted(d.workers.values(), key=lambda w: (w["node_ip"], w["slot"], w["pid"]))
    for source, opts in zip(sources, options):
        if opts is not None:
            place = {**cluster.describe(), "retried": d.retried, "workers_used": workers,
                     "session_facts": facts.get(repr(source), [])}
            write_provenance(out, source.suite, opts, ray=place)


_SESSIONS: dict[str, Any] = {}  # in a worker: the session (model load, budget, ...) of the source it measures now
_FACTS: dict[str, dict] = {}  # in a worker: each source's session facts for the provenance, until the driver asks


@dataclass(frozen=True)
class SuiteSource:
    """A declared suite (kvbench/suite.py) on one model: planned, listed and started where it is asked, so a
    worker's own device picks the suite's defaults, as it does for a serial run there."""

    suite: str
    methods: tuple[str, ...]
    model: str
    quick: bool
    extra: tuple[tuple[str, Any], ...] = ()  # the suite's options, as (name, value) pairs

    def plan(self):
        from kvbench.suite import get_suite

        return get_suite(self.suite).plan(list(self.methods), model=self.model, quick=self.quick, **dict(self.extra))

    def cells(self) -> list[Cell]:
        from kvbench.suite import get_suite

        return get_suite(self.suite).cells(self.plan())

    def open(self, method: str) -> Callable[[Cell], dict]:
        """The suite's runner; its session is started once per worker for all the groups of this source it gets."""
        from kvbench.suite import get_suite

        suite, key = get_suite(self.suite), repr(self)
        if key not in _SESSIONS:
            _SESSIONS.clear()  # the previous source's model goes before this one's loads
            free_memory()
            _SESSIONS[key] = suite.start(self.plan())
            _FACTS[key] = suite.provenance(_SESSIONS[key]) if suite.provenance is not None else {}
        return suite.runner(_SESSIONS[key])

    def options(self) -> dict[str, Any]:
        """What a serial run's provenance records of its options (as planned here)."""
        import dataclasses

        plan = self.plan()
        return {"methods": [m.label() for m in plan.methods], "model": plan.model, "quick": plan.quick,
                **dataclasses.asdict(plan.options), "device": plan.device}

    def show(self, out, records: list[dict]) -> None:
        """The suite's table of these records, as a serial run prints it."""
        from kvbench.suite import get_suite

        cells = [Cell(r["method"], r["params"], r["cell"]) for r in records]
        get_suite(self.suite).print_table(out / f"{self.suite}.jsonl", cells)

    def group_of(self, cell: Cell) -> str:
        from kvbench.suite import get_suite

        group_key = get_suite(self.suite).group_key
        return cell.method if group_key is None else group_key(cell)


def run_on_ray(sources: list[Source], out, *, address: str | None = None, workers: int | None = None,
               cell_timeout: float | None = None, rerun: bool = False) -> list[str]:
    """The `--ray` of `kvbench compare` and `kvbench run`: the sources in one sweep over a cluster (so suites run side
    by side), then each one's table and summary as a serial run prints them. Returns the errors."""
    with Cluster(address, workers) as cluster:
        results, errors = run_sources(sources, out, cluster, rerun=rerun, cell_timeout=cell_timeout)
    for source, result in zip(sources, results):
        if result.records:
            source.show(Path(out), result.records)
        console.print(f"{source.suite} on {escape(source.model)} (ray): {result.summary()}")
    return errors


def run_plans_on_ray(plans, out, **ray_options) -> list[str]:
    """`kvbench compare --ray`: every available suite x model of a comparison's plans."""
    sources = [SuiteSource(p.name, tuple(p.methods), model, p.quick, tuple(sorted(p.options.items())))
               for p in plans if p.available for model in p.models]
    return run_on_ray(sources, out, **ray_options)


def run_suite_on_ray(suite, methods: list[str] | None, out, *, model: str, quick: bool, rerun: bool,
                     on_ray: dict, **options) -> None:
    """`kvbench run SUITE --ray`: one suite's cells over the cluster."""
    given = tuple(sorted((k, v) for k, v in options.items() if v is not None))
    source = SuiteSource(suite.name, tuple(methods or suite.default_methods(quick)), model, quick, given)
    source.plan()  # a bad option or method fails here, before a cluster starts
    errors = run_on_ray([source], out, rerun=rerun, **on_ray)
    if errors:
        raise KVBenchError(" | ".join(errors))


def cli_options() -> list[tuple[str, Any, Any]]:
    """The `--ray` options of the commands that run cells: (name, annotation, typer.Option)."""
    import typer

    return [
        ("ray", bool, typer.Option(False, "--ray", help="Spread the cells over a Ray cluster: a local one over this "
                                   "machine's GPUs (or CPU cores), or --ray-address's (README: Run on a cluster).")),
        ("ray_address", Optional[str], typer.Option(None, "--ray-address", help="Join the Ray cluster whose head "
                                                    "node is at HOST:PORT (implies --ray).")),
        ("workers", Optional[int], typer.Option(None, "--workers", min=1, help="With --ray: at most this many workers "
                                                "(default: one per GPU, else one per CPU core).")),
        ("cell_timeout", float, typer.Option(3600.0, "--cell-timeout", min=1, help="With --ray: a cell running longer "
                                             "(seconds) fails its worker, which is replaced; the cell is retried "
                                             "once.")),
    ]


def take_cli_options(kw: dict[str, Any]) -> dict[str, Any] | None:
    """Pop the `--ray` options from a command's arguments: run_on_ray's options, or None for a serial run."""
    ray, address = kw.pop("ray"), kw.pop("ray_address")
    options = {"address": address, "workers": kw.pop("workers"), "cell_timeout": kw.pop("cell_timeout")}
    return options if ray or address else None

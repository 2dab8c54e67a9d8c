"""Where independent units of work run: in this process, in N local processes, or as Ray tasks.

A compile has three kinds of unit that do not depend on each other: the fit of one weight (its
factorization, or the full decomposition the planner reads its error curve from), the statistics
of one calibration shard, and one of the planner's sensitivity trials. Each is a :class:`Task`: a
module-level function and its arguments, named by the layer or shard it is about. A
:class:`Runner` runs a list of tasks and returns their results **in the order of the list**, so
whatever runs them, and in whatever order they finish, the caller combines them in one fixed
order and the output file is byte-identical for every ``--workers N`` and under ``--ray``.

Every task runs with one BLAS thread, in this process too: LAPACK's SVD, eigh and Cholesky give
different low bits for different thread counts (matrix products do not), so a fixed thread count
per unit is what makes the bytes independent of N and of the machine's core count. Parallelism
comes from running units side by side instead.

Runners:

- :class:`InProcess` (``--workers 1``, the default): one after another, here.
- :class:`Processes` (``--workers N``): a pool of N spawned processes (``spawn``: a forked copy of
  a process that holds ONNX Runtime's threads is not safe). Arguments travel pickled (weights as
  arrays, or as a reference to the file they are mapped from); results come back the same way.
- :class:`RayRunner` (``--ray [ADDRESS]``): Ray tasks on an existing cluster (``auto`` or an
  address) or a local one started for the run (no address). Arguments travel through Ray's
  object store; every node needs the same lrcompile installed, and for a weight passed by
  reference, the model's folder at the same path. Ray is imported only here, only when asked for.

A task that raises is retried once (a crashed worker too); when it fails again the runner raises
:class:`TaskFailed`, whose message names the unit (the layer) and the cause, and whose remote
traceback the CLI saves with the details of an internal error. An interrupt cancels what has not
run and stops the workers; the compile's output is written atomically at the end, so nothing
partial is left.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from .errors import LrcError

log = logging.getLogger(__name__)

#: A failed task is run this many more times before the runner gives up on it.
RETRIES = 1
#: ``--ray`` without an address: a local Ray cluster started for this run.
LOCAL = "local"


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args)``; ``fn`` is a module-level function (it travels by name)."""

    label: str  # what the unit is about, for progress and errors (a layer, a shard)
    fn: Callable
    args: tuple = ()


class TaskFailed(RuntimeError):
    """A unit of work failed on every try; the message names the unit (a layer, a shard)."""

    def __init__(self, what: str, label: str, tries: int, cause: BaseException) -> None:
        msg = " ".join(str(cause).split()) or type(cause).__name__
        super().__init__(f"{what} of {label} failed {tries} times; last: {type(cause).__name__}: {msg[:300]}")
        self.label = label


def one_thread():
    """A context in which numpy's BLAS / LAPACK use one thread (``threadpoolctl``)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _call(fn: Callable, args: tuple) -> tuple[Any, float]:
    """Run one task with one BLAS thread; returns ``(result, seconds)``."""
    t0 = time.perf_counter()
    with one_thread():
        out = fn(*args)
    return out, time.perf_counter() - t0


def _worker_init() -> None:
    """A pool process: interrupts are the parent's to handle (it stops the pool)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Runner:
    """Runs tasks; see the module docstring. Subclasses implement ``_stream``."""

    workers: int = 1
    name: str = "in-process"

    def map(self, tasks: Sequence[Task], *, what: str, progress: bool = False) -> list:
        """The results of ``tasks``, in their order. ``what`` names the kind of unit (``fit``,
        ``calibration``, ``trial``) for progress and errors."""
        return [r for r, _ in self.map_timed(tasks, what=what, progress=progress)]

    def map_timed(self, tasks: Sequence[Task], *, what: str, progress: bool = False) -> list[tuple[Any, float]]:
        """Like :meth:`map`, each result with the seconds its task took where it ran."""
        tasks = list(tasks)
        return list(self._bar(tasks, what, progress, len(tasks), window=max(1, len(tasks))))

    def imap(self, tasks: Iterable[Task], *, what: str, progress: bool = False, window: int | None = None,
             timed: bool = False) -> Iterator[Any]:
        """The results of ``tasks`` in their order, as they can be given: the tasks are taken from
        the iterable only as room frees up, at most ``window`` (default two per worker) out at a
        time counting finished ones not yet given, so building the next tasks here overlaps the
        work on the earlier ones there and what is held stays bounded. ``timed``: each result with
        the seconds its task took where it ran."""
        for r, seconds in self._bar(tasks, what, progress, None, window=window or 2 * max(1, self.workers)):
            yield (r, seconds) if timed else r

    def _bar(self, tasks, what, progress, total, *, window):
        bar = tqdm(total=total, desc=f"{what} ({self.describe()})", unit="task",
                   disable=None if progress else True, leave=False)
        try:
            for r in self._stream(iter(tasks), what, window):
                bar.update()
                yield r
        finally:
            bar.close()

    def describe(self) -> str:
        return self.name

    def info(self) -> dict:
        """For the report: what ran the units."""
        return {"runner": self.name, "workers": self.workers}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stream(self, tasks: Iterator[Task], what: str, window: int) -> Iterator[tuple[Any, float]]:
        raise NotImplementedError


class InProcess(Runner):
    """One task after another in this process (``--workers 1``). A task's exception propagates
    as it is: there is no worker to lose, and a deterministic failure would fail again."""

    def _stream(self, tasks, what, window):
        for t in tasks:
            yield _call(t.fn, t.args)


class _Ordered:
    """The bookkeeping of a windowed, ordered stream of remote tasks: which are out, which came
    back early, how often each was tried."""

    def __init__(self, tasks: Iterator[Task], window: int) -> None:
        self.tasks, self.window = tasks, window
        self.sent: dict[int, Task] = {}
        self.done: dict[int, tuple[Any, float]] = {}
        self.tries: dict[int, int] = {}
        self.next_in = self.next_out = 0
        self.exhausted = False

    def take(self) -> Iterator[tuple[int, Task]]:
        """New tasks to send, while there is room."""
        while not self.exhausted and len(self.sent) + len(self.done) < self.window:
            t = next(self.tasks, None)
            if t is None:
                self.exhausted = True
                return
            i, self.next_in = self.next_in, self.next_in + 1
            self.sent[i] = t
            yield i, t

    def ready(self) -> Iterator[tuple[Any, float]]:
        """Results that can be given now, in order."""
        while self.next_out in self.done:
            yield self.done.pop(self.next_out)
            self.next_out += 1

    def finished(self) -> bool:
        return self.exhausted and not self.sent and not self.done


class Processes(Runner):
    """A pool of ``workers`` spawned processes (``--workers N``), started on first use."""

    name = "processes"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def describe(self) -> str:
        return f"{self.workers} processes"

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init)
        return self._pool

    def _stream(self, tasks, what, window):
        st = _Ordered(tasks, window)
        pending: dict = {}

        def submit(i: int) -> None:
            st.tries[i] = st.tries.get(i, 0) + 1
            pending[self._start().submit(_call, st.sent[i].fn, st.sent[i].args)] = i

        try:
            while True:
                for i, _ in st.take():
                    submit(i)
                if st.finished():
                    return
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                failed, broken = [], False
                for fut in done:
                    i = pending.pop(fut)
                    try:
                        st.done[i] = fut.result()
                        del st.sent[i]
                    except BrokenProcessPool as e:  # a worker died (killed, out of memory)
                        failed.append((i, RuntimeError(f"its worker process died ({e})")))
                        broken = True
                    except Exception as e:  # noqa: BLE001 - the task's own error, with its remote traceback
                        failed.append((i, e))
                if broken:  # the pool is gone, and the tasks still in it: every one gets a fresh pool
                    failed += [(i, RuntimeError("its worker pool broke")) for i in pending.values()]
                    pending.clear()
                    self._stop(kill=True)
                for i, err in sorted(failed, key=lambda f: f[0]):
                    if st.tries[i] > RETRIES:
                        raise TaskFailed(what, st.sent[i].label, st.tries[i], err) from err
                    log.warning("%s of %s failed (%s: %s); retrying", what, st.sent[i].label, type(err).__name__, err)
                    submit(i)
                yield from st.ready()
        except GeneratorExit:  # the caller stopped reading (zip ends early): drop this stream's tasks only
            for fut in pending:  # the pool may serve an enclosing stream: a trial's fits run inside it
                fut.cancel()
            raise
        except BaseException:
            self._stop(kill=True)
            raise

    def _stop(self, *, kill: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:
            for p in list(getattr(pool, "_processes", {}).values()):  # no public way to stop running tasks
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._stop(kill=False)


class RayRunner(Runner):
    """Ray tasks (``--ray [ADDRESS]``): ``auto`` or an address joins an existing cluster; ``local``
    starts one for this run and stops it after."""

    name = "ray"

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise LrcError("--ray needs Ray: pip install ray (or the extra: pip install -e '.[ray]')") from None
        self.address = address
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                # a cluster on this machine's loopback (a local one, or nodes started on 127.0.0.1):
                # the driver joins it on loopback too, or it waits for a node at its outward address
                loopback = address == LOCAL or address.split(":")[0] in ("127.0.0.1", "localhost")
                local = {"_node_ip_address": "127.0.0.1"} if loopback else {}
                ray.init(address=None if address == LOCAL else address, include_dashboard=False, **local,
                         log_to_driver=False, logging_level=logging.ERROR,
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            except (ConnectionError, ValueError, RuntimeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise LrcError(f"--ray {address}: cannot connect to a Ray cluster ({first}); start one with "
                               "`ray start --head`, pass its address, or give --ray without an address for a "
                               "local one") from None
            self._started = True
        self._remote = ray.remote(_call).options(max_retries=RETRIES, retry_exceptions=True, num_cpus=1)
        resources = ray.cluster_resources()
        self.workers = int(resources.get("CPU", 1))
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])

    def describe(self) -> str:
        return f"ray, {self.nodes} node{'s' if self.nodes != 1 else ''}, {self.workers} CPUs"

    def info(self) -> dict:
        return {"runner": "ray", "address": self.address, "nodes": self.nodes, "cpus": self.workers}

    def _stream(self, tasks, what, window):
        ray = self._ray
        st = _Ordered(tasks, window)
        refs: dict = {}  # ref -> index
        try:
            while True:
                for i, t in st.take():
                    refs[self._remote.remote(t.fn, t.args)] = i
                if st.finished():
                    return
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    i = refs.pop(ref)
                    try:
                        st.done[i] = ray.get(ref)  # Ray retried it already (max_retries, retry_exceptions)
                    except Exception as e:  # noqa: BLE001 - RayTaskError (with the remote traceback), lost worker
                        cause = getattr(e, "cause", None) or e
                        raise TaskFailed(what, st.sent[i].label, RETRIES + 1, cause) from e
                    del st.sent[i]
                yield from st.ready()
        except GeneratorExit:  # the caller stopped reading: drop this stream's tasks only
            for ref in refs:
                ray.cancel(ref)
            raise
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_runner(workers: int = 1, ray: str | None = None) -> Runner:
    """The runner for ``--workers`` / ``--ray`` (``--ray`` wins: its cluster has the workers)."""
    if ray is not None:
        return RayRunner(ray)
    if workers > 1:
        return Processes(workers)
    return InProcess()


def default_workers() -> int:
    """The processes this machine can run side by side (its CPUs, as this process may use them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


__all__ = ["InProcess", "LOCAL", "Processes", "RETRIES", "RayRunner", "Runner", "Task", "TaskFailed",
           "default_workers", "make_runner", "one_thread"]

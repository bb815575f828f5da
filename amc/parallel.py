"""Where the search's scoring runs: this process, local worker processes, or Ray actors.

A search round walks N policies in the search process (arithmetic); their final scorings,
almost all of an episode's time, go to a backend. Each worker builds its env from the config
once (base model, reward batches, calibration data) and keeps it. Results come back keyed by
episode, so the search records them in episode order whatever order the workers finish in.
Scoring consumes no global RNG state (calibration draws from its own seeded generator), so a
policy's score does not depend on which worker scored it or on what that worker scored before.

A worker that dies, fails or hangs past ``search.worker_timeout`` stops the search with a
``WorkerError``; the round it was scoring is not recorded, so ``--resume`` continues the run.

``run_jobs`` runs independent whole jobs (the benchmark's method x target x seed) on the same
engines: a ``concurrent.futures`` process pool, or Ray tasks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import torch

from amc.config import Config, config_from_dict
from amc.errors import UserError
from amc.factory import Workspace, seed_everything

STARTUP_SECONDS = 300.0  # the least a worker gets to build its env (load the model and data)
Job = tuple[int, list[int]]  # (episode, keep counts)
Result = tuple[float, dict]  # (reward, info), as PruningEnv.evaluate returns them


class WorkerError(UserError):
    """A scoring worker died, failed or hung: the search stops with one line and can be resumed."""


class Backend(Protocol):
    def score(self, jobs: Sequence[Job]) -> dict[int, Result]:
        """Score every job's keep counts; {episode: (reward, info)}."""

    def close(self) -> None:
        """Stop the workers (idempotent)."""


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker when the config does not set them: the cores shared out."""
    return max(1, (cores or available_cores()) // workers)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("backend ray needs Ray: pip install -e '.[ray]'", field="search.backend") from None
    return ray


def join_ray(ray, address: str | None) -> None:
    """Join the cluster at ``address`` (None: RAY_ADDRESS, else a new local Ray)."""
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
        raise UserError(f"cannot start or join Ray at {where}: {_line(exc)}", field="ray.address") from None


def hold_threads(threads: int | None) -> int:
    """Set this process's torch threads (None: leave them); the previous count, to restore."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    return previous


class InProcess:
    """``workers: 1`` on the local backend: the env's own ``evaluate``, exactly the serial search."""

    def __init__(self, env, threads: int | None = None):
        self.env = env
        self.previous_threads = hold_threads(threads)

    def score(self, jobs: Sequence[Job]) -> dict[int, Result]:
        return {episode: self.env.evaluate(keep) for episode, keep in jobs}

    def close(self) -> None:
        torch.set_num_threads(self.previous_threads)


class ScoringWorker:
    """What a worker holds: the env built once from the config, scoring keep counts with it."""

    def __init__(self, raw: dict, source: str, threads: int, gpu: int | None = None, cwd: str | None = None):
        if cwd and os.path.isdir(cwd):  # a Ray actor starts elsewhere: relative config paths are the driver's
            os.chdir(cwd)
        torch.set_num_threads(threads)
        if gpu is not None:
            torch.cuda.set_device(gpu)
        cfg = config_from_dict(raw, source)
        seed_everything(cfg.seed)  # as the search process does before building its env
        self.env = Workspace(cfg).env()

    def ready(self) -> int:
        return os.getpid()

    def score(self, keep: list[int]) -> Result:
        return self.env.evaluate(keep)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, UserError) else "".join(traceback.format_exception_only(exc)).strip()


def _serve(pipe: Connection, raw: dict, source: str, threads: int, gpu: int | None) -> None:
    """A local worker's life: build the env, then score what the search sends until it says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the search process's to handle
    try:
        worker = ScoringWorker(raw, source, threads, gpu)
        pipe.send(("ready", worker.ready()))
        while (job := pipe.recv()) is not None:
            episode, keep = job
            pipe.send(("done", (episode, worker.score(keep))))
    except (EOFError, BrokenPipeError):  # the search process is gone
        return
    except Exception as exc:
        if not isinstance(exc, UserError):  # a bug: its traceback, on the worker's stderr
            traceback.print_exc()
        try:
            pipe.send(("failed", _describe(exc)))
        except OSError:
            pass


def worker_context() -> multiprocessing.context.BaseContext:
    """How local workers start: never by forking the search process (its threads, its CUDA state).

    A fork server (a fresh process) imports torch and amc once, then forks each worker from
    itself, so a worker does not import them again. Where there is none (Windows): spawn.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class LocalWorkers:
    """N spawned processes on this machine, one pipe each; a round sends job i to worker i.

    The search process keeps one torch thread meanwhile: the cores are the workers', and its own
    work (the walk, the agent's small networks) runs faster on one thread than on contended ones.
    """

    def __init__(self, cfg: Config, workers: int, threads: int, gpus: int = 0, timeout: float = 600.0):
        context = worker_context()
        self.timeout = timeout
        self.processes: list[multiprocessing.Process] = []
        self.pipes: list[Connection] = []
        try:
            for index in range(workers):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=_serve, args=(theirs, cfg.to_dict(), cfg.source, threads, index % gpus if gpus else None),
                    name=f"amc-scoring-{index}", daemon=True)
                process.start()
                theirs.close()
                self.processes.append(process)
                self.pipes.append(ours)
            self._collect(dict.fromkeys(range(workers)), "starting", max(timeout, STARTUP_SECONDS))
        except BaseException:
            self._stop(graceful=False)
            raise
        self.previous_threads = hold_threads(1)

    def score(self, jobs: Sequence[Job]) -> dict[int, Result]:
        if len(jobs) > len(self.processes):
            raise ValueError(f"{len(jobs)} jobs for {len(self.processes)} workers")
        for index, (episode, keep) in enumerate(jobs):
            try:
                self.pipes[index].send((episode, list(keep)))
            except OSError:
                code = self._exitcode(index)
                raise self._fail(index, f"died (exit code {code}) before scoring episode {episode}") from None
        return self._collect({index: episode for index, (episode, _) in enumerate(jobs)}, "scoring episode",
                             self.timeout)

    def _collect(self, waiting: dict[int, int | None], doing: str, timeout: float) -> dict[int, Result]:
        """Wait for every worker in ``waiting`` (index -> episode) to answer; results by episode."""
        results: dict[int, Result] = {}
        deadline = time.monotonic() + timeout
        while waiting:
            handles = [self.pipes[i] for i in waiting] + [self.processes[i].sentinel for i in waiting]
            if not wait(handles, timeout=max(0.0, deadline - time.monotonic())):
                index = next(iter(waiting))
                raise self._fail(index, f"gave no answer within {timeout:g} s (search.worker_timeout) "
                                        f"while {_doing(doing, waiting[index])}")
            for index in list(waiting):
                what = _doing(doing, waiting[index])
                if self.pipes[index].poll():
                    try:
                        kind, payload = self.pipes[index].recv()
                    except EOFError:
                        raise self._fail(index, f"died (exit code {self._exitcode(index)}) while {what}"
                                                f"{_SEE_ABOVE if waiting[index] is None else ''}") from None
                    if kind == "failed":
                        raise self._fail(index, f"failed while {what}: {payload}")
                    if kind == "done":
                        episode, result = payload
                        results[episode] = result
                    del waiting[index]
                elif not self.processes[index].is_alive():
                    raise self._fail(index, f"died (exit code {self.processes[index].exitcode}) while {what}"
                                            f"{_SEE_ABOVE if waiting[index] is None else ''}")
        return results

    def _exitcode(self, index: int) -> int | None:
        self.processes[index].join(timeout=5)
        return self.processes[index].exitcode

    def _fail(self, index: int, problem: str) -> WorkerError:
        pid = self.processes[index].pid
        self._stop(graceful=False)
        return WorkerError(f"scoring worker {index} (pid {pid}) {problem}")

    def _stop(self, graceful: bool) -> None:
        for pipe in self.pipes:
            try:
                if graceful:
                    pipe.send(None)
            except OSError:
                pass
        for process in self.processes:
            if graceful:
                process.join(timeout=2)  # a worker holds nothing to save: one slow to exit is killed
            if process.is_alive():
                process.kill()
            process.join()
        for pipe in self.pipes:
            pipe.close()
        self.processes, self.pipes = [], []

    def close(self) -> None:
        self._stop(graceful=True)
        torch.set_num_threads(self.previous_threads)


_SEE_ABOVE = " (its error is printed above)"


def _doing(doing: str, episode: int | None) -> str:
    return doing if episode is None else f"{doing} {episode}"


class RayActors:
    """N Ray actors, each a ``ScoringWorker``; joins ``ray.address`` / RAY_ADDRESS or starts a local Ray.

    The search process keeps one torch thread meanwhile, as with ``LocalWorkers``.
    """

    def __init__(self, cfg: Config, workers: int, threads: int | None = None, timeout: float = 600.0):
        ray = self.ray = import_ray()
        self.timeout = timeout
        self.previous_threads = hold_threads(1)
        self.actors: list = []
        self.started = not ray.is_initialized()
        try:
            if self.started:
                join_ray(ray, cfg.ray.address)
            resources = ray.cluster_resources()
            threads = threads or split_threads(workers, int(resources.get("CPU", 1)))
            gpus = resources.get("GPU", 0) if cfg.device != "cpu" else 0
            actor = ray.remote(num_cpus=threads, num_gpus=min(1.0, gpus / workers) if gpus else 0)(ScoringWorker)
            self.actors = [actor.remote(cfg.to_dict(), cfg.source, threads, None, os.getcwd()) for _ in range(workers)]
            self._get([a.ready.remote() for a in self.actors], "starting", max(timeout, STARTUP_SECONDS))
        except BaseException:
            self.close()
            raise

    def score(self, jobs: Sequence[Job]) -> dict[int, Result]:
        if len(jobs) > len(self.actors):
            raise ValueError(f"{len(jobs)} jobs for {len(self.actors)} workers")
        refs = [self.actors[index].score.remote(list(keep)) for index, (_, keep) in enumerate(jobs)]
        episodes = [episode for episode, _ in jobs]
        return dict(zip(episodes, self._get(refs, f"scoring episodes {episodes[0]}-{episodes[-1]}", self.timeout)))

    def _get(self, refs: list, doing: str, timeout: float) -> list:
        errors = self.ray.exceptions
        try:
            return self.ray.get(refs, timeout=timeout)
        except errors.GetTimeoutError:
            problem = f"gave no answer within {timeout:g} s (search.worker_timeout) while {doing}"
        except errors.RayActorError as exc:  # killed, or its __init__ raised (then the last line says what)
            problem = f"died while {doing} ({_line(exc, last=getattr(exc, 'actor_init_failed', False))})"
        except errors.RayTaskError as exc:
            cause = exc.cause
            self.close()
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise WorkerError(f"a Ray scoring actor failed while {doing}: {_describe(cause)}") from None
        self.close()
        raise WorkerError(f"a Ray scoring actor {problem}")

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
        torch.set_num_threads(self.previous_threads)


def _line(exc: BaseException, last: bool = False) -> str:
    """One line of an exception's message (many-line Ray errors: the first, or the traceback's last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(exc).__name__


def open_backend(cfg: Config, env, device: torch.device) -> Backend:
    """The backend ``cfg.search`` asks for; ``workers: 1`` on the local backend scores in this process."""
    s = cfg.search
    if s.backend == "ray":
        return RayActors(cfg, s.workers, s.worker_threads, s.worker_timeout)
    if s.workers == 1:
        return InProcess(env, s.worker_threads)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0  # visible GPUs, assigned round-robin
    return LocalWorkers(cfg, s.workers, s.worker_threads or split_threads(s.workers), gpus, s.worker_timeout)


def _run(fn: Callable, threads: int, cwd: str | None, *args: Any) -> Any:
    """A job in a worker: the driver's directory (Ray starts tasks elsewhere), its share of the cores."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    torch.set_num_threads(threads)
    return fn(*args)


def run_jobs(fn: Callable, jobs: Sequence[tuple], backend: str = "local", workers: int = 1,
             threads: int | None = None, ray_address: str | None = None) -> Iterator[Any]:
    """``fn(*job)`` for every job, on ``workers`` local processes or Ray tasks; results as they finish.

    ``fn`` must be importable (a module-level function) for the local pool; one local worker runs
    the jobs in this process, in order, as a serial loop would.
    """
    if backend == "ray":
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            join_ray(ray, ray_address)
        pending: list = []
        try:
            threads = threads or split_threads(workers, int(ray.cluster_resources().get("CPU", 1)))
            task = ray.remote(num_cpus=threads)(_run)
            pending = [task.remote(fn, threads, os.getcwd(), *job) for job in jobs]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            for ref in pending:
                ray.cancel(ref)
            if started:
                ray.shutdown()
        return
    if workers == 1:
        for job in jobs:
            yield fn(*job)
        return
    threads = threads or split_threads(workers)
    with ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
        for future in as_completed([pool.submit(_run, fn, threads, None, *job) for job in jobs]):
            yield future.result()

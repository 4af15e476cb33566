"""A small dependency-ordered task runner with completion markers: what makes ``make repro`` resumable.

A task is a name, the names it depends on, and an action (a Python callable that may start subprocesses). Up to
``jobs`` tasks run at once, each in a thread (the threads mostly wait on subprocesses). A task that succeeds writes
``state/<name>.json`` (its wall time) last; on the next start every task with a marker is skipped and a task cut
short runs again (training runs resume from their own checkpoints, exports and evaluations write atomically).
A failure stops scheduling new tasks, lets running ones finish, and raises ``TaskFailed`` naming the task and its
log.

Why not a workflow engine (snakemake, luigi, make): none is among the project's dependencies, and what is needed —
a DAG, parallel subprocesses, markers, one log per task — is this file.

``python -m MODULE`` tasks (``Runner.python``) start as forks of one server process that has already imported
torch, transformers, DeepSpeed and the project's entry points (``multiprocessing``'s forkserver with
``PRELOAD``): a fresh interpreter spends 7-9 CPU seconds importing them, which over the ~25 processes of one seed was
a tenth of the work. Each fork runs the module exactly as ``python -m`` would (``runpy``, ``sys.argv``, its own log
as stdout/stderr, the same environment and working directory) and its exit status is the module's. The server is
forked before any model, thread pool or CUDA context exists (DeepSpeed is preloaded only with
``DS_ACCELERATOR=cpu``, so nothing touches CUDA in it); ``KD_REPRO_FORKSERVER=0`` turns it off (plain subprocesses).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import multiprocessing
import os
import runpy
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("kd_pipeline.repro")
ROOT = Path(__file__).resolve().parents[2]
# What the tasks' entry points import at start-up (not the entry points themselves: `python -m` runs a module that
# nothing has imported yet); DeepSpeed's importers only with DS_ACCELERATOR=cpu (see the module doc).
PRELOAD = ("torch", "transformers", "kd_pipeline.models", "kd_pipeline.eval.generate", "kd_pipeline.eval.agreement",
           "kd_pipeline.eval.likelihood", "kd_pipeline.eval.captioning", "kd_pipeline.eval.efficiency",
           "kd_pipeline.checkpoint", "data_prep.synth", "data_prep.shard")
PRELOAD_CPU = ("deepspeed", "kd_pipeline.engine.build", "kd_pipeline.recipes.supervised", "kd_pipeline.recipes.minillm")
TASK_ENVIRONMENT = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_server_lock = threading.Lock()
_server_context = None


def _forkserver(env: dict[str, str]):
    """The preloaded fork server's context, started once per runner process with the tasks' environment (read at
    import time by torch, transformers and DeepSpeed), or None where it is off or unavailable."""
    global _server_context
    with _server_lock:
        if _server_context is None:
            if os.environ.get("KD_REPRO_FORKSERVER", "1") == "0" or \
                    "forkserver" not in multiprocessing.get_all_start_methods():
                _server_context = False
            else:
                os.environ.update(env)  # the server inherits this process's environment when it starts
                context = multiprocessing.get_context("forkserver")
                preload = [*PRELOAD, *(PRELOAD_CPU if env.get("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR"))
                                       == "cpu" else ())]
                context.set_forkserver_preload(preload)
                _server_context = context
        return _server_context or None


def _run_module(module: str, arguments: list[str], log_path: str, env: dict[str, str], cwd: str) -> None:
    """In the fork: what ``python -m module arguments`` would do, with stdout and stderr appended to ``log_path``."""
    os.chdir(cwd)
    os.environ.update(env)
    descriptor = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    # multiprocessing makes the server's start method this process's default: give the module the interpreter's own
    # (its DataLoader workers fork from it, as under `python -m`).
    multiprocessing.set_start_method(None, force=True)
    spec = importlib.util.find_spec(module)
    target = f"{module}.__main__" if spec is not None and spec.submodule_search_locations else module
    sys.argv = [module, *arguments]
    try:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # the fork ends in os._exit, which would skip them; `python -m` runs them


class TaskFailed(RuntimeError):
    """A task's command failed; the message names the task and its log."""


@dataclass
class Task:
    name: str
    action: Callable[["Task"], None]
    deps: tuple[str, ...] = ()
    log_path: Path | None = None
    group: str = ""  # e.g. "seed0" (timings are summed per group)


@dataclass
class Runner:
    state_dir: Path
    log_dir: Path
    jobs: int = 2
    env: dict[str, str] = field(default_factory=dict)

    def run_command(self, task: Task, command: Sequence[str]) -> None:
        """Run ``command`` from the repository root, appending its output to the task's log; raise on failure."""
        environment = {**os.environ, **TASK_ENVIRONMENT, **self.env}
        self._log_command(task, command)
        with open(task.log_path, "a") as handle:
            result = subprocess.run([str(part) for part in command], cwd=ROOT, env=environment, stdout=handle,
                                    stderr=subprocess.STDOUT)
        self._check(task, result.returncode)

    def python(self, task: Task, *arguments: str) -> None:
        """``python -m arguments``, forked from the preloaded server when it is on (module doc)."""
        context = _forkserver({**TASK_ENVIRONMENT, **self.env})
        if context is None:
            self.run_command(task, [sys.executable, "-m", *arguments])
            return
        self._log_command(task, [sys.executable, "-m", *arguments])
        child = context.Process(target=_run_module, args=(arguments[0], [str(a) for a in arguments[1:]],
                                                         str(task.log_path), {**TASK_ENVIRONMENT, **self.env},
                                                         str(ROOT)), daemon=False)
        child.start()
        child.join()
        self._check(task, child.exitcode)

    @staticmethod
    def _log_command(task: Task, command: Sequence[str]) -> None:
        task.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(task.log_path, "a") as handle:
            handle.write(f"$ {' '.join(str(part) for part in command)}\n")

    @staticmethod
    def _check(task: Task, returncode: int | None) -> None:
        if returncode != 0:
            tail = task.log_path.read_text(errors="replace").splitlines()[-15:]
            raise TaskFailed(f"task {task.name} failed (exit {returncode}); last lines of {task.log_path}:\n"
                             + "\n".join(tail))

    def marker(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def timings(self) -> dict[str, dict]:
        """{task name: marker contents} of every completed task."""
        return {path.stem: json.loads(path.read_text()) for path in sorted(self.state_dir.glob("*.json"))}

    def run(self, tasks: Sequence[Task], on_done: Callable[[Task], None] | None = None) -> None:
        """Run every task not yet marked complete, respecting dependencies, ``jobs`` at a time; ready tasks start in
        list order (so the first seed's tasks finish first). ``on_done`` is called after each task completes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        by_name = {task.name: task for task in tasks}
        for task in tasks:
            unknown = [dep for dep in task.deps if dep not in by_name]
            if unknown:
                raise ValueError(f"task {task.name} depends on unknown tasks {unknown}")
            task.log_path = task.log_path or self.log_dir / f"{task.name}.log"
        done = {task.name for task in tasks if self.marker(task.name).is_file()}
        pending = [task for task in tasks if task.name not in done]
        if done:
            log.info("%d of %d tasks already complete (markers in %s): skipped", len(done), len(tasks),
                     self.state_dir)
        running: dict[Future, Task] = {}
        failure: TaskFailed | None = None
        lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=self.jobs) as pool, \
                tqdm(total=len(tasks), initial=len(done), unit="task", desc="repro") as progress:
            while pending or running:
                ready = [task for task in pending if all(dep in done for dep in task.deps)] if failure is None else []
                for task in ready[: self.jobs - len(running)]:
                    pending.remove(task)
                    running[pool.submit(self._timed, task)] = task
                    progress.set_postfix_str(", ".join(sorted(t.name for t in running.values()))[-60:])
                if not running:
                    if failure is None and pending:
                        raise ValueError(f"tasks that can never start (a dependency cycle?): "
                                         f"{[task.name for task in pending]}")
                    break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    try:
                        future.result()
                    except TaskFailed as error:
                        failure = failure or error
                        log.error("%s", error)
                        continue
                    with lock:
                        done.add(task.name)
                    progress.update(1)
                    if on_done is not None:
                        on_done(task)
        if failure is not None:
            raise failure

    def _timed(self, task: Task) -> None:
        log.info("start %s", task.name)
        start = time.perf_counter()
        try:
            task.action(task)
        except TaskFailed:
            raise
        except Exception as error:  # noqa: BLE001 - reported with the task's name, then the run stops
            raise TaskFailed(f"task {task.name} failed: {type(error).__name__}: {error}") from error
        seconds = time.perf_counter() - start
        temporary = self.marker(task.name).with_suffix(".tmp")
        temporary.write_text(json.dumps({"seconds": seconds, "group": task.group,
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        os.replace(temporary, self.marker(task.name))
        log.info("done %s in %.0f s", task.name, seconds)

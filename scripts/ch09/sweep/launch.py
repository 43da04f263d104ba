"""Ray as the sweep engine: one Ray task per run, which runs the run's ``train`` and ``eval`` commands.

| piece              | what it does                                                                        |
|--------------------|-------------------------------------------------------------------------------------|
| ``connect``        | a local instance on loopback, or an existing cluster (``auto``, host:port,          |
|                    | ``ray://host:port``) after a short reachability check                               |
| ``check_placement``| refuses a --gpus-per-run / --cpus-per-run that no node can hold, and an artifact    |
|                    | root or repository a remote node cannot see                                          |
| ``StatusBoard``    | a Ray actor: every run's row (state, steps, retries), and the stop flag of Ctrl-C   |
| ``execute_run``    | the Ray task of one run: train (resumed if a checkpoint exists), then eval           |
| ``run_sweep``      | submits the runs, redraws the table, then aggregate and the figure                   |

Resources follow Ray Tune's conventions: each run reserves ``num_cpus=--cpus-per-run`` and
``num_gpus=--gpus-per-run``; a fraction shares a card (0.33: three seeds on one GPU; Ray sets
CUDA_VISIBLE_DEVICES for the task and the train process inherits it). Retries follow Tune's
``FailureConfig(max_failures)``: a run whose process dies (SIGKILL, the OOM killer) is retried up to
``--max-retries`` times by its task, and a task whose Ray worker or node dies by Ray (``max_retries``); a retry
starts with ``--resume`` because each attempt looks at the run's checkpoint before it builds the command line.

Why the train process is a subprocess and not a function call: the sweep then runs exactly the command a
reader types, with the train script's own signal handling (SIGTERM saves a checkpoint) and its own render
workers, and a crash of one run (MuJoCo, EGL, CUDA) cannot take the Ray worker down with it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from ch09.errors import USER_ERROR_EXIT, UserError
from ch09.run.artifacts import RunPaths
from ch09.sweep.plan import (
    FIGURE_SCRIPT,
    TRAIN_SCRIPT,
    Run,
    aggregate_args,
    disk_state,
    display,
    eval_args,
    figure_args,
    host_port,
    read_json,
    shown_path,
    train_args,
)
from ch09.sweep.progress import ProgressView, RunStatus, TensorBoardProgress

CONNECT_TIMEOUT_S = 5.0
"""How long a cluster address may take to accept a TCP connection before the sweep says it does not answer."""
INIT_TIMEOUT_S = 30.0
"""How long ray.init may take to join a cluster whose port answers (a port that is not Ray's makes it hang)."""
PROBE_TIMEOUT_S = 120.0
"""How long the per-node check of a remote cluster (artifact root and repository visible) may take."""
POLL_S = 2.0
"""How often a run's task reads its TensorBoard folder and asks the board whether to stop."""
REFRESH_S = 1.0
"""How often the driver redraws the table and rewrites the status JSON."""
RESUME_HINT = "--resume"
"""A train error that tells the user to continue with --resume (a hung render worker) is worth a retry."""
LOG_HEADER = "# attempt "
"""Start of the line written to a run's log before each command (then the attempt, node, time, command)."""
PR_SET_PDEATHSIG = 1
"""prctl option: the signal a process receives when the thread that started it dies (Linux)."""
LAUNCH_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit(143)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
"""Runs the train command with SIGTERM as its parent-death signal, then exec's it (same pid, same argv):
if the Ray worker supervising a run dies (killed by Ray's OOM monitor, `ray stop`, a killed driver), the
train process saves a checkpoint and exits instead of training on unsupervised next to its own retry."""


class RunCrashed(Exception):
    """A run's process died (or failed in a way a retry can fix): ``execute_run`` makes its next attempt."""


# ---------------------------------------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    address: str
    """What the user passed: local, auto, host:port or ray://host:port."""
    dashboard: str | None
    nodes: int
    cpus: float
    gpus: float


def check_reachable(address: str) -> None:
    """A TCP connection to the address within CONNECT_TIMEOUT_S, so a wrong address fails in seconds."""
    host, port = host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(f"The Ray cluster at {address} did not answer within {CONNECT_TIMEOUT_S:g} s "
                        f"({exc.strerror or type(exc).__name__}); start it with `ray start --head` there, or check "
                        "the address (host:6379 for a cluster node, ray://host:10001 for Ray Client).") from None


@contextmanager
def exit_after(seconds: float, message: str) -> Iterator[None]:
    """Print ``error: message`` and exit 2 if the block takes longer than ``seconds``.

    ray.init blocks inside Ray's C++ client while it retries a GCS that never answers; no Python
    exception can interrupt it, so a watchdog thread ends the process (nothing was started yet)."""
    def give_up() -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(USER_ERROR_EXIT)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


RAY_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def connect(address: str, num_cpus: int | None) -> Cluster:
    """``ray.init`` for a local instance (on loopback only) or an existing cluster; scripts/ reaches the workers."""
    pythonpath = os.pathsep.join(p for p in (str(TRAIN_SCRIPT.parent), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address == "local":
            # Without this, a local instance binds to the machine's network address; a sweep on one machine
            # has no reason to listen beyond loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            # Ray says on every start that it turned token authentication on, as it does by default: nothing for
            # the reader to do on an instance of their own (the token stays under the home folder).
            logging.getLogger(RAY_TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)
            # address="local": always a new instance, never one that RAY_ADDRESS or a `ray start` points to.
            context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=None, runtime_env=runtime_env,
                               **quiet)
        else:
            if address != "auto":
                check_reachable(address)
            if address.startswith("ray://"):
                quiet = {}  # Ray Client would pass these on to the cluster's own ray.init
            with exit_after(INIT_TIMEOUT_S, f"Ray did not connect to {address} within {INIT_TIMEOUT_S:g} s although "
                            "the port answers; check that it is a Ray head (host:6379, or ray://host:10001 for Ray "
                            "Client) running Ray 2.60.0."), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Ray Client's multi-line hint; our sentence says it
                context = ray.init(address=address, runtime_env=runtime_env, **quiet)
    except ConnectionError as exc:
        if address == "auto":
            raise UserError("--address auto found no running Ray cluster on this machine; start one with "
                            "`ray start --head`, or pass its address (host:port or ray://host:10001).") from None
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else " and, for a cluster with Ray's default token "
                "authentication, `export RAY_AUTH_MODE=token` with its token in ~/.ray/auth_token")
        raise UserError(f"Ray could not connect to {address} ({str(exc).splitlines()[0]}); check the address, "
                        f"that the cluster runs Ray 2.60.0{hint}.") from None
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    resources = ray.cluster_resources()
    dashboard = getattr(context, "dashboard_url", None) or None
    return Cluster(address, dashboard, len(nodes), resources.get("CPU", 0.0), resources.get("GPU", 0.0))


def dashboard_line(cluster: Cluster) -> str:
    if cluster.dashboard:
        url = cluster.dashboard if "://" in cluster.dashboard else f"http://{cluster.dashboard}"
        return f"[sweep] Ray dashboard: {url}"
    return ('[sweep] Ray dashboard: none (the core `ray` package has no dashboard; '
            '`pip install "ray[default]==2.60.0"` adds one)')


def check_placement(cpus_per_run: float, gpus_per_run: float, root: Path, remote: bool) -> None:
    """Refuse what no node can hold now, and (on a remote cluster) an artifact root a node cannot see."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    max_cpus = max((node["Resources"].get("CPU", 0.0) for node in nodes), default=0.0)
    max_gpus = max((node["Resources"].get("GPU", 0.0) for node in nodes), default=0.0)
    if gpus_per_run > 0 and max_gpus == 0:
        raise UserError(f"--gpus-per-run {gpus_per_run:g} cannot be placed: the Ray cluster has no GPU; use "
                        "--gpus-per-run 0 to train on CPUs (pixel runs need a GPU to finish in days).")
    if gpus_per_run > max_gpus:
        raise UserError(f"--gpus-per-run {gpus_per_run:g} cannot be placed: no node has more than {max_gpus:g} "
                        "GPU(s); ask for at most that, or a fraction to share one.")
    if cpus_per_run > max_cpus:
        raise UserError(f"--cpus-per-run {cpus_per_run:g} cannot be placed: no node has more than {max_cpus:g} "
                        "CPUs; lower it" + (" to at most that." if remote else ", or raise --num-cpus."))
    if remote:
        check_nodes_see(root, nodes)


def _node_sees(marker: str) -> tuple[str, bool, bool]:
    return socket.gethostname(), Path(marker).is_file(), TRAIN_SCRIPT.is_file()


def check_nodes_see(root: Path, nodes: Sequence[dict[str, Any]]) -> None:
    """One tiny task pinned to each node: does it see a marker file the driver wrote under the artifact root,
    and the repository at the same path? (Every run may land on any node and must find its checkpoints.)"""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = root / f".ch09_sweep_probe_{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by the sweep driver\n")
    except OSError as exc:
        raise UserError(f"--artifact-root {root} is not writable from here ({exc.strerror}); pass a folder on the "
                        "shared filesystem that you can write.") from None
    probe = ray.remote(num_cpus=0)(_node_sees)
    try:
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(str(marker)) for node in nodes]
        try:
            answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"Not every Ray node answered the artifact-root check within {PROBE_TIMEOUT_S:g} s; "
                            "check the cluster (`ray status`) and retry.") from None
    finally:
        marker.unlink(missing_ok=True)
    for host, sees_root, sees_repo in answers:
        if not sees_root:
            raise UserError(f"--artifact-root {root} is not shared: node {host} does not see it; pass a folder on "
                            "a filesystem every node mounts at the same path.")
        if not sees_repo:
            raise UserError(f"Node {host} has no {TRAIN_SCRIPT}; put this repository (and its environment) at the "
                            "same path on every node, e.g. on the shared filesystem.")


# ---------------------------------------------------------------------------------------------------------
# The board: one actor every run reports to, and the stop flag
# ---------------------------------------------------------------------------------------------------------
class StatusBoard:
    """Rows of the table, updated by the runs' tasks; ``stop`` is set by the driver on Ctrl-C."""

    def __init__(self, rows: list[RunStatus]) -> None:
        self.rows = {row.name: row for row in rows}
        self.stop = False

    def begin(self, name: str, node: str) -> tuple[int, bool]:
        row = self.rows[name]
        row.update({"attempts": row.attempts + 1, "node": node, "state": "starting", "error": None})
        return row.attempts, self.stop

    def report(self, name: str, fields: dict[str, Any]) -> bool:
        self.rows[name].update(fields)
        return self.stop

    def request_stop(self) -> None:
        self.stop = True

    def snapshot(self) -> list[RunStatus]:
        return list(self.rows.values())


# ---------------------------------------------------------------------------------------------------------
# The task of one run
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunTask:
    run: Run
    n_episodes: int
    log: Path
    """Where the run's commands write their output (appended across attempts)."""
    gpus: float
    max_retries: int


@dataclass(frozen=True)
class Finished:
    returncode: int
    stopped: bool
    """The sweep asked the process to stop (Ctrl-C)."""
    error_line: str | None
    """The last ``error: ...`` line the command printed (the production scripts' one-sentence errors)."""
    last_line: str


def with_parent_death_signal(argv: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", LAUNCH_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *argv]


def tail_lines(path: Path, max_bytes: int = 20_000) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            return handle.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def terminate(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (the train process and its render workers), as `timeout` does."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # it ended in the meantime
        pass


def supervise(task: RunTask, args: list[str], board: Any, progress: TensorBoardProgress | None,
              attempt: int) -> Finished:
    """Run one command of the run (train or eval) to its end, reporting progress; stop it on the board's flag."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if task.gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a run that reserved no GPU must not use one behind Ray's back
    argv = [sys.executable, str(TRAIN_SCRIPT), *args]
    task.log.parent.mkdir(parents=True, exist_ok=True)
    with open(task.log, "a") as log:
        log.write(f"\n{LOG_HEADER}{attempt} on {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{display(TRAIN_SCRIPT, args)}\n")
        log.flush()
        process = subprocess.Popen(with_parent_death_signal(argv), cwd=TRAIN_SCRIPT.parents[1], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    stopped = False
    try:
        while process.poll() is None:
            try:
                process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                fields = progress.poll() if progress is not None else {}
                if ray.get(board.report.remote(task.run.name, fields)) and not stopped:
                    terminate(process)  # the train script saves a checkpoint, then exits
                    stopped = True
    except KeyboardInterrupt:  # ray.cancel() of this task
        stopped = True
    finally:  # whatever ends this loop, the run must not train on unsupervised
        if process.poll() is None:
            terminate(process)
            process.wait()
    if progress is not None:
        board.report.remote(task.run.name, progress.poll())
    lines = [line for line in tail_lines(task.log) if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith(LOG_HEADER)]
    lines = lines[starts[-1] + 1:] if starts else lines  # this command's output only
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return Finished(process.returncode, stopped, errors[-1] if errors else None, lines[-1] if lines else "")


def failure_sentence(task: RunTask, what: str, finished: Finished, steps: int) -> tuple[str, bool]:
    """(one sentence, whether a retry can fix it) for a command that did not exit 0."""
    code = finished.returncode
    log = shown_path(task.log)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        return (f"{what} was killed by {name} at step {steps:,} (the OOM killer, `kill -9`, or a lost node); "
                f"log: {log}", True)
    if code == USER_ERROR_EXIT and finished.error_line:
        return finished.error_line, RESUME_HINT in finished.error_line
    if code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        return f"{what} was stopped by a signal from outside the sweep at step {steps:,}; log: {log}", True
    return f"{what} exited with code {code} ({finished.last_line.strip()[:160]}); log: {log}", True


def run_phase(task: RunTask, what: str, args: list[str], board: Any, attempt: int) -> dict[str, Any] | None:
    """Run train or eval; None when it exited 0, an outcome when it was stopped or failed for good.

    A failure a retry can fix raises RunCrashed while retries are left: ``execute_run`` then makes a new
    attempt, which finds the run's latest checkpoint and resumes it."""
    run = task.run
    board.report.remote(run.name, {"state": "training" if what == "train" else "evaluating"})
    progress = TensorBoardProgress(run.paths.run_dir) if what == "train" else None
    finished = supervise(task, args, board, progress, attempt)
    if finished.returncode == 0:
        return None
    steps = progress.steps if progress is not None else disk_state(run, task.n_episodes).steps_done
    if finished.stopped:
        board.report.remote(run.name, {"state": "stopped", "steps": disk_state(run, task.n_episodes).steps_done})
        return {"state": "stopped"}
    sentence, retryable = failure_sentence(task, what, finished, steps)
    will_retry = retryable and attempt <= task.max_retries
    board.report.remote(run.name, {"state": "retrying" if will_retry else "failed", "error": sentence})
    if will_retry:
        raise RunCrashed(sentence)
    return {"state": "failed", "error": sentence}


def execute_run(task: RunTask, board: Any) -> dict[str, Any]:
    """The Ray task of one run: attempts until one ends the run (done, stopped, or failed for good).

    The retries of a crashed run happen here rather than through Ray's ``retry_exceptions``, which would print
    each crash's traceback into the sweep's output."""
    while True:
        try:
            return attempt_run(task, board)
        except RunCrashed:
            continue  # run_phase raises it only while --max-retries allows another attempt


def attempt_run(task: RunTask, board: Any) -> dict[str, Any]:
    """One attempt at a run: skip what is done, train (resuming a checkpoint), then evaluate."""
    run = task.run
    attempt, stop = ray.get(board.begin.remote(run.name, socket.gethostname()))
    state = disk_state(run, task.n_episodes)
    board.report.remote(run.name, {"steps": state.steps_done, "sessions": state.sessions, "log": str(task.log)})
    if stop:
        board.report.remote(run.name, {"state": "stopped"})
        return {"state": "stopped"}
    if state.done:
        eval_json = RunPaths.eval_result_of(run.paths.root, state.eval_checkpoint)
        board.report.remote(run.name, {"state": "skipped", **final_success(eval_json)})
        return {"state": "skipped", "eval_json": str(eval_json)}

    if not state.trained:
        outcome = run_phase(task, "train", train_args(run, state), board, attempt)
        if outcome is not None:
            return outcome
        state = disk_state(run, task.n_episodes)
        if not state.trained:
            sentence = (f"train exited without reaching --total-steps {run.total_steps:,} (steps done: "
                        f"{state.steps_done:,}); log: {shown_path(task.log)}")
            board.report.remote(run.name, {"state": "failed", "error": sentence})
            return {"state": "failed", "error": sentence}
    if not state.evaluated:
        outcome = run_phase(task, "eval", eval_args(run, state.eval_checkpoint, task.n_episodes), board, attempt)
        if outcome is not None:
            return outcome
    final = disk_state(run, task.n_episodes)
    eval_json = RunPaths.eval_result_of(run.paths.root, final.eval_checkpoint)
    board.report.remote(run.name, {"state": "done", "steps": final.steps_done, "sessions": final.sessions,
                                   "error": None, **final_success(eval_json)})
    return {"state": "done", "eval_json": str(eval_json)}


def final_success(eval_json: Path) -> dict[str, Any]:
    """The row's success rate from the run's final evaluation (its eval file), or nothing if it cannot be read."""
    rate = (read_json(eval_json) or {}).get("success_rate")
    return {"success_rate": float(rate), "success_source": "final eval"} if isinstance(rate, (int, float)) else {}


def run_command(script: Path, args: list[str], log: Path) -> tuple[int, str]:
    """A follow-up command (aggregate, the figure): its exit code and output, also appended to ``log``."""
    process = subprocess.run([sys.executable, str(script), *args], cwd=script.parents[1], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = process.stdout + process.stderr
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {display(script, args)}\n{output}")
    return process.returncode, output


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPlan:
    """Everything ``run_sweep`` needs: the runs and what follows them."""

    name: str
    runs: list[Run]
    root: Path
    n_episodes: int
    aggregate: bool
    """Aggregate each configuration's seeds once all of them are evaluated."""
    figure: bool
    """Draw the investigation figure of the artifact root's results once every run is evaluated."""
    cpus_per_run: float
    gpus_per_run: float
    max_retries: int

    @property
    def status_path(self) -> Path:
        return self.root / "results" / f"{self.name}_status.json"

    @property
    def log_dir(self) -> Path:
        return self.root / "results" / f"{self.name}_logs"


def run_sweep(plan: SweepPlan, cluster: Cluster) -> int:
    """Run every run as a Ray task and show the table; exit 0 when all are done, 1 if one failed, 130 on Ctrl-C."""
    rows = [RunStatus(run.name, run.total_steps,
                      commands=[display(TRAIN_SCRIPT, train_args(run, None)),
                                display(TRAIN_SCRIPT, eval_args(run, run.paths.checkpoint, plan.n_episodes))])
            for run in plan.runs]
    board: Any = ray.remote(num_cpus=0)(StatusBoard).remote(rows)
    task_fn = ray.remote(execute_run)
    refs = {}
    for run in plan.runs:
        task = RunTask(run, plan.n_episodes, plan.log_dir / f"{run.name}.log", plan.gpus_per_run, plan.max_retries)
        ref = task_fn.options(num_cpus=plan.cpus_per_run, num_gpus=plan.gpus_per_run, max_retries=plan.max_retries,
                              name=run.name).remote(task, board)
        refs[ref] = run
    header = {"address": cluster.address, "dashboard": cluster.dashboard, "artifact_root": str(plan.root),
              "cpus_per_run": plan.cpus_per_run, "gpus_per_run": plan.gpus_per_run, "max_retries": plan.max_retries}
    outcomes: dict[str, dict[str, Any]] = {}
    stopping, state = False, "running"
    with ProgressView(plan.name, plan.status_path, header) as view:
        pending = list(refs)
        while pending:
            try:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=REFRESH_S)
                for ref in ready:
                    outcomes[refs[ref].name] = collect(ref, refs[ref], board)
                view.update(ray.get(board.snapshot.remote()), "stopping" if stopping else state)
            except KeyboardInterrupt:
                if stopping:  # a second Ctrl-C, as in train itself: quit now, without waiting for the saves
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    view.say("[sweep] second Ctrl-C: quitting now; a run that was still saving keeps its "
                             "previous checkpoint")
                    break
                stopping = True
                ray.get(board.request_stop.remote())
                view.say("[sweep] Ctrl-C: each run saves its checkpoint, then the sweep stops (Ctrl-C again "
                         "quits without waiting for the saves); rerun the same command to resume")
        rows = ray.get(board.snapshot.remote())
        failed = [row for row in rows if row.state == "failed"]
        stopped = stopping or any(row.state == "stopped" for row in rows)
        followups: list[dict[str, Any]] = []
        if not stopped:
            followups = run_followups(plan, outcomes, view)
        failed_followups = [f for f in followups if f["returncode"] != 0]
        state = "stopped" if stopped else ("failed" if failed or failed_followups else "done")
        view.update(rows, state, {"followups": followups})
        view.print_table(rows, state)
    for followup in followups:
        print(f"$ {followup['command']}\n{followup['output'].rstrip()}")
    print(f"[sweep] {plan.name}: {state}; status in {shown_path(plan.status_path)}, "
          f"logs in {shown_path(plan.log_dir)}")
    if stopped:
        return 130
    return 1 if failed or failed_followups else 0


def collect(ref: Any, run: Run, board: Any) -> dict[str, Any]:
    """A finished task's outcome; a task Ray gave up on (retries spent, worker lost) becomes 'failed'."""
    try:
        return ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        board.report.remote(run.name, {"state": "stopped"})
        return {"state": "stopped"}
    except ray.exceptions.RayTaskError as exc:
        sentence = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        board.report.remote(run.name, {"state": "failed", "error": sentence})
        return {"state": "failed", "error": sentence}
    except ray.exceptions.RayError as exc:  # the worker or its node died more often than --max-retries
        sentence = f"its Ray worker died ({type(exc).__name__}) more often than --max-retries allows"
        board.report.remote(run.name, {"state": "failed", "error": sentence})
        return {"state": "failed", "error": sentence}


def run_followups(plan: SweepPlan, outcomes: dict[str, dict[str, Any]], view: ProgressView) -> list[dict[str, Any]]:
    """aggregate per configuration (every seed evaluated), then the figure (every run evaluated)."""
    commands: list[tuple[Path, list[str]]] = []
    if plan.aggregate:
        groups: dict[tuple[str, str], list[Run]] = {}
        for run in plan.runs:
            groups.setdefault((run.tag, run.env_id), []).append(run)
        for group in groups.values():
            files = [Path(outcomes.get(run.name, {}).get("eval_json", "")) for run in group]
            if all(outcomes.get(run.name, {}).get("eval_json") for run in group):
                commands.append((TRAIN_SCRIPT, aggregate_args(files, plan.root)))
    if plan.figure and all(outcome.get("eval_json") for outcome in outcomes.values()):
        commands.append((FIGURE_SCRIPT, figure_args(plan.root)))
    remote_command = ray.remote(num_cpus=1)(run_command)
    results = []
    for script, args in commands:
        view.say(f"[sweep] {display(script, args)}")
        returncode, output = ray.get(remote_command.remote(script, args, plan.log_dir / "followups.log"))
        results.append({"command": display(script, args), "returncode": returncode, "output": output})
    return results

"""How far each run of a sweep is: read from its TensorBoard folder, shown as a table, kept as a JSON file.

| piece                   | what it does                                                                   |
|-------------------------|--------------------------------------------------------------------------------|
| ``TensorBoardProgress`` | reads a run's event files incrementally: steps, steps/s, last success rate     |
| ``RunStatus``           | one row of the table: state, steps, steps/s, ETA, success, retries, error      |
| ``render_table``        | the rows as a ``rich`` table (run, steps, steps/s, ETA, success, state, retries)|
| ``ProgressView``        | redraws the table in a terminal (or prints changes to a log) and writes JSON   |

The run's own TensorBoard folder is the source of truth, not a side channel: SB3 writes (and flushes)
``rollout/success_rate``, ``eval/success_rate`` and the step of every record there, for any run, hand-made or
swept. The reader runs on the node that trains (inside the run's Ray task), so it needs no shared filesystem.
Standard library only at import time (TensorBoard's event reader is imported when a reader is made).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ch09.run.artifacts import now_iso, tensorboard_event_files, write_json

STATUS_FORMAT = "ch09-sweep-status-v1"
"""The ``format`` field of results/<sweep>_status.json."""
RATE_WINDOW = 20
"""Progress samples (one per poll that saw new steps) over which steps/s is measured."""
LOG_TABLE_EVERY_S = 600.0
"""Outside a terminal (nohup, a batch job's log) the whole table is printed this often, state changes at once."""
SUCCESS_TAGS = ("eval/success_rate", "rollout/success_rate")
"""The curves the table's success column shows: the last periodic eval, else SB3's rollout mean."""
LOG_WIDTH = 200
"""Characters per line of the table outside a terminal."""
NUMERIC_COLUMNS = ("steps", "steps/s", "retries")


# ---------------------------------------------------------------------------------------------------------
# Reading a run's TensorBoard folder
# ---------------------------------------------------------------------------------------------------------
class TensorBoardProgress:
    """Incremental reader of ``runs/ch09_<tag>/<env>/seed<N>/events.out.tfevents*``.

    Each ``poll()`` reads only the events written since the last one (a resumed session adds a new event
    file to the same folder; it is picked up too) and returns the newest step, steps/s over the last
    ``RATE_WINDOW`` samples, and the last ``eval/success_rate`` and ``rollout/success_rate`` seen.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.loaders: dict[Path, Any] = {}
        self.steps = 0
        self.success: dict[str, float] = {}
        self.samples: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)

    def poll(self) -> dict[str, Any]:
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        for path in tensorboard_event_files(self.run_dir):
            if path not in self.loaders:
                self.loaders[path] = LegacyEventFileLoader(str(path))
        before = self.steps
        for loader in self.loaders.values():
            try:
                for event in loader.Load():
                    if not event.HasField("summary"):
                        continue
                    self.steps = max(self.steps, int(event.step))
                    for value in event.summary.value:
                        if value.tag in SUCCESS_TAGS and value.HasField("simple_value"):
                            self.success[value.tag.split("/")[0]] = float(value.simple_value)
            except Exception:  # noqa: BLE001  (a file being written: read the rest next poll)
                continue
        if self.steps > before or not self.samples:
            self.samples.append((time.time(), self.steps))
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        rate = None
        if len(self.samples) >= 2:
            (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
            rate = (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None
        source = "eval" if "eval" in self.success else ("rollout" if "rollout" in self.success else None)
        return {"steps": self.steps, "steps_per_s": rate,
                "success_rate": self.success.get(source) if source else None, "success_source": source}


# ---------------------------------------------------------------------------------------------------------
# One row per run
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RunStatus:
    """What the table and the status JSON say about one run."""

    name: str
    """The run's artifact stem, ``ch09_<tag>_<env>_seed<N>``."""
    total_steps: int
    state: str = "queued"
    """queued, starting, training, evaluating, retrying, done, skipped, failed, stopped."""
    steps: int = 0
    steps_per_s: float | None = None
    eta_s: float | None = None
    success_rate: float | None = None
    success_source: str | None = None
    """'eval' (the last periodic deterministic eval), 'rollout' (SB3's mean over the last 100 episodes) or
    'final eval' (the run's eval command, once it has run)."""
    attempts: int = 0
    """Ray task attempts started (the first plus its retries)."""
    sessions: int | None = None
    """Training sessions in the run's .meta.json (each start or resume of train)."""
    error: str | None = None
    node: str | None = None
    log: str | None = None
    commands: list[str] = field(default_factory=list)
    updated_at: float = field(default_factory=time.time)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)

    def update(self, fields: dict[str, Any]) -> None:
        for key, value in fields.items():
            if key == "steps" and value is not None:
                self.steps = max(self.steps, int(value))  # a retry's first read must not show fewer steps
            elif hasattr(self, key):
                setattr(self, key, value)
        remaining = self.total_steps - self.steps
        rate = self.steps_per_s
        self.eta_s = remaining / rate if self.state == "training" and rate and remaining > 0 else None
        self.updated_at = time.time()

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["retries"] = self.retries
        data["updated_at"] = datetime.fromtimestamp(self.updated_at, UTC).isoformat(timespec="seconds")
        return data


def format_count(steps: int) -> str:
    """1234567 -> '1.23M', 2500 -> '2.5K' (the table is read at a glance; the JSON keeps exact numbers)."""
    if steps >= 1_000_000:
        return f"{steps / 1_000_000:.3g}M"
    if steps >= 1_000:
        return f"{steps / 1_000:.3g}K"
    return str(steps)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = int(seconds // 60)
    if minutes >= 60 * 24:
        return f"{minutes // (60 * 24)}d {minutes // 60 % 24}h"
    if minutes >= 60:
        return f"{minutes // 60}h {minutes % 60:02d}m"
    return f"{minutes}m {int(seconds % 60):02d}s"


def table_rows(rows: list[RunStatus]) -> list[list[str]]:
    """The cells of the table, as text: run, steps, steps/s, ETA, success, state, retries."""
    cells = []
    for row in rows:
        success = "-" if row.success_rate is None else f"{row.success_rate:.2f} ({row.success_source})"
        state = row.state if not row.error else f"{row.state}: {row.error}"
        rate = "-" if row.steps_per_s is None else f"{row.steps_per_s:.1f}"
        cells.append([row.name, f"{format_count(row.steps)}/{format_count(row.total_steps)}", rate,
                      format_duration(row.eta_s), success, state, str(row.retries)])
    return cells


TABLE_COLUMNS = ("run", "steps", "steps/s", "ETA", "success", "state", "retries")


def render_table(title: str, rows: list[RunStatus]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", expand=False)
    for column in TABLE_COLUMNS:
        table.add_column(column, overflow="fold", justify="right" if column in NUMERIC_COLUMNS else "left")
    for cells in table_rows(rows):
        table.add_row(*cells)
    return table


# ---------------------------------------------------------------------------------------------------------
# The view: terminal table (or log lines) + results/<sweep>_status.json
# ---------------------------------------------------------------------------------------------------------
class ProgressView:
    """Shows the sweep as it runs and keeps ``status_path`` current (written atomically at every update).

    In a terminal the table is redrawn in place (rich's ``Live``); in a log file each state change is one
    line and the whole table is printed every ``LOG_TABLE_EVERY_S`` and at the end.
    """

    def __init__(self, sweep: str, status_path: Path, header: dict[str, Any]) -> None:
        from rich.console import Console

        self.sweep, self.status_path, self.header = sweep, status_path, header
        self.console = Console(highlight=False)
        self.interactive = self.console.is_terminal
        if not self.interactive:  # a log file has no width: keep each row on one line
            self.console = Console(highlight=False, width=LOG_WIDTH)
        self.live: Any = None
        self.last_states: dict[str, str] = {}
        self.last_table = time.time()
        self.started_at = now_iso()

    def __enter__(self) -> ProgressView:
        if self.interactive:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=1, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def update(self, rows: list[RunStatus], state: str, extra: dict[str, Any] | None = None) -> None:
        self.write_status(rows, state, extra or {})
        title = f"sweep {self.sweep}: {state}"
        if self.live is not None:
            self.live.update(render_table(title, rows))
            return
        for row in rows:
            label = row.state if not row.error else f"{row.state}: {row.error}"
            if self.last_states.get(row.name) != label:
                self.last_states[row.name] = label
                attempt = f" (attempt {row.attempts})" if row.attempts > 1 else ""
                self.say(f"[sweep] {row.name}: {label}{attempt}")
        if time.time() - self.last_table >= LOG_TABLE_EVERY_S:
            self.print_table(rows, state)

    def print_table(self, rows: list[RunStatus], state: str) -> None:
        self.last_table = time.time()
        if self.live is None:
            self.console.print(render_table(f"sweep {self.sweep}: {state}", rows))

    def write_status(self, rows: list[RunStatus], state: str, extra: dict[str, Any]) -> None:
        data = {"format": STATUS_FORMAT, "sweep": self.sweep, "state": state, "started_at": self.started_at,
                "updated_at": now_iso(), **self.header, **extra,
                "runs": [row.as_json() for row in rows]}
        try:
            write_json(self.status_path, data)
        except OSError as exc:  # a full disk must not stop the runs; say it once per update
            print(f"[sweep] could not write {self.status_path}: {exc}", file=sys.stderr)

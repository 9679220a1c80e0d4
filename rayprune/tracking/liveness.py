"""Runs a dead sweep driver left RUNNING in MLflow: telling them apart, and marking them.

A driver killed with SIGKILL (or a lost head node) cannot close its runs, so its parent and
unfinished trial runs would stay RUNNING forever. Every driver records itself on its parent run
(``rayprune.driver`` = ``host:pid``) and refreshes ``rayprune.heartbeat`` (Unix seconds) every
:data:`HEARTBEAT_EVERY_S` from a background thread. A RUNNING parent run belongs to a dead
driver when that process is gone from this host, or when its heartbeat is older than
:data:`STALE_AFTER_S` (a driver on another machine). :func:`interrupted_sweeps` finds them;
with ``mark=True`` it closes them as KILLED, tagged ``rayprune.status=interrupted`` with the
resume command as the run's note (``--resume`` reopens the parent as usual). The next sweep in
the experiment and a registering ``pick`` mark them; ``front`` and ``pick --no-register``,
which never write, only say so. :class:`DriverLiveness` is a live driver's side of this: it
closes dead drivers' sweeps, keeps the heartbeat of its own parent run, and marks how it ended.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .lookup import PARENT_TAG, ROLE_TAG, SWEEP_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

DRIVER_TAG = "rayprune.driver"
HEARTBEAT_TAG = "rayprune.heartbeat"
STATUS_TAG = "rayprune.status"  # running | finished | failed | interrupted
SPACE_TAG = "rayprune.space"  # the sweep file, for the resume command
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
HEARTBEAT_EVERY_S = 60.0
STALE_AFTER_S = 600.0
_NOTE_PREFIXES = ("interrupted", "failed")


@dataclass
class Interrupted:
    """A sweep whose driver died with its parent run RUNNING."""

    sweep_id: str
    run_id: str
    driver: str
    resume: str  # the command that continues it


def driver_tags(space: str | None = None) -> dict[str, str]:
    """The tags a driver puts on its parent run when it opens (or reopens) it."""
    tags = {
        DRIVER_TAG: f"{socket.gethostname()}:{os.getpid()}",
        HEARTBEAT_TAG: str(int(time.time())),
        STATUS_TAG: "running",
    }
    if space:
        tags[SPACE_TAG] = str(space)
    return tags


def resume_command(tags: dict[str, str]) -> str:
    return (
        f"rayprune sweep --space {tags.get(SPACE_TAG) or '<its sweep file>'} --resume "
        f"{tags.get(SWEEP_TAG, '<sweep id>')}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def driver_is_dead(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the driver a parent run names is gone: its process is not running on this host, or
    its heartbeat is older than :data:`STALE_AFTER_S`. Runs without a driver tag (logged before
    rayprune recorded one) are never judged dead."""
    driver = tags.get(DRIVER_TAG)
    if not driver:
        return False
    host, _, pid = driver.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    try:
        beat = float(tags.get(HEARTBEAT_TAG, ""))
    except ValueError:
        return False
    return (time.time() if now is None else now) - beat > STALE_AFTER_S


def _search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def interrupted_sweeps(client: MlflowClient, experiment_id: str, *, mark: bool = False) -> list[Interrupted]:
    """The experiment's sweeps whose parent run is RUNNING but whose driver is dead; with
    ``mark``, close each (and its RUNNING children) as KILLED, tagged ``rayprune.status=interrupted``
    with the resume command as the parent's note."""
    found = []
    for run in _search_all(client, experiment_id, f"tags.`{ROLE_TAG}` = 'sweep' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if not driver_is_dead(tags):
            continue
        item = Interrupted(
            tags.get(SWEEP_TAG, run.info.run_id), run.info.run_id, tags.get(DRIVER_TAG, "?"), resume_command(tags)
        )
        found.append(item)
        if not mark:
            continue
        for child in _search_all(
            client, experiment_id, f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and attributes.status = 'RUNNING'"
        ):
            client.set_tag(child.info.run_id, STATUS_TAG, "interrupted")
            client.set_terminated(child.info.run_id, status="KILLED")
        mark_parent(
            client,
            run.info.run_id,
            "interrupted",
            f"interrupted (its driver {item.driver} stopped without closing it); resume with: {item.resume}",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
    return found


def mark_parent(client: MlflowClient, run_id: str, status: str, note: str | None = None) -> None:
    """Set the parent run's ``rayprune.status`` and (when given) its note."""
    from mlflow.entities import RunTag

    tags = [RunTag(STATUS_TAG, status)] + ([RunTag(NOTE_TAG, note)] if note else [])
    client.log_batch(run_id, tags=tags)


def clear_note(client: MlflowClient, run: Any) -> None:
    """On reopening a parent run: drop an "interrupted ..."/"failed ..." note rayprune wrote."""
    note = run.data.tags.get(NOTE_TAG, "")
    if note.startswith(_NOTE_PREFIXES):
        client.delete_tag(run.info.run_id, NOTE_TAG)


class Heartbeat:
    """A daemon thread refreshing the parent run's heartbeat tag until :meth:`stop`; its own
    client, and a failed refresh is skipped (the next one retries)."""

    def __init__(self, tracking_uri: str, run_id: str, every_s: float = HEARTBEAT_EVERY_S) -> None:
        self.tracking_uri, self.run_id, self.every_s = tracking_uri, run_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayprune-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):
                client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class DriverLiveness:
    """This driver's liveness on the parent run it holds open.

    Before the driver opens its parent run, :meth:`close_dead_drivers` closes, as interrupted,
    the sweeps of drivers that died in the experiment. Once it is open, :meth:`hold` starts the
    heartbeat (the run's driver tags come from :func:`driver_tags`); :meth:`release` stops it and
    records how the sweep ended: ``rayprune.status``, and the resume command as the run's note
    unless it finished.
    """

    def __init__(self, client: Any, tracking_uri: str) -> None:
        self.client, self.tracking_uri = client, tracking_uri
        self.heartbeat: Heartbeat | None = None  # while a parent run is held
        self._run_id: str | None = None
        self._resume = ""

    def close_dead_drivers(self, experiment_id: str) -> None:
        """Close, as interrupted, the runs that dead drivers left RUNNING in the experiment."""
        interrupted_sweeps(self.client, experiment_id, mark=True)

    def hold(self, run_id: str, tags: dict[str, str], reopened: Any | None = None) -> None:
        """Start the heartbeat of parent run ``run_id``, whose ``tags`` (the sweep id, the sweep
        file) make its resume command. A ``reopened`` run (as it was found) loses the
        "interrupted ..."/"failed ..." note rayprune wrote when it ended."""
        if reopened is not None:
            clear_note(self.client, reopened)
        self._run_id, self._resume = run_id, resume_command(tags)
        self.heartbeat = Heartbeat(self.tracking_uri, run_id)

    def release(self, status: str) -> None:
        """Stop the heartbeat; set ``rayprune.status`` for the run's MLflow ``status``
        (FINISHED / FAILED / KILLED) and, unless it finished, the resume command as its note."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self._run_id is None:
            raise RuntimeError("DriverLiveness: call hold(...) first")
        word = {"FINISHED": "finished", "KILLED": "interrupted"}.get(status, "failed")
        mark_parent(
            self.client, self._run_id, word, None if status == "FINISHED" else f"{word}; resume with: {self._resume}"
        )


__all__ = [
    "DRIVER_TAG",
    "HEARTBEAT_TAG",
    "NOTE_TAG",
    "SPACE_TAG",
    "STATUS_TAG",
    "DriverLiveness",
    "Heartbeat",
    "Interrupted",
    "clear_note",
    "driver_is_dead",
    "driver_tags",
    "interrupted_sweeps",
    "mark_parent",
    "resume_command",
]

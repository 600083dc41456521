"""Which instances are alive, and when a dead one is started again: the controller's
bookkeeping of instance health, kept apart from dispatch so it can be checked on a clock.

An instance is up from its Ready until it stops sending heartbeats for HEARTBEAT_TIMEOUT_S or
its process ends; then it is down, and a restart is scheduled after a back-off that doubles
with each failure in a row (1, 2, 4 ... s, at most `max_backoff_s`), up to `max_restarts` in a
row. An instance that stays up for `stable_s` has its run of failures forgotten. A restart
that does not say Ready within `ready_timeout_s` counts as one more failure. Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from distserve.cluster.messages import HEARTBEAT_TIMEOUT_S

UP, DOWN, STARTING, GAVE_UP = "up", "down", "starting", "gave_up"


@dataclass
class Member:
    role: str
    state: str = STARTING
    last_beat: float = 0.0
    up_since: float = 0.0
    in_a_row: int = 0             # failures since it was last up for stable_s
    restart_at: float | None = None
    ready_deadline: float = 0.0
    last_error: str = ""


class Supervisor:
    def __init__(self, roles: dict[str, str], max_restarts: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0,
                 ready_timeout_s: float = 600.0, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        self.members = {iid: Member(role) for iid, role in roles.items()}
        self.max_restarts, self.backoff_s, self.max_backoff_s = max_restarts, backoff_s, max_backoff_s
        self.stable_s, self.ready_timeout_s = stable_s, ready_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.num_failures = 0
        self.num_restarts = 0

    # ---------------------------------------------------------------- events
    def ready(self, iid: str, now: float) -> None:
        m = self.members[iid]
        if m.state == STARTING and m.up_since:   # a restart, not the first start
            self.num_restarts += 1
        m.state, m.last_beat, m.up_since, m.restart_at = UP, now, now, None

    def beat(self, iid: str, now: float) -> None:
        m = self.members[iid]
        m.last_beat = max(m.last_beat, now)
        if m.state == UP and m.in_a_row and now - m.up_since >= self.stable_s:
            m.in_a_row = 0

    def down(self, iid: str, now: float, why: str) -> None:
        """It died, hung or never came up: schedule its restart, or give up on it."""
        m = self.members[iid]
        self.num_failures += 1
        m.in_a_row += 1
        m.last_error = why
        if m.in_a_row > self.max_restarts:
            m.state, m.restart_at = GAVE_UP, None
            return
        m.state = DOWN
        m.restart_at = now + min(self.backoff_s * 2 ** (m.in_a_row - 1), self.max_backoff_s)
        m.up_since = m.up_since or now   # remembered: the next Ready is a restart

    def restarting(self, iid: str, now: float) -> None:
        m = self.members[iid]
        m.state, m.restart_at, m.ready_deadline = STARTING, None, now + self.ready_timeout_s

    # ---------------------------------------------------------------- questions
    def is_up(self, iid: str) -> bool:
        return self.members[iid].state == UP

    def silent(self, now: float) -> list[str]:
        """Up instances whose heartbeats stopped."""
        return [iid for iid, m in self.members.items()
                if m.state == UP and now - m.last_beat > self.heartbeat_timeout_s]

    def restarts_due(self, now: float) -> list[str]:
        return [iid for iid, m in self.members.items()
                if m.state == DOWN and m.restart_at is not None and now >= m.restart_at]

    def late_starts(self, now: float) -> list[str]:
        """Restarts that did not say Ready in time."""
        return [iid for iid, m in self.members.items()
                if m.state == STARTING and m.ready_deadline and now > m.ready_deadline]

    def is_starting(self, iid: str) -> bool:
        return self.members[iid].state == STARTING

    def health(self) -> dict:
        """"ok" with every instance up; "degraded" while some are not but every role still
        has one; "down" when a role has none left."""
        missing = sorted(iid for iid, m in self.members.items() if m.state != UP)
        roles = {m.role for m in self.members.values()}
        serving = {m.role for m in self.members.values() if m.state == UP}
        status = "ok" if not missing else ("degraded" if serving == roles else "down")
        return {"status": status, "missing": missing,
                "instances": {iid: m.state for iid, m in self.members.items()}}

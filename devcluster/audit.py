"""The apiserver's audit log: the policy (every write; the operator's reads) and a reader.

Tests and benchmarks count the requests a component makes from it: "zero writes while idle" is
proven from the log, not from resourceVersions (a no-op patch does not bump them)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

# The operator's own identity (a client certificate in group system:masters, CN below): its reads
# are audited too, so the benchmark and tests can count every request it makes, and nobody else's
# reads fill the log (kwok, the scheduler and the tests' kubectl polls are not recorded).
OPERATOR_USER = "autoglm-operator"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
READ_VERBS = ("get", "list")
POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: [{", ".join(f'"{v}"' for v in WRITE_VERBS)}]
- level: Metadata
  users: ["{OPERATOR_USER}"]
  verbs: ["get", "list", "watch"]
- level: None
"""


class AuditLog:
    """The audit log file of a running cluster (JSON lines, written by the apiserver)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(
        self, since: float = 0.0, user_agent: str = "", namespace: str = "", user: str = ""
    ) -> list[dict[str, Any]]:
        """Every audited request after the Unix time ``since``, one entry per request (a watch is
        logged when it starts and again when it ends: kept once), optionally filtered by User-Agent
        prefix, namespace and user name."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            ts = datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if ts < since or not ev.get("userAgent", "").startswith(user_agent):
                continue
            if namespace and ev.get("objectRef", {}).get("namespace") != namespace:
                continue
            if user and ev.get("user", {}).get("username") != user:
                continue
            if ev.get("auditID") in seen:
                continue
            seen.add(ev.get("auditID"))
            out.append(ev)
        return out

    def writes(self, since: float = 0.0, user_agent: str = "", namespace: str = "") -> list[dict[str, Any]]:
        """Write requests (create/update/patch/delete) after ``since``."""
        return [
            ev for ev in self.events(since, user_agent=user_agent, namespace=namespace) if ev.get("verb") in WRITE_VERBS
        ]

    def reads(self, since: float = 0.0, user_agent: str = "", namespace: str = "") -> list[dict[str, Any]]:
        """get/list requests after ``since`` (only ``OPERATOR_USER``'s reads are audited)."""
        return [
            ev for ev in self.events(since, user_agent=user_agent, namespace=namespace) if ev.get("verb") in READ_VERBS
        ]

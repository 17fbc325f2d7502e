"""The audit-log reader on a log file as the apiserver writes it (no cluster)."""

from __future__ import annotations

import json

from devcluster.audit import OPERATOR_USER, POLICY, AuditLog


def event(audit_id: str, verb: str, ts: str, ns: str = "a", user: str = "admin", agent: str = "kubectl/v1.36") -> str:
    return json.dumps({"auditID": audit_id, "verb": verb, "requestReceivedTimestamp": ts, "userAgent": agent,
                       "user": {"username": user}, "objectRef": {"namespace": ns, "resource": "configmaps"}})


def test_events_are_filtered_and_a_watch_is_counted_once(tmp_path):
    log = tmp_path / "audit.log"
    log.write_text("\n".join([
        event("1", "create", "2026-01-01T00:00:00.000000Z"),
        event("2", "watch", "2026-01-01T00:00:01.000000Z", user=OPERATOR_USER, agent="kopf/1"),
        event("2", "watch", "2026-01-01T00:00:01.000000Z", user=OPERATOR_USER, agent="kopf/1"),  # its end
        event("3", "get", "2026-01-01T00:00:02.000000Z", user=OPERATOR_USER, agent="kopf/1"),
        event("4", "patch", "2026-01-01T00:00:03.000000Z", ns="b", agent="kopf/1"),
        '{"auditID": "5", "verb": "cre',  # a line being written
    ]))
    a = AuditLog(log)
    assert [e["auditID"] for e in a.events()] == ["1", "2", "3", "4"]
    assert [e["auditID"] for e in a.events(user_agent="kopf/")] == ["2", "3", "4"]
    assert [e["auditID"] for e in a.events(namespace="b")] == ["4"]
    assert [e["auditID"] for e in a.events(user=OPERATOR_USER)] == ["2", "3"]
    assert [e["auditID"] for e in a.writes()] == ["1", "4"]
    assert [e["auditID"] for e in a.reads()] == ["3"]
    since = 1767225602.0  # 2026-01-01T00:00:02Z
    assert [e["auditID"] for e in a.events(since=since)] == ["3", "4"]
    assert AuditLog(tmp_path / "missing.log").events() == []


def test_policy_audits_writes_and_the_operators_reads_only():
    assert '"create", "update", "patch", "delete", "deletecollection"' in POLICY
    assert f'users: ["{OPERATOR_USER}"]' in POLICY and POLICY.rstrip().endswith("- level: None")

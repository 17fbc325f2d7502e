"""The rollout CLI's output and exit decisions (pure); tests/operator/test_rollout_cluster.py runs it for real."""

from __future__ import annotations

import datetime as dt

from autoglm_operator.cli import EXIT_DONE, EXIT_ROLLED_BACK, format_status, outcome, parser

NOW = dt.datetime(2026, 1, 1, 12, 1, 0, tzinfo=dt.UTC)


def agd(status: dict, generation: int = 2, steps=None) -> dict:
    rollout = {"steps": steps} if steps is not None else {}
    return {"metadata": {"name": "chat", "namespace": "demo", "generation": generation},
            "spec": {"rollout": rollout}, "status": {"observedGeneration": 2, **status}}


CANARY = {
    "phase": "Progressing", "rolloutPhase": "Progressing", "currentStep": 0, "canaryWeight": 20,
    "stepReadyAt": "2026-01-01T12:00:20Z", "stableRevision": "chat-aaa", "stableVersion": "0.1.0",
    "canaryRevision": "chat-bbb", "canaryVersion": "0.2.0", "failedChecks": 1,
    "revisions": [{"name": "chat-aaa", "replicas": 4, "readyReplicas": 4},
                  {"name": "chat-bbb", "replicas": 1, "readyReplicas": 1}],
    "lastAnalysis": {"time": "2026-01-01T12:00:50Z", "verdict": "Failed", "requests": 40, "successRate": 0.95,
                     "latencyP99": 0.21, "ttftP99": 0.05, "interTokenP99": 0.012,
                     "reason": "success rate 0.95 < 0.99"},
    "conditions": [{"type": "Progressing", "status": "True", "reason": "CanaryProgressing",
                    "message": "Step 0 (10%): holding until 2026-01-01T12:01:20Z"}],
}


def test_status_shows_revisions_steps_weight_pause_and_analysis() -> None:
    text = format_status(agd(CANARY), now=NOW)
    for line in ("Status:          Progressing (rollout Progressing)",
                 "  Step:          0/2", "  Pause left:    20s", "  Canary weight: 20%",
                 "Stable:          chat-aaa (version 0.1.0), 4/4 ready",
                 "Canary:          chat-bbb (version 0.2.0), 1/1 ready",
                 "Last analysis:   Failed at 2026-01-01T12:00:50Z: 40 requests, success rate 0.95, latency p99 0.21s, "
                 "TTFT p99 0.05s, inter-token p99 0.012s",
                 "                 success rate 0.95 < 0.99", "  Failed checks: 1",
                 "  ► 0: weight 10%, pause 60s", "    1: weight 50%, pause 120s",
                 "    2: promote (canary scaled to the stable's replicas, then 100%)"):
        assert line in text.splitlines(), f"{line!r} not in:\n{text}"
    assert "CanaryProgressing" in text


def test_status_marks_done_steps_and_promoting() -> None:
    text = format_status(agd({**CANARY, "currentStep": 1, "rolloutPhase": "Promoting"},
                             steps=[{"weight": 25}]), now=NOW)
    assert "  ✔ 0: weight 25%" in text and "  ► 1: promote" in text and "Step:          1/1" in text


def test_outcome_like_kubectl_rollout_status() -> None:
    done = {"rolloutPhase": "Promoted", "stableRevision": "chat-bbb",
            "conditions": [{"type": "Progressing", "status": "False", "reason": "RolloutComplete"}]}
    assert outcome(agd(done)) == EXIT_DONE
    assert outcome(agd(done, generation=3)) is None  # the operator has not seen the latest spec yet
    assert outcome(agd(CANARY)) is None
    draining = {**done, "conditions": [{"type": "Progressing", "status": "True", "reason": "Promoted"}]}
    assert outcome(agd(draining)) is None  # old pods still going
    assert outcome(agd({"rolloutPhase": "RolledBack"})) == EXIT_ROLLED_BACK


def test_parser_takes_kubectl_style_arguments() -> None:
    args = parser().parse_args(["rollout", "status", "chat", "-n", "demo", "--watch", "--timeout", "60"])
    assert (args.command, args.name, args.namespace, args.watch, args.timeout) == ("status", "chat", "demo", True, 60)
    assert parser().parse_args(["rollout", "undo", "chat"]).command == "undo"

from autoglm_operator.conditions import get_condition, set_condition


def test_transition_time_changes_only_when_status_flips() -> None:
    c = set_condition([], "Ready", False, "ReplicasNotReady", "0/1", observed_generation=1, now="T1")
    assert c == [{"type": "Ready", "status": "False", "reason": "ReplicasNotReady", "message": "0/1",
                  "lastTransitionTime": "T1", "observedGeneration": 1}]
    c2 = set_condition(c, "Ready", False, "Other", "still not", observed_generation=2, now="T2")
    assert get_condition(c2, "Ready")["lastTransitionTime"] == "T1"
    assert get_condition(c2, "Ready")["reason"] == "Other"
    assert get_condition(c2, "Ready")["observedGeneration"] == 2
    c3 = set_condition(c2, "Ready", True, "ReplicasReady", "1/1", now="T3")
    assert get_condition(c3, "Ready")["lastTransitionTime"] == "T3"
    assert get_condition(c, "Ready")["reason"] == "ReplicasNotReady"  # input untouched


def test_order_is_ready_progressing_degraded_then_others() -> None:
    c = set_condition([{"type": "Custom", "status": "True"}], "Degraded", False, "AsExpected", now="T")
    c = set_condition(c, "Ready", True, "R", now="T")
    c = set_condition(c, "Progressing", True, "P", now="T")
    assert [x["type"] for x in c] == ["Ready", "Progressing", "Degraded", "Custom"]


def test_string_status_accepted() -> None:
    c = set_condition(None, "Ready", "Unknown", "Starting", now="T")
    assert c[0]["status"] == "Unknown"

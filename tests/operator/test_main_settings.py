from __future__ import annotations

import pytest

from autoglm_operator.main import kopf_args, main
from autoglm_operator.settings import OperatorSettings, SettingsError, load_settings


def test_no_args_watches_all_namespaces_standalone() -> None:
    assert kopf_args([], OperatorSettings()) == ["run", "-m", "autoglm_operator.handlers", "--standalone",
                                                 "--all-namespaces"]


def test_extra_args_pass_through_and_replace_defaults() -> None:
    args = kopf_args(["--namespace", "team-a", "--verbose", "--liveness=http://0.0.0.0:8080/healthz"],
                     OperatorSettings(liveness_endpoint="http://0.0.0.0:9090/healthz"))
    assert args == ["run", "-m", "autoglm_operator.handlers", "--standalone",
                    "--namespace", "team-a", "--verbose", "--liveness=http://0.0.0.0:8080/healthz"]


def test_namespaces_from_settings(monkeypatch) -> None:
    monkeypatch.setenv("AUTOGLM_OPERATOR_NAMESPACES", "a, b")
    s = load_settings()
    assert s.namespaces == ["a", "b"]
    assert kopf_args([], s)[-4:] == ["--namespace", "a", "--namespace", "b"]


@pytest.mark.parametrize("var,value,needle", [
    ("AUTOGLM_OPERATOR_RESYNC_SECONDS", "0", "AUTOGLM_OPERATOR_RESYNC_SECONDS"),
    ("AUTOGLM_OPERATOR_DEFAULT_RUNTIME_IMAGE", "Bad Image:tag", "AUTOGLM_OPERATOR_DEFAULT_RUNTIME_IMAGE"),
    ("AUTOGLM_OPERATOR_NAMESPACES", "UPPER", "AUTOGLM_OPERATOR_NAMESPACES"),
])
def test_bad_settings_fail_fast_naming_the_variable(monkeypatch, capsys, var, value, needle) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=needle):
        load_settings()
    assert main([]) == 2
    assert needle in capsys.readouterr().err

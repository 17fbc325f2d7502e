"""``autoglm-operator``: ``kopf run`` with this package's handlers and sensible defaults.

    autoglm-operator                      # all namespaces (or AUTOGLM_OPERATOR_NAMESPACES), standalone
    autoglm-operator --namespace team-a   # extra arguments go to `kopf run` as they are
    autoglm-operator --liveness=http://0.0.0.0:8080/healthz --verbose

Settings come from ``AUTOGLM_OPERATOR_*`` variables and are validated before kopf starts: a bad
value exits with status 2 and one line per bad variable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .settings import OperatorSettings, SettingsError, load_settings

HANDLERS_MODULE = "autoglm_operator.handlers"
_SCOPE_FLAGS = ("-n", "--namespace", "-A", "--all-namespaces")
_PEERING_FLAGS = ("--standalone", "-P", "--peering")
_LIVENESS_FLAGS = ("-L", "--liveness")


def _has(args: Sequence[str], flags: Sequence[str]) -> bool:
    return any(a in flags or any(a.startswith(f + "=") for f in flags if f.startswith("--")) for a in args)


def kopf_args(extra: Sequence[str], settings: OperatorSettings) -> list[str]:
    """argv for kopf's CLI (``kopf run ...``)."""
    args = ["run", "-m", HANDLERS_MODULE]
    if not _has(extra, _PEERING_FLAGS):
        args.append("--standalone")
    if not _has(extra, _SCOPE_FLAGS):
        if settings.namespaces:
            for ns in settings.namespaces:
                args += ["--namespace", ns]
        else:
            args.append("--all-namespaces")
    if settings.liveness_endpoint and not _has(extra, _LIVENESS_FLAGS):
        args += ["--liveness", settings.liveness_endpoint]
    return args + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"autoglm-operator: {exc}", file=sys.stderr)
        return 2
    from kopf.cli import main as kopf_cli  # imported late: `--help` and bad settings stay fast

    try:
        kopf_cli.main(args=kopf_args(extra, settings), prog_name="autoglm-operator", standalone_mode=False)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The router pod's own view of the issuer, as a condition on its Pod (``autoglm.io/OAuth2Keys``), the way
readiness gates let a component add conditions a kubelet does not own: ``kubectl describe pod`` shows it,
and the operator copies it into the AutoGLMDeployment's ``status.router.auth``. Written only when it
changes; a failed write is logged and tried again after the next key refresh."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

import aiohttp

from autoglm_router.auth.keys import IssuerKeys
from autoglm_router.kube import KubeConnection

log = logging.getLogger("autoglm_router.auth")

CONDITION = "autoglm.io/OAuth2Keys"
MAX_MESSAGE = 500


@dataclass(frozen=True)
class KeysCondition:
    status: str  # "True": keys fetched and the issuer answers; "False": otherwise
    reason: str  # KeysFetched | IssuerUnreachable (cached keys still verify) | NoKeys (every token refused)
    message: str


def keys_condition(keys: IssuerKeys) -> KeysCondition:
    """The condition for how ``keys`` stand now (no ages in it: it changes only when the state does)."""
    n = len(keys.key_ids)
    if not keys.fetched:
        if keys.error is None:
            return KeysCondition("False", "NoKeys", f"keys not fetched yet from {keys.config.discovery_url}")
        return KeysCondition(
            "False", "NoKeys", f"the issuer cannot be reached ({keys.error}); every token is refused"[:MAX_MESSAGE]
        )
    if keys.error is not None:
        message = f"the issuer cannot be reached ({keys.error}); {n} cached key(s) still verify, unknown keys refused"
        return KeysCondition("False", "IssuerUnreachable", message[:MAX_MESSAGE])
    return KeysCondition("True", "KeysFetched", f"{n} key(s) from {keys.jwks_uri}"[:MAX_MESSAGE])


class PodConditionReporter:
    """Patches ``CONDITION`` on one pod's status (strategic merge: conditions merge by type, so the
    kubelet's own stay as they are). Needs ``patch`` on ``pods/status`` (the operator's Role gives it)."""

    def __init__(self, conn: KubeConnection, namespace: str, pod: str) -> None:
        self.conn, self.namespace, self.pod = conn, namespace, pod
        self._last: KeysCondition | None = None
        self._since = ""  # lastTransitionTime: changes only when status flips

    async def report(self, keys: IssuerKeys) -> None:
        cond = keys_condition(keys)
        if cond == self._last:
            return
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        since = self._since if self._last is not None and self._last.status == cond.status else now
        body = {
            "status": {
                "conditions": [
                    {
                        "type": CONDITION,
                        "status": cond.status,
                        "reason": cond.reason,
                        "message": cond.message,
                        "lastProbeTime": now,
                        "lastTransitionTime": since,
                    }
                ]
            }
        }
        url = f"{self.conn.server}/api/v1/namespaces/{self.namespace}/pods/{self.pod}/status"
        headers = {**self.conn.headers(), "Content-Type": "application/strategic-merge-patch+json"}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.patch(url, data=json.dumps(body), headers=headers, ssl=self.conn.ssl) as r,
            ):
                if r.status >= 300:
                    log.warning(
                        "Failed to report keys on the pod, pod=%s status=%d body=%s",
                        self.pod,
                        r.status,
                        (await r.text())[:300],
                    )
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("Failed to report keys on the pod, pod=%s error=%s", self.pod, exc)
            return
        self._last, self._since = cond, since
        log.info("Reported keys on the pod, pod=%s status=%s reason=%s", self.pod, cond.status, cond.reason)

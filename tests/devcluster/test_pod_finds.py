"""What a pod finds on the process node, as on any real node: a projected service-account token bound
to it (with ``ca.crt`` and ``namespace``) at the usual path, ``KUBERNETES_SERVICE_HOST/PORT``, an
apiserver whose certificate is valid for the ``kubernetes`` Service's IP and ``kubernetes.default.svc``,
and cluster DNS with the usual search domains (``web``, ``web.<ns>``, ``prometheus.monitoring``)."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from tests.devcluster.podutil import pod, ready
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

# Runs as uid 1000 (the token must be readable by a non-root user) and prints what it found.
CLIENT = r"""
import json, os, socket, ssl, sys, time, urllib.error, urllib.request
ns = sys.argv[1]
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
out = {"files": sorted(f for f in os.listdir(sa) if not f.startswith(".")),
       "namespace": open(sa + "/namespace").read(), "token": open(sa + "/token").read(),
       "env": {k: os.environ.get(k) for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")},
       "resolv": open("/etc/resolv.conf").read()}
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
def call(host):
    req = urllib.request.Request(f"https://{host}/api/v1/namespaces/{ns}/pods",
                                 headers={"Authorization": "Bearer " + out["token"]})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
            return [r.status, ""]
    except urllib.error.HTTPError as e:
        return [e.code, json.loads(e.read())["message"]]
    except Exception as e:
        return [0, repr(e)]
out["by_ip"] = call(os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"])
out["by_name"] = call("kubernetes.default.svc")
def resolve(name):
    t = time.monotonic()
    try:
        return socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError as e:
        return f"error after {time.monotonic() - t:.1f}s: {e}"
out["dns"] = {n: resolve(n) for n in ("kubernetes.default", "web", f"web.{ns}", f"web.{ns}.svc.cluster.local",
                                      "prometheus.monitoring", "example.com")}
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return [r.status, r.read().decode()[:100]]
    except Exception as e:
        return [0, repr(e)]
# `web` is Ready, but its EndpointSlice and then the node's Service rules follow a moment later (as with
# kube-proxy): a refused connection is retried for up to 15 s, and the first error is kept for the report.
deadline, first = time.monotonic() + 15, None
while (web := get(f"http://web.{ns}/hello.txt"))[0] != 200 and time.monotonic() < deadline:
    first = first or web
    time.sleep(0.2)
out["web"], out["web_first_error"] = web, first
out["prometheus"] = get("http://prometheus.monitoring:9090/-/ready")
print("RESULT " + json.dumps(out), flush=True)
time.sleep(3600)
"""


def _jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_a_pod_finds_its_token_the_apiserver_and_cluster_dns(kube, namespace):
    web = pod("web", ["sh", "-c", "cd /tmp && echo hello > hello.txt && exec python3 -m http.server 8080"],
              container={"readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(web))
    kube.kubectl("expose", "pod", "web", "-n", namespace, "--port=80", "--target-port=8080")
    wait_for(lambda: ready(kube, namespace, "web"), timeout=60, message="web Ready")

    client = pod("client", ["python3", "-c", CLIENT, namespace], securityContext={"runAsUser": 1000})
    del client["spec"]["automountServiceAccountToken"]  # the default: the admission plugin adds the volume
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(client))
    line = wait_for(lambda: next((x for x in kube.pod_log(namespace, "client", "main").splitlines()
                                  if x.startswith("RESULT ")), None), timeout=90,
                    message=f"the client's findings (log: {kube.pod_log(namespace, 'client', 'main')[-2000:]})")
    found = json.loads(line[len("RESULT "):])

    # The projected token, bound to this pod, with the CA and the namespace, at the usual path.
    assert found["files"] == ["ca.crt", "namespace", "token"]
    assert found["namespace"] == namespace
    claims = _jwt_claims(found["token"])
    assert claims["sub"] == f"system:serviceaccount:{namespace}:default"
    uid = json.loads(kube.kubectl("get", "pod", "client", "-n", namespace, "-o", "json").stdout)["metadata"]["uid"]
    assert claims["kubernetes.io"]["pod"] == {"name": "client", "uid": uid}
    # The apiserver, through the `kubernetes` Service, by IP and by name, its certificate verified: it
    # knows the token (403 naming the ServiceAccount: the default one may not list pods, not 401).
    assert found["env"] == {"KUBERNETES_SERVICE_HOST": kube.net.ranges.kubernetes_service_ip,
                            "KUBERNETES_SERVICE_PORT": "443"}
    for how in ("by_ip", "by_name"):
        status, message = found[how]
        assert status == 403 and f"system:serviceaccount:{namespace}:default" in message, (how, found[how])
    # Cluster DNS: the usual search domains, Services by short and qualified names, nothing outside.
    svc_ip = json.loads(kube.kubectl("get", "svc", "web", "-n", namespace, "-o", "json").stdout)["spec"]["clusterIP"]
    assert found["resolv"].splitlines()[1] == (f"search {namespace}.svc.cluster.local svc.cluster.local "
                                               "cluster.local")
    dns = found["dns"]
    assert dns["web"] == dns[f"web.{namespace}"] == dns[f"web.{namespace}.svc.cluster.local"] == svc_ip, dns
    assert dns["kubernetes.default"] == kube.net.ranges.kubernetes_service_ip, dns
    assert dns["example.com"].startswith("error"), dns  # no forwarding: nothing leaves this machine
    assert float(dns["example.com"].split()[2].rstrip("s:")) < 2.0, dns
    assert found["web"] == [200, "hello\n"], (found["web"], found["web_first_error"])
    assert found["prometheus"][0] == 200, found["prometheus"]

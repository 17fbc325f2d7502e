"""The process node runs pods for real: env, volumes, user, logs, a Service through kube-proxy,
deletion with SIGTERM; an image it cannot run is ErrImagePull."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
import yaml

from devcluster.network import sh
from tests.devcluster.podutil import container_status, get_pod, http_json, pod, ready
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

# A small HTTP server that reports what the container sees: uid, env, files under /etc/demo.
SERVER = r"""
import http.server, json, os, pathlib, signal, sys, time
seen = {"uid": os.getuid(), "gid": os.getgid(), "env": {k: v for k, v in os.environ.items() if k.startswith("DEMO_")},
        "files": {str(p): p.read_text() for p in pathlib.Path("/etc/demo").rglob("*") if p.is_file()},
        "scratch_writable": os.access("/scratch", os.W_OK), "root_writable": os.access("/", os.W_OK)}
print("seen", json.dumps(seen), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(seen).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
def term(*_):
    print("got SIGTERM", flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, term)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def test_pod_runs_with_env_volumes_user_and_is_reached_through_its_service(kube, namespace):
    kube.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=token=s3cret")
    kube.kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=mode=fast",
                 "--from-literal=conf.ini=[x]\ny=1")
    body = pod("web", ["python3", "-c", SERVER],
               securityContext={"runAsUser": 1000, "runAsGroup": 1000},
               volumes=[{"name": "cfg", "configMap": {"name": "settings"}},
                        {"name": "sec", "secret": {"secretName": "creds"}},
                        {"name": "scratch", "emptyDir": {}}],
               container={
                   "env": [{"name": "DEMO_PLAIN", "value": "v1"},
                           {"name": "DEMO_EXPANDED", "value": "$(DEMO_PLAIN)-x"},
                           {"name": "DEMO_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                           {"name": "DEMO_MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                           {"name": "DEMO_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                   "volumeMounts": [{"name": "cfg", "mountPath": "/etc/demo/cfg", "readOnly": True},
                                    {"name": "sec", "mountPath": "/etc/demo/sec", "readOnly": True},
                                    {"name": "scratch", "mountPath": "/scratch"}],
                   "securityContext": {"readOnlyRootFilesystem": True},
                   "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    p = wait_for(lambda: ready(kube, namespace, "web"), timeout=60, message="pod web Ready")
    assert p["spec"]["nodeName"] == "proc-0"
    ip = p["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(kube.net.ranges.node_cidr)
    seen = http_json(f"http://{ip}:8080/")
    assert seen["uid"] == 1000 and seen["gid"] == 1000
    assert seen["env"] == {"DEMO_PLAIN": "v1", "DEMO_EXPANDED": "v1-x", "DEMO_TOKEN": "s3cret", "DEMO_MODE": "fast",
                           "DEMO_POD": "web"}
    assert seen["files"] == {"/etc/demo/cfg/mode": "fast", "/etc/demo/cfg/conf.ini": "[x]\ny=1",
                             "/etc/demo/sec/token": "s3cret"}
    assert seen["scratch_writable"] and not seen["root_writable"]
    assert '"DEMO_TOKEN": "s3cret"' in kube.pod_log(namespace, "web", "main")  # logs land in a file per container

    # A ClusterIP Service reaches it from the root namespace, through kube-proxy's nftables rules.
    kube.kubectl("expose", "pod", "web", "-n", namespace, "--port=80", "--target-port=8080")
    svc = json.loads(kube.kubectl("get", "svc", "web", "-n", namespace, "-o", "json").stdout)
    cluster_ip = svc["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(kube.net.ranges.service_range)
    assert wait_for(lambda: http_json(f"http://{cluster_ip}:80/", timeout=2), timeout=30,
                    message="the Service answers")["env"]["DEMO_POD"] == "web"

    # Deletion: SIGTERM reaches the process, the pod is gone well within its grace period.
    t0 = time.monotonic()
    kube.kubectl("delete", "pod", "web", "-n", namespace, "--wait=false")
    wait_for(lambda: get_pod(kube, namespace, "web") is None, timeout=30, message="pod web deleted")
    assert time.monotonic() - t0 < 10
    assert "got SIGTERM" in kube.pod_log(namespace, "web", "main")
    assert kube.net.pod_ns(int(ip.split(".")[-1]) - 2) not in sh("ip", "netns", "list").stdout.split()


def test_unknown_image_is_err_image_pull(kube, namespace):
    body = pod("ghost", ["true"])
    body["spec"]["containers"][0]["image"] = "registry.invalid/nothing:1"
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    waiting = wait_for(lambda: container_status(kube, namespace, "ghost").get("state", {}).get("waiting"),
                       timeout=30, message="ghost waiting")
    assert waiting["reason"] == "ErrImagePull"
    assert "registry.invalid/nothing:1" in waiting["message"]

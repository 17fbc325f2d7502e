"""The process node's pure parts: $(VAR) expansion, the image table, hostPath mapping, back-off,
resolv.conf, named ports, users (no cluster)."""

from __future__ import annotations

import pytest

from devcluster.node.config import BACKOFF_MAX, NodeConfig
from devcluster.node.container import Container, container_argv
from devcluster.node.env import expand
from devcluster.node.lifecycle import backoff_delay
from devcluster.node.probes import port_of
from devcluster.node.volumes import resolv_conf


def cfg(**kw) -> NodeConfig:
    return NodeConfig(kubeconfig_server="https://x", ca="", cert="", key="", node="proc-0", slot=1, state_dir="/s",
                      images=[{"match": "ghcr.io/autoglm/runtime"}, {"match": "localhost:5000/img"}], **kw)


def test_expand_follows_kubernetes_rules():
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A)", env) == "$(A)"           # escaped
    assert expand("$(MISSING)", env) == "$(MISSING)"  # unknown stays as written
    assert expand("$A", env) == "$A"


@pytest.mark.parametrize(("ref", "found"), [
    ("ghcr.io/autoglm/runtime:0.1.0", True), ("ghcr.io/autoglm/runtime", True),
    ("ghcr.io/autoglm/runtime@sha256:abc", True), ("localhost:5000/img:1", True),
    ("ghcr.io/autoglm/runtime-other:1", False), ("docker.io/library/python:3", False)])
def test_image_table_matches_the_repository_with_any_tag_or_digest(ref, found):
    assert (cfg().image(ref) is not None) is found


def test_host_paths_map_the_longest_prefix():
    c = cfg(host_paths={"/models": "/data/m", "/models/big": "/disk/big"})
    assert c.host_path("/models/tiny") == "/data/m/tiny"
    assert c.host_path("/models/big/x") == "/disk/big/x"
    assert c.host_path("/modelsX") == "/modelsX"  # a prefix of the name, not of the path
    assert c.host_path("/etc") == "/etc"


def test_backoff_doubles_from_the_base_and_caps():
    assert [backoff_delay(n, 10) for n in range(7)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(50, 10) == BACKOFF_MAX


def test_resolv_conf_cluster_first_points_at_cluster_dns_with_search_domains():
    text = resolv_conf("ClusterFirst", None, "team-a", "cluster.local", "10.151.0.10")
    assert text == ("nameserver 10.151.0.10\n"
                    "search team-a.svc.cluster.local svc.cluster.local cluster.local\n"
                    "options ndots:5\n")


def test_resolv_conf_merges_dns_config_and_honours_policies():
    merged = resolv_conf("ClusterFirst", {"nameservers": ["10.0.0.53"], "searches": ["corp.internal"],
                                          "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]},
                         "ns", "cluster.local", "10.151.0.10")
    assert merged.splitlines() == ["nameserver 10.151.0.10", "nameserver 10.0.0.53",
                                   "search ns.svc.cluster.local svc.cluster.local cluster.local corp.internal",
                                   "options ndots:2 edns0"]
    assert resolv_conf("Default", None, "ns", "cluster.local", "10.151.0.10") is None  # the host's own
    assert resolv_conf("ClusterFirst", None, "ns", "cluster.local", "") is None          # no cluster DNS
    assert resolv_conf("None", {"nameservers": ["1.2.3.4"]}, "ns", "cluster.local", "10.151.0.10") == \
        "nameserver 1.2.3.4\n"


def test_named_and_numbered_ports():
    c = Container({"name": "c", "ports": [{"name": "http", "containerPort": 8000}]})
    assert port_of(c, "http") == 8000 and port_of(c, 9090) == 9090 and port_of(c, "9091") == 9091
    with pytest.raises(ValueError, match="no port named metrics"):
        port_of(c, "metrics")


def test_container_user_comes_from_the_container_over_the_pod():
    pod = {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 2000}}}
    assert Container({"name": "c"}).user(pod) == (1000, 2000)
    assert Container({"name": "c", "securityContext": {"runAsUser": 7}}).user(pod) == (7, 2000)
    assert Container({"name": "c"}).user({"spec": {}}) == (0, 0)
    assert Container({"name": "c", "securityContext": {"runAsUser": 65532}}).user({"spec": {}}) == (65532, 65532)


def test_args_follow_the_images_entrypoint_unless_command_replaces_it():
    image = {"entrypoint": ["autoglm-operator"]}
    assert container_argv({"args": ["--liveness=http://0.0.0.0:8080/healthz"]}, image, {}) == [
        "autoglm-operator", "--liveness=http://0.0.0.0:8080/healthz"]
    assert container_argv({"command": ["python3", "-m", "x"], "args": ["$(A)"]}, image, {"A": "1"}) == [
        "python3", "-m", "x", "1"]
    assert container_argv({}, image, {}) == ["autoglm-operator"]
    assert container_argv({"args": ["serve"]}, {}, {}) == ["serve"]

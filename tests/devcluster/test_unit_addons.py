"""Add-ons by name, their objects, and the command line (no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from devcluster import addons, cli
from devcluster.addons import coredns, gateway, hydra, keda, prometheus


def test_defaults_always_start_and_named_ones_follow_once():
    assert addons.resolve([]) == ["coredns", "prometheus"]
    assert addons.resolve(["keda", "prometheus", "keda"]) == ["coredns", "prometheus", "keda"]


def test_an_unknown_add_on_names_the_known_ones():
    with pytest.raises(ValueError, match=f"unknown add-on\\(s\\) nosuch; known: {', '.join(addons.ADDONS)}$"):
        addons.resolve(["nosuch"])


def test_cli_rejects_an_unknown_add_on(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["up", "--addons", "keda,gatewy"])
    assert exc.value.code == 2
    assert "unknown add-on(s) gatewy" in capsys.readouterr().err


def test_cluster_dns_service_is_the_tenth_address_with_its_endpoint_on_the_node():
    svc, es = coredns.objects("10.151.0.0/16", "10.101.255.2")
    assert coredns.dns_ip("10.151.0.0/16") == "10.151.0.10"
    assert (svc["metadata"]["namespace"], svc["metadata"]["name"]) == ("kube-system", "kube-dns")
    assert svc["spec"]["clusterIP"] == "10.151.0.10" and "selector" not in svc["spec"]
    assert {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert es["endpoints"][0]["addresses"] == ["10.101.255.2"]
    assert es["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"


def test_corefile_serves_the_cluster_and_forwards_nothing():
    text = coredns.COREFILE.format(node_ip="10.101.255.2", ready_port=8181, domain="cluster.local", kubeconfig="/k")
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa" in text and "bind 10.101.255.2" in text
    assert "forward" not in text  # nothing leaves this machine


def test_keda_metrics_apiserver_is_registered_on_the_node_address():
    objs = {o["kind"]: o for o in keda.objects("10.101.255.2")}
    assert objs["Endpoints"]["subsets"][0]["addresses"] == [{"ip": "10.101.255.2"}]
    assert objs["APIService"]["metadata"]["name"] == "v1beta1.external.metrics.k8s.io"


def test_hydra_runs_in_memory_with_jwt_access_tokens_and_no_phoning_home():
    e = hydra.env("10.101.255.2", 4444, 4445, secret="s" * 32)
    assert (e["DSN"], e["STRATEGIES_ACCESS_TOKEN"], e["SQA_OPT_OUT"]) == ("memory", "jwt", "true")
    assert e["URLS_SELF_ISSUER"] == "http://10.101.255.2:4444/"  # the `iss` of its tokens: trailing slash
    assert e["SERVE_PUBLIC_HOST"] == e["SERVE_ADMIN_HOST"] == "10.101.255.2"
    assert hydra.urls("10.101.255.2") == ("http://10.101.255.2:4444/", "http://10.101.255.2:4445")
    cmd = hydra.argv(Path("/bin"), "agl1")
    assert cmd[:4] == ["ip", "netns", "exec", "agl1"] and cmd[4:] == ["/bin/hydra", "serve", "all", "--dev",
                                                                       "--sqa-opt-out"]


def test_up_prints_the_add_ons_lines_before_the_kubeconfig_export(tmp_path):
    info = {"pod_range": "p", "service_range": "s", "prometheus": "http://127.0.0.1:1", "addons":
            ["coredns", "prometheus", "keda", "hydra"], "exports": {"HYDRA_ISSUER": "http://10.1.255.2:4444/",
                                                                   "HYDRA_ADMIN": "http://10.1.255.2:4445"}}
    lines = cli.summary(tmp_path, info, 12.0)
    assert lines[-3:] == ["HYDRA_ISSUER=http://10.1.255.2:4444/", "HYDRA_ADMIN=http://10.1.255.2:4445",
                          f"export KUBECONFIG={tmp_path / 'kubeconfig'}"]
    assert "Add-ons: keda, hydra" in lines


def test_gateway_listens_on_the_node_address_only_and_calls_nobody():
    flags = gateway.args("10.101.255.2")
    addresses = [f.split("=", 1)[1] for f in flags if f.startswith("--entryPoints.") and ".address=" in f]
    assert addresses == ["10.101.255.2:80", "10.101.255.2:8082"]  # inside the cluster's network, not 0.0.0.0
    assert "--global.checkNewVersion=false" in flags and "--global.sendAnonymousUsage=false" in flags


def test_gateway_objects_accept_routes_from_every_namespace_on_traefiks_class():
    objs = {o["kind"]: o for o in gateway.objects("10.101.255.2")}
    assert objs["GatewayClass"]["spec"]["controllerName"] == "traefik.io/gateway-controller"
    gw = objs["Gateway"]
    assert (gw["metadata"]["namespace"], gw["metadata"]["name"]) == ("gateway", "traefik")
    assert gw["spec"]["gatewayClassName"] == objs["GatewayClass"]["metadata"]["name"]
    [listener] = gw["spec"]["listeners"]
    assert (listener["port"], listener["protocol"]) == (80, "HTTP")
    assert listener["allowedRoutes"] == {"namespaces": {"from": "All"}}
    assert objs["EndpointSlice"]["endpoints"][0]["addresses"] == ["10.101.255.2"]


def test_the_gateway_exports_its_address_and_name():
    assert gateway.exports("10.103.255.2") == {
        "GATEWAY_ADDRESS": "http://10.103.255.2:80",
        "GATEWAY": "gateway/traefik",
    }


def test_gateway_programmed_needs_accepted_and_programmed():
    def g(**conds):
        return {"status": {"conditions": [{"type": t, "status": s} for t, s in conds.items()]}}

    assert gateway.programmed(g(Accepted="True", Programmed="True"))
    assert not gateway.programmed(g(Accepted="True", Programmed="False"))
    assert not gateway.programmed(g(Programmed="True"))
    assert not gateway.programmed({})


def test_add_on_scrape_targets_are_a_file_prometheus_discovers_with_their_own_job(tmp_path):
    class C:
        dir = tmp_path

    prometheus.add_targets(C(), "traefik", ["10.101.255.2:8082"])  # type: ignore[arg-type]
    files = list(prometheus.targets_dir(tmp_path).iterdir())
    assert [f.name for f in files] == ["traefik.json"]
    assert json.loads(files[0].read_text()) == [{"targets": ["10.101.255.2:8082"], "labels": {"job": "traefik"}}]
    cfg = yaml.safe_load(prometheus.CONFIG.format(api="https://a", ca="c", cert="t", key="k", targets=tmp_path))
    [addon_job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "addons"]
    assert addon_job["file_sd_configs"][0]["files"] == [f"{tmp_path}/*.json"]

"""The Go build's cache keys are per component: editing one component's script (its pin, its recipe)
or its inputs changes that component's key only; editing the driver changes none (no cluster, nothing
is built)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from devcluster.binaries import BUILD_SCRIPT


def keys(gobuild: Path) -> dict[str, str]:
    out = subprocess.run(["bash", str(gobuild / "build.sh"), "--keys"], check=True, capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines())


def test_each_component_has_its_own_key(tmp_path):
    gobuild = tmp_path / "devcluster" / "gobuild"
    shutil.copytree(BUILD_SCRIPT.parent, gobuild)
    before = keys(gobuild)
    assert set(before) == {p.stem for p in (gobuild / "components").glob("*.sh")}  # every component is built
    assert {"k8s", "etcd", "kwok", "helm", "prometheus", "keda", "gateway-api", "coredns", "hydra", "traefik"} <= set(before)
    assert len(set(before.values())) == len(before)

    (gobuild / "build.sh").write_text((gobuild / "build.sh").read_text() + "\n# a comment\n")
    assert keys(gobuild) == before  # the driver is in no key

    etcd = gobuild / "components" / "etcd.sh"
    etcd.write_text(etcd.read_text().replace("ETCD_VERSION=3.6.16", "ETCD_VERSION=3.6.17"))
    main_go = gobuild / "k8s" / "main.go"
    main_go.write_text(main_go.read_text() + "\n// changed\n")
    after = keys(gobuild)
    assert {c for c in before if before[c] != after[c]} == {"etcd", "k8s"}

    (gobuild / "common.sh").write_text((gobuild / "common.sh").read_text() + "\n# a build flag\n")
    assert all(keys(gobuild)[c] != after[c] for c in after)  # common.sh is in every key


def test_seeding_takes_a_component_from_an_old_bin_dir_with_the_same_version(tmp_path):
    """--seed-from links a component's files from the former all-in-one folder when its versions.txt
    pins the same version, and builds nothing; gateway-api is only CRD files (no compile)."""
    old = tmp_path / "old"
    (old / "crds").mkdir(parents=True)
    (old / "crds" / "marker.yaml").write_text("seeded: true\n")
    (old / "versions.txt").write_text("kubernetes v1.36.3\ngateway-api v1.6.3\n")
    env = {**os.environ, "AUTOGLM_BIN_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--seed-from", str(old), "gateway-api"], check=True,
                         capture_output=True, text=True, env=env)
    bin_dir = Path(out.stdout.strip().splitlines()[-1])
    assert (bin_dir / "crds" / "marker.yaml").read_text() == "seeded: true\n"
    assert (bin_dir / "versions.txt").read_text() == "gateway-api v1.6.3\n"
    assert "gateway-api: seeded" in out.stderr
    # A second run finds it in the cache.
    again = subprocess.run(["bash", str(BUILD_SCRIPT), "gateway-api"], check=True, capture_output=True, text=True,
                           env=env)
    assert Path(again.stdout.strip().splitlines()[-1]) == bin_dir and "seeded" not in again.stderr


def test_a_component_whose_pin_differs_is_built_not_seeded(tmp_path):
    old = tmp_path / "old"
    (old / "crds").mkdir(parents=True)
    (old / "crds" / "marker.yaml").write_text("seeded: true\n")
    (old / "versions.txt").write_text("gateway-api v1.6.2\n")  # another version than the pin
    env = {**os.environ, "AUTOGLM_BIN_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--seed-from", str(old), "gateway-api"], check=True,
                         capture_output=True, text=True, env=env)
    bin_dir = Path(out.stdout.strip().splitlines()[-1])
    assert "gateway-api: building" in out.stderr
    assert not (bin_dir / "crds" / "marker.yaml").exists()
    assert (bin_dir / "crds" / "gateway.networking.k8s.io_httproutes.yaml").exists()

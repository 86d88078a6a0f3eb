"""cluster.yaml is a real Ray cluster-launcher config: Ray's own validation accepts it, and it installs this project."""
import yaml

from conftest import ROOT


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # what `ray up` does first: fill provider defaults, check the schema
    gpu_types = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] for t in gpu_types)
    setup = " ".join(cfg["setup_commands"])
    assert "ray[train,serve,data]==2.60.0" in setup and "pip install -e" in setup


def test_every_key_is_commented():
    for n, line in enumerate((ROOT / "cluster.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith(("#", "-")):
            assert "#" in line, f"cluster.yaml:{n} has no comment: {line}"


def test_ray_version_matches_pyproject():
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in deps if d.startswith("ray["))
    assert pinned.split("==")[1] in (ROOT / "cluster.yaml").read_text()

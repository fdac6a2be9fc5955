"""Packaging: the conda env the rules use pins what pyproject.toml pins; the CLI is installed;
what vitablate reaches inside of timm is still there (fails first when timm moves)."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

import yaml

from conftest import REPO


def _pins(requirements):
    out = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)", req)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


def test_conda_envs_agree_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pyproject = _pins(project["dependencies"])
    assert len(pyproject) == len(project["dependencies"]), "every runtime dependency is pinned with =="
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env_file in envs:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert _pins(pip) == pyproject, f"{env_file.name} pins differ from pyproject.toml"


def test_extras_pin_one_version():
    """psycopg2-binary (the MLflow server's PostgreSQL driver) is in `server` and in `dev` (the tests start a
    server), at one version; and installed at that version where the tests run."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    seen: dict[str, str] = {}
    for name, reqs in extras.items():
        for pkg, version in _pins(reqs).items():
            assert seen.setdefault(pkg, version) == version, f"{pkg} pinned at {seen[pkg]} and {version} ({name})"
    assert "psycopg2-binary" in _pins(extras["server"]) and "psycopg2-binary" in _pins(extras["dev"])
    try:
        installed = metadata.version("psycopg2-binary")
    except metadata.PackageNotFoundError:
        return  # not installed with .[dev]: the server test says so
    assert installed == seen["psycopg2-binary"]


def test_every_rule_env_exists():
    for smk in (REPO / "rules").glob("*.smk"):
        for rel in re.findall(r'ENV\s*=\s*"([^"]+)"', smk.read_text()):
            assert (smk.parent / rel).exists(), f"{smk.name}: {rel} missing"
    common = (REPO / "rules/common.smk").read_text()
    env = re.search(r'ENV = "([^"]+)"', common).group(1)
    assert (REPO / "rules" / env).resolve().exists()


def test_installed_versions_match_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for name, version in _pins(project["dependencies"]).items():
        installed = metadata.version(name)
        assert installed.split("+")[0] == version, f"{name} {installed} installed, {version} pinned"


def test_cli_is_installed():
    exe = shutil.which("vitablate")
    cmd = [exe, "list"] if exe else [sys.executable, "-m", "vitablate.cli", "list"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "feedforward" in r.stdout and "digits" in r.stdout


def test_timm_internals_vitablate_relies_on():
    """MixingAttention subclasses timm's Attention and rebuilds its forward from these attributes."""
    import inspect

    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    a = Attention(16, num_heads=2)
    for attr in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim",
                 "scale", "attn_dim", "gate", "fused_attn"):
        assert hasattr(a, attr), f"timm Attention lost .{attr}"
    for cls in (Block, VisionTransformer):
        params = inspect.signature(cls.__init__).parameters
        assert "attn_layer" in params and "mlp_layer" in params


def test_cli_runs_one_job_in_process(tmp_path):
    """`vitablate job <config.json>` (no --ray): the job runs here and its record is written."""
    from vitablate import workflow as vw
    from vitablate.cli import main
    from vitablate.config import to_dict

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["results_dir"] = str(tmp_path / "results")
    config["execution"]["dry_jobs"] = True
    cfg_path, record = tmp_path / "config.json", tmp_path / "record.json"
    cfg_path.write_text(json.dumps(to_dict(vw.architecture_job(config, "digits", "identity", 0))))
    assert main(["job", str(cfg_path), "--record", str(record)]) == 0
    assert json.loads(record.read_text())["mixer"] == "identity"

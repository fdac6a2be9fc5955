"""Packaging: pyproject.toml states ranges (timm alone exact), constraints.txt the exact versions tested, which
CI and the conda env install; the CLI is installed; what vitablate reaches inside of timm is still there (fails
first when timm moves)."""

import json
import re
import tomllib
from importlib import metadata

import yaml

from conftest import REPO


TIMM_PIN = "1.0.31"  # the timm whose internals vitablate subclasses (pyproject.toml pins it exactly)


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(lines):
    """{name: Requirement} of requirement strings (comments and pip options left out)."""
    from packaging.requirements import Requirement

    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[_name(req.name)] = req
    return out


def _constraints():
    return {name: str(next(iter(req.specifier)).version)
            for name, req in _requirements((REPO / "constraints.txt").read_text().splitlines()).items()}


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_pyproject_states_ranges_and_pins_only_timm():
    """A lab's CUDA build of torch survives `pip install -e .`: torch and torchvision are ranges from the
    oldest release with every API vitablate uses; timm alone is exact."""
    from packaging.version import Version

    deps = _requirements(_project()["dependencies"])
    exact = {n for n, r in deps.items() if any(s.operator == "==" for s in r.specifier)}
    assert exact == {"timm"}, f"only timm is pinned exactly; these are too: {exact - {'timm'}}"
    assert str(deps["timm"].specifier) == f"=={TIMM_PIN}"
    for name, floor, older in (("torch", "2.4", "2.3.1"), ("torchvision", "0.19", "0.18.1")):
        spec = deps[name].specifier
        assert spec.contains(Version(floor)) and not spec.contains(Version(older)), f"{name}{spec}"


def test_constraints_pin_every_dependency_within_its_range():
    """constraints.txt (tools/freeze-constraints.py) holds one exact version of every direct dependency and
    extra, each inside pyproject.toml's range."""
    from packaging.version import Version

    project, pins = _project(), _constraints()
    reqs = dict(_requirements(project["dependencies"]))
    for extra in project["optional-dependencies"].values():
        reqs.update(_requirements(extra))
    for name, req in reqs.items():
        assert name in pins, f"{name} is missing from constraints.txt: tools/freeze-constraints.py > constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_conda_env_installs_the_repository_under_the_constraints():
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env_file in envs:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert "-e ../" in pip, f"{env_file.name} does not install vitablate"
        constraint = next(line for line in pip if line.startswith("-c "))
        assert (env_file.parent / constraint[3:].strip()).resolve() == (REPO / "constraints.txt").resolve()
        python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
        assert f"python {python.split('=')[1]}" in (REPO / "constraints.txt").read_text().splitlines()[0]


def test_ci_installs_with_the_constraints():
    run = (REPO / ".ci/run").read_text()
    assert 'pip install -q -c constraints.txt -e ".[dev]"' in run and "--durations=25" in run


def test_installed_versions_match_constraints():
    """Where the tests run, what is installed is what constraints.txt says was tested."""
    pins = _constraints()
    for name in _requirements(_project()["dependencies"]):
        installed = metadata.version(name)
        assert installed.split("+")[0] == pins[name], f"{name} {installed} installed, constraints.txt has {pins[name]}"


def test_extras_agree():
    """psycopg2-binary (the MLflow server's PostgreSQL driver) is in `server` and in `dev` (the tests start a
    server) with one range."""
    extras = _project()["optional-dependencies"]
    server, dev = _requirements(extras["server"]), _requirements(extras["dev"])
    assert str(server["psycopg2-binary"].specifier) == str(dev["psycopg2-binary"].specifier)


def test_every_rule_env_exists():
    for smk in (REPO / "rules").glob("*.smk"):
        for rel in re.findall(r'ENV\s*=\s*"([^"]+)"', smk.read_text()):
            assert (smk.parent / rel).exists(), f"{smk.name}: {rel} missing"
    common = (REPO / "rules/common.smk").read_text()
    env = re.search(r'ENV = "([^"]+)"', common).group(1)
    assert (REPO / "rules" / env).resolve().exists()


def test_cli_is_installed(capsys):
    """The console script points at vitablate.cli:main (checked through the installed metadata, without paying
    a second interpreter's imports), and `vitablate list` names what a config can name."""
    from vitablate.cli import main

    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("vitablate") == "vitablate.cli:main", "pip install -e . has not been run here"
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "feedforward" in out and "digits" in out


def _timm_moved(what: str) -> str:
    installed = metadata.version("timm")
    return (f"timm {installed} (vitablate is written against timm=={TIMM_PIN}, pinned in pyproject.toml): {what}. "
            "vitablate.models.mixers.MixingAttention and the factory's block_fn/attn_layer/mlp_layer classes must "
            "follow timm before the pin moves")


def test_timm_internals_vitablate_relies_on():
    """What vitablate subclasses or hands to timm, exactly: Attention's attributes and forward (MixingAttention
    rebuilds it), the keyword arguments Block gives attn_layer and mlp_layer, and those VisionTransformer gives
    block_fn (FeedForwardBlock). Fails here, with the pinned version, before any model test does."""
    import inspect

    import torch
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    from vitablate.models.mixers import MixingAttention

    a = Attention(16, num_heads=2)
    for attr in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim",
                 "scale", "attn_dim", "gate", "fused_attn"):
        assert hasattr(a, attr), _timm_moved(f"Attention lost .{attr}")
    forward = list(inspect.signature(Attention.forward).parameters)
    assert forward[:4] == ["self", "x", "attn_mask", "is_causal"], _timm_moved(f"Attention.forward{forward}")
    for cls, names in ((Block, ("attn_layer", "mlp_layer")),
                       (VisionTransformer, ("block_fn", "attn_layer", "mlp_layer"))):
        params = inspect.signature(cls.__init__).parameters
        assert all(n in params for n in names), _timm_moved(f"{cls.__name__}.__init__ lacks one of {names}")

    # MixingAttention's own forward (capture on) is timm's attention computed by hand: the same output
    torch.manual_seed(0)
    m = MixingAttention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 5, 16)
    timm_out = Attention.forward(m, x)
    m.capture = True
    assert torch.allclose(m(x), timm_out, atol=1e-5), _timm_moved("Attention.forward computes something else")

    # the keyword arguments timm builds the pieces with
    seen = {}

    def recorder(key, base):
        class Recorded(base):
            def __init__(self, *args, **kwargs):
                seen[key] = set(kwargs)
                super().__init__(*args, **kwargs)
        return Recorded

    Block(16, 2, attn_layer=recorder("attn", Attention), mlp_layer=recorder("mlp", Mlp))
    assert {"num_heads", "attn_drop", "proj_drop", "norm_layer"} <= seen["attn"], \
        _timm_moved(f"attn_layer gets {seen['attn']}")
    assert {"hidden_features", "act_layer", "drop"} <= seen["mlp"], _timm_moved(f"mlp_layer gets {seen['mlp']}")
    VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, block_fn=recorder("block", Block))
    assert {"dim", "num_heads", "mlp_ratio", "proj_drop", "attn_drop", "drop_path", "norm_layer", "act_layer",
            "mlp_layer", "attn_layer"} <= seen["block"], _timm_moved(f"block_fn gets {seen['block']}")
    assert metadata.version("timm") == TIMM_PIN, _timm_moved("another version is installed")


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

"""The project shell: one dependency list, entry points that exist, the layout's import rule."""
import ast
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _deps():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_conda_and_python_env_mirror_pyproject():
    deps = _deps()
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip_deps == deps
    assert yaml.safe_load((ROOT / "python_env.yaml").read_text())["dependencies"] == deps


def test_torch_pinned_to_the_local_wheels():
    deps = _deps()
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_every_entry_point_has_its_module():
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    for name, ep in mlproject["entry_points"].items():
        module = ep["command"].split("python -m ")[1].split()[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{name}: {module} missing"
        for param in ep.get("parameters", {}):
            assert "{" + param + "}" in ep["command"], f"{name}: parameter {param} unused"


def test_library_packages_never_import_pipelines():
    for pkg in ("models", "data_tools", "analysis"):
        for py in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(py.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.split(".")[0] == "pipelines" for n in names), f"{py} imports pipelines"

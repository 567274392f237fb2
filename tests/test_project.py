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


LAYERS = ("data_tools", "models", "analysis", "pipelines")  # each may import only those before it


def _project_imports(py: Path) -> list[str]:
    """Top-level package of every import in the file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module.split(".")[0])
    return [name for name in found if name in LAYERS]


def test_layers_only_point_down():
    upward = []
    for rank, pkg in enumerate(LAYERS):
        for py in (ROOT / pkg).rglob("*.py"):
            upward += [f"{py.relative_to(ROOT)} imports {name}" for name in _project_imports(py)
                       if LAYERS.index(name) > rank]
    assert not upward, upward


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipelines.train_cv import run_train_cv\n    import analysis.keys\n")
    assert _project_imports(bad) == ["pipelines", "analysis"]


def test_no_file_points_out_of_the_repository():
    """Docs, entry points and code name nothing a user who clones the project lacks: no path that
    climbs out of the clone (the paper is cited by title, the design is docs/DESIGN.md)."""
    leaving = []
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), ROOT / "MLproject", ROOT / "Dockerfile",
                 *ROOT.glob("docker/*"), *[p for pkg in (*LAYERS, "scripts") for p in (ROOT / pkg).rglob("*.py")]]:
        leaving += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                    if "../" in line]
    assert not leaving, leaving

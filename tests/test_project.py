"""The project shell: one dependency list, entry points that exist, the layout's import rule."""
import ast
import os
import tomllib
from pathlib import Path

import pytest
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


def _entry_point_modules() -> dict[str, str]:
    """{entry point: the module its command runs}, e.g. {"train_cv": "pipelines.train_cv"}."""
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    return {name: ep["command"].split("python -m ")[1].split()[0] for name, ep in mlproject["entry_points"].items()}


def test_every_entry_point_has_its_module():
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    modules = _entry_point_modules()
    for name, ep in mlproject["entry_points"].items():
        module = modules[name]
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


def _step_modules() -> dict[str, Path]:
    """{module: file} of the step modules: the modules of `pipelines/` that are MLproject entry points."""
    return {m: ROOT / (m.replace(".", "/") + ".py") for m in _entry_point_modules().values()
            if m.startswith("pipelines.")}


def _config_classes(py: Path) -> set[str]:
    """The dataclasses named `*Config` that the file defines."""
    def name(d):
        d = d.func if isinstance(d, ast.Call) else d
        return d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", None)
    return {n.name for n in ast.walk(ast.parse(py.read_text())) if isinstance(n, ast.ClassDef)
            and n.name.endswith("Config") and any(name(d) == "dataclass" for d in n.decorator_list)}


def _foreign_step_imports(py: Path, module: str, steps: dict[str, Path]) -> list[str]:
    """What the file (the module named `module`) imports from another step module besides that
    module's config class: "pipelines.step.name", or "pipelines.step" for the whole module. Absolute
    and relative imports, function-level ones included."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in steps and a.name != module]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            if source in steps and source != module:
                allowed = _config_classes(steps[source])
                found += [f"{source}.{a.name}" for a in node.names if a.name not in allowed]
            else:  # `from pipelines import train_cv`: the whole step module
                found += [f"{source}.{a.name}" for a in node.names
                          if f"{source}.{a.name}" in steps and f"{source}.{a.name}" != module]
    return found


def test_steps_import_only_configs_from_other_steps():
    """One thin module per step: what steps share lives outside them (e.g. pipelines/generator_runs.py);
    a step (the workflow `main` too) takes nothing from another step but its `*Config` dataclass."""
    steps = _step_modules()
    assert len(steps) == len(_entry_point_modules())  # every entry point is a module of pipelines/
    assert _config_classes(steps["pipelines.train_cv"]) == {"TrainCVConfig"}
    foreign = [f"{py.relative_to(ROOT)} imports {name}" for module, py in steps.items()
               for name in _foreign_step_imports(py, module, steps)]
    assert not foreign, foreign


def test_the_step_check_sees_a_step_importing_another_steps_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from pipelines.train_cv import TrainCVConfig, parent_params\n"
                   "from pipelines.generator_runs import epoch_logger\n"
                   "def f():\n"
                   "    from pipelines import synthesize, common\n"
                   "    import pipelines.report as report\n"
                   "    from .evaluate import EvaluateConfig, main\n"
                   "    from . import predict\n")
    found = _foreign_step_imports(bad, "pipelines.bad", _step_modules())
    assert sorted(found) == ["pipelines.evaluate.main", "pipelines.predict", "pipelines.report",
                             "pipelines.synthesize", "pipelines.train_cv.parent_params"]
    assert _foreign_step_imports(bad, "pipelines.train_cv", _step_modules()) == [
        f for f in found if not f.startswith("pipelines.train_cv")]


def test_no_file_points_out_of_the_repository():
    """Docs, entry points and code name nothing a user who clones the project lacks: no path that
    climbs out of the clone (the paper is cited by title, the design is docs/DESIGN.md)."""
    leaving = []
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), ROOT / "MLproject", ROOT / "Dockerfile",
                 *ROOT.glob("docker/*"), *[p for pkg in (*LAYERS, "scripts") for p in (ROOT / pkg).rglob("*.py")]]:
        leaving += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                    if "../" in line]
    assert not leaving, leaving


def test_a_fast_tier_test_that_starts_a_process_fails():
    """The tiers are a check: in a test not marked slow, starting a process fails it, naming the command
    (conftest.fast_tier_starts_no_process); git, which reads the code version, is the one exception."""
    import subprocess
    import sys
    with pytest.raises(pytest.fail.Exception, match=r"starts a process \(.*python.* -c pass\): mark it"):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(pytest.fail.Exception, match=r"os\.system"):
        os.system("true")
    assert subprocess.run(["git", "--version"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_slow_test_may_start_processes():
    import subprocess
    import sys
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0

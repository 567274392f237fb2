"""Write conda.yaml and python_env.yaml from pyproject.toml's dependency list (the one source)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Generated from [project].dependencies of pyproject.toml by scripts/sync_env_files.py; do not edit.\n"

deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
(ROOT / "conda.yaml").write_text(HEADER + "name: atypical-mitosis-workbench\nchannels:\n  - conda-forge\ndependencies:\n"
                                 "  - python=3.11\n  - pip\n  - pip:\n" + "".join(f'    - "{d}"\n' for d in deps))
(ROOT / "python_env.yaml").write_text(HEADER + 'python: "3.11"\nbuild_dependencies:\n  - pip\n  - setuptools\n'
                                      "dependencies:\n" + "".join(f'  - "{d}"\n' for d in deps))

"""A method in a separate installed package appears through the `kvbench.methods` entry point."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path


def install(pkg, site):
    """pip-install the package folder `pkg` into `site`; the environment that sees it."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=300)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_entry_point_method_is_discovered(tmp_path):
    pkg = tmp_path / "src"
    (pkg / "kvbench_toy").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "kvbench-toy"
        version = "0.0.1"
        [project.entry-points."kvbench.methods"]
        toyplugin = "kvbench_toy:ToyPlugin"
    """))
    (pkg / "kvbench_toy" / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from kvbench import Method, param, register
        from kvbench.methods.full import FullLayer

        @register
        @dataclass(frozen=True)
        class ToyPlugin(Method):
            """toyplugin: the full cache under another name, from another package."""
            name = "toyplugin"
            knob: int = param(3, "a knob", ge=1, le=9)

            def make_layer(self, spec):
                return FullLayer(spec, 256)
    '''))
    env = install(pkg, tmp_path / "site")
    r = subprocess.run([sys.executable, "-m", "kvbench.cli", "methods"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "toyplugin" in r.stdout and "knob" in r.stdout and "<= 9" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import kvbench; print(kvbench.parse_method('toyplugin:knob=4'))"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "toyplugin:knob=4", r.stderr


def test_the_readme_plugin_package_installs_and_registers(tmp_path):
    """README's "Add a method" shows a plugin package's whole pyproject.toml: that file, as printed, must work."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    toml = re.search(r"```toml\n(\[build-system\].*?)```", readme, re.S).group(1)
    pkg = tmp_path / "my-kvbench-method"
    (pkg / "my_package").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(toml)
    (pkg / "my_package" / "__init__.py").write_text("")
    (pkg / "my_package" / "my_method.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from kvbench.api import Method, param
        from kvbench.methods.full import FullLayer

        @dataclass(frozen=True)
        class MyMethod(Method):
            """mymethod: the README's plugin."""
            name = "mymethod"
            knob: int = param(1, "a knob", ge=1)

            def make_layer(self, spec):
                return FullLayer(spec, 256)
    '''))
    env = install(pkg, tmp_path / "site")
    r = subprocess.run([sys.executable, "-c", "import kvbench; print(kvbench.parse_method('mymethod:knob=2'))"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "mymethod:knob=2", r.stderr

"""pyproject lists its packages by hand (actors/ and kernels/ install under rayinfer.*): every package directory
must be in that list, or a non-editable install (what users get from `pip install .`) lacks it."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_directory_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setup = tomllib.load(f)["tool"]["setuptools"]
    where = {os.path.normpath(d): name for name, d in setup["package-dir"].items()}
    found = set()
    for top, name in where.items():
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(d, os.path.join(ROOT, top))
                found.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    assert "rayinfer.openai" in found and "rayinfer.kernels" in found
    assert found == set(setup["packages"]), (found - set(setup["packages"]), set(setup["packages"]) - found)

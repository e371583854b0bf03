"""Build hook: copy the top-level YAML data folders into the wheel (everything else is in pyproject.toml).

``eval/`` (benchmark tasks) and ``adapters/`` (PEFT recipes, accelerate configs) stay top-level in the source
tree, their only source of truth. ``build_py`` copies their YAML files to ``vlmkit/_shipped/<folder>/`` in the
*build* folder, so a wheel (``pip wheel .``, ``pip install .``, ``python -m build``) carries them and
``vlmkit.resources.data_dir`` finds them after installation. Editable installs read the source folders
directly. ``MANIFEST.in`` puts the folders into the sdist, so a wheel built from the sdist has them too.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = "_shipped"
DATA_FOLDERS = {"eval": ("*.yaml", "*.yml"), "adapters": ("*.yaml", "*.yml")}  # = vlmkit.resources.DATA_FOLDERS


def _data_files():
    """(source file, path relative to the package) for every YAML file of the data folders."""
    for name, patterns in DATA_FOLDERS.items():
        folder = HERE / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: the {name}/ data folder is missing; the wheel would ship no {name} YAMLs")
        for pattern in patterns:
            for src in sorted(folder.rglob(pattern)):
                yield src, Path(SHIPPED) / name / src.relative_to(folder)


class build_py_with_data(build_py):
    """``build_py`` that also copies the YAML data folders into ``<build_lib>/vlmkit/_shipped/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # editable installs read eval/ and adapters/ in place
            return
        package = Path(self.build_lib) / "vlmkit"
        shutil.rmtree(package / SHIPPED, ignore_errors=True)  # a reused build folder keeps no deleted YAML
        for src, rel in _data_files():
            dst = package / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        package = Path(self.build_lib) / "vlmkit"
        return [*outputs, *(str(package / rel) for _, rel in _data_files())]


setup(cmdclass={"build_py": build_py_with_data})

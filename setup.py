"""Build hook: the wheel carries the top-level `templates/` and `site/` folders.

They stay at the top of the checkout (the design names them there) and are copied to
`saev_report/_assets/` in the built package, where `render/site.py` looks first.
Everything else is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSET_FOLDERS = ("templates", "site")


class BuildPyWithAssets(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout itself
            return
        for folder in ASSET_FOLDERS:
            self.copy_tree(str(Path(__file__).parent / folder), str(Path(self.build_lib) / "saev_report" / "_assets" / folder))


setup(cmdclass={"build_py": BuildPyWithAssets})

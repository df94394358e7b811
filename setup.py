"""Adds `llamafactory_mca.pth` to the root of the built wheel.

Python executes `import` lines of every .pth file in site-packages at start-up, in every process
(torchrun children included). That line is how `USE_MCA=1` takes effect without touching LLaMA-Factory.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "llamafactory_mca.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join("llamafactory_mca", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})

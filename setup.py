"""The build steps pyproject.toml cannot declare: the container's init, a C executable.

`sbx-init` (sandbox/runtime/native/) is linked beside the `_spawn` extension by the same
build_ext command, so `pip install -e .` (or a wheel) builds both; the spawner finds it next
to its own module. Linked statically: an idle init then maps no shared library, and its
private memory is only the pages it touches (see docs/architecture.md, "Processes").
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

NATIVE = Path("sandbox/runtime/native")
INIT_SOURCES = [str(NATIVE / f"{name}.c") for name in ("main", "init", "channel", "child",
                                                       "helper", "hostopen", "mapper", "mounts",
                                                       "proctitle", "rootfs", "scratch",
                                                       "mp")]
INIT = Path("sandbox/runtime/sbx-init")
INIT_CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
               "-fno-strict-aliasing"]
INIT_LDFLAGS = ["-static"]


class BuildExtAndInit(build_ext):
    def run(self) -> None:
        super().run()
        built = Path(self.build_lib) / INIT
        objects = self.compiler.compile(INIT_SOURCES, output_dir=self.build_temp,
                                        extra_postargs=INIT_CFLAGS)
        self.compiler.link_executable(objects, built.name, output_dir=str(built.parent),
                                      extra_postargs=INIT_LDFLAGS)
        if self.inplace:
            self.copy_file(str(built), str(INIT), level=self.verbose)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), str(INIT if self.inplace else
                                             Path(self.build_lib) / INIT)]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping[str(Path(self.build_lib) / INIT)] = str(INIT)
        return mapping


setup(cmdclass={"build_ext": BuildExtAndInit})

"""The C part: everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("qtap_devtools.assemble._headparse", ["qtap_devtools/assemble/_headparse.c"],
                  extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"]),
    ],
)

"""The C part: everything else is in pyproject.toml."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(f"qtap_devtools.{name.replace('/', '.')}", [f"qtap_devtools/{name}.c"],
                  depends=["qtap_devtools/_capi.h"], extra_compile_args=FLAGS)
        for name in ("assemble/_headparse", "capture/_ringread")
    ],
)

"""The compiled parts (listed in qtap_devtools/compiled.py); everything else is in pyproject.toml."""

import runpy

from mypyc.build import mypycify
from setuptools import Extension, setup

compiled = runpy.run_path("qtap_devtools/compiled.py")
FLAGS = ["-O2", "-Wall", "-Werror=implicit-function-declaration"]

extensions = [
    Extension(f"qtap_devtools.{name.replace('/', '.')}", [f"qtap_devtools/{name}.c"],
              depends=[f"qtap_devtools/{h}" for h in compiled["C_HEADERS"]], extra_compile_args=FLAGS)
    for name in compiled["C_PARTS"]
] + mypycify(
    # Type-check only what is compiled: the rest of the package imports
    # libraries without type stubs (docker, kubernetes, bcc).
    ["--follow-imports=silent", "--ignore-missing-imports"]
    + [f"qtap_devtools/{name}.py" for name in compiled["MYPYC_MODULES"]],
    group_name=f"qtap_devtools.{compiled['MYPYC_GROUP']}",
    opt_level="3",
)
# A build that fails (no compiler) warns and installs anyway: the Python runs
# instead, and compiled.py (doctor, the tests) says so.
for ext in extensions:
    ext.optional = True

setup(ext_modules=extensions)

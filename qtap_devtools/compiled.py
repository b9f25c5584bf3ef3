"""What runs compiled, and whether it is built and current.

Two kinds, both built by ``make setup`` (``setup.py``):
- hand-written C parts, each with the Python it mirrors kept as the reference
  (and a test comparing the two), except the ring watchdog, which must run
  without the GIL (without it the ring reader runs as an equal);
- modules mypyc compiles from their own Python source: the hot path of every
  transaction (reassembly, the pipeline, the event model, the store, the
  fan-out and its filters).  Nothing is duplicated: the ``.py`` is the code.

Without a compiler the agent runs the Python (correct, slower).  A built
module shadows its ``.py``, so one edited after the build would still run the
old code: :func:`stale` names those, ``make setup`` rebuilds them, and the
test suite and ``doctor`` refuse to pass over them quietly.

``QTAP_INTERPRETED=1`` in the environment runs the mypyc modules from their
``.py`` even when built (tracebacks with every line, a debugger that steps
in; the suite also uses it to keep the interpreted path tested).

Standard library only: ``setup.py`` and ``scripts/setup.sh`` run this file
before the project's dependencies exist (``python3 compiled.py`` prints what
needs a build and exits 1).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Mapping

PACKAGE = Path(__file__).resolve().parent
C_PARTS = {"assemble/_headparse": "head parser", "capture/_ringread": "ring reader", "_b64": "base64 encoder",
           "_jsonw": "JSON writer", "capture/_watchdog": "ring watchdog"}
C_HEADERS = ("_capi.h", "_b64enc.h")  # in the package's top directory, shared by the C parts
MYPYC_MODULES = (
    "assemble/http1_parse", "assemble/http1", "assemble/http2", "assemble/offsets", "assemble/hpack_decode", "assemble/model",
    "assemble/body",
    "pipeline", "publisher", "events", "store", "broadcast", "filters", "ids", "capture/chunk", "enrich/model",
)
MYPYC_GROUP = "_native"  # mypyc's shared runtime for the group: qtap_devtools/_native__mypyc
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def _sources(name: str) -> list[Path]:
    if name in C_PARTS:
        return [PACKAGE / f"{name}.c", *(PACKAGE / h for h in C_HEADERS)]
    return [PACKAGE / f"{name}.py"]


def _built(name: str) -> Path:
    return PACKAGE / f"{name}{SUFFIX}"


def everything() -> list[str]:
    return [*C_PARTS, *MYPYC_MODULES, f"{MYPYC_GROUP}__mypyc"]


def missing() -> list[str]:
    return [name for name in everything() if not _built(name).exists()]


def stale() -> list[str]:
    """Built modules older than a source they were built from."""
    out = []
    for name in [*C_PARTS, *MYPYC_MODULES]:
        built = _built(name)
        if built.exists() and any(src.stat().st_mtime > built.stat().st_mtime for src in _sources(name)):
            out.append(name)
    return out


def describe() -> tuple[bool, str]:
    """(all built and current, one line saying so or what is not)."""
    gone, old = missing(), stale()
    if not gone and not old:
        return True, f"{len(C_PARTS)} C parts and {len(MYPYC_MODULES)} mypyc modules built and current"
    parts = []
    if gone:
        parts.append(f"not built (Python runs instead: correct, slower): {', '.join(gone)}")
    if old:
        parts.append(f"older than their source (the old build would run): {', '.join(old)}")
    return False, "; ".join(parts)


class _SourceFirst:
    """A meta-path finder that loads the mypyc modules from their ``.py``."""

    def find_spec(self, fullname, path=None, target=None):
        from importlib.util import spec_from_file_location

        prefix = __package__ or "qtap_devtools"
        if not fullname.startswith(prefix + "."):
            return None
        name = fullname[len(prefix) + 1:].replace(".", "/")
        if name not in MYPYC_MODULES:
            return None
        return spec_from_file_location(fullname, PACKAGE / f"{name}.py")


def running_note(environ: Mapping[str, str]) -> str | None:
    """A start-up line when the agent runs slower than it could, else None."""
    if environ.get("QTAP_INTERPRETED"):
        return "QTAP_INTERPRETED is set: the compiled modules run as Python (about half as fast)"
    ok, detail = describe()
    return None if ok else f"compiled parts: {detail}; `make setup` builds them"


def run_source_instead(environ: Mapping[str, str]) -> bool:
    """Asked to (``QTAP_INTERPRETED``), or needed: a module mypyc built
    cannot import without its group's runtime, which a partial build (say, one
    that ran out of memory half-way) may have left out."""
    return bool(environ.get("QTAP_INTERPRETED")) or not _built(f"{MYPYC_GROUP}__mypyc").exists()


def prefer_source() -> None:
    if not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


if __name__ == "__main__":
    ok, line = describe()
    print(line)
    sys.exit(0 if ok else 1)

"""Seed 003's ``curl | jq`` recipes, run verbatim through a shell.

Each recipe streams forever (``curl -sN``), so a test runs it in its own
session, lets it read what the agent has to say, then ends the ``curl`` in
that session: the rest of the pipeline drains and prints, as it does when a
user presses Ctrl-C on a long capture.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

SEED = Path(__file__).parent / "fixtures" / "seed003_recipes.md"


def recipes() -> dict[str, str]:
    """Title → shell text of each recipe in the seed's Examples section."""
    text = SEED.read_text()
    found = re.findall(r"### (.+?)\n\n```bash\n(.*?)```", text, re.S)
    return {title: body for title, body in found}


def clients(port: int = 10001) -> int:
    """Streams the agent has ever opened: a count that only grows, so a new
    stream is seen even while an earlier client is going away."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return json.load(resp)["clientsTotal"]


def run_recipe(script: str, cwd: Path, port: int = 10001, settle: float = 1.0, until=None,
               deadline: float = 60.0, during=None) -> str:
    """Run ``script``; once its curl is connected, call ``during()`` (make the
    traffic the recipe should see), wait for ``until()`` (or ``settle``
    seconds), then end curl and return what the pipeline printed.

    Raises if the recipe's curl never connected: a recipe that saw nothing
    must not pass for one that filtered everything out."""
    before = clients(port)
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    try:
        end = time.monotonic() + deadline
        while clients(port) <= before and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
        if clients(port) <= before:
            raise AssertionError(f"the recipe's curl never connected to :{port} (exit {proc.poll()})")
        if during is not None:
            during()
        if until is None:
            time.sleep(settle)
        else:
            while not until() and time.monotonic() < end:
                time.sleep(0.1)
            time.sleep(0.3)  # let the last events reach curl
        subprocess.run(["pkill", "-TERM", "-s", str(proc.pid), "-x", "curl"], check=False)
        out, err = proc.communicate(timeout=deadline)
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out


def json_docs(text: str) -> list:
    """Parse jq's output: a sequence of pretty-printed JSON documents."""
    dec = json.JSONDecoder()
    docs, i = [], 0
    text = text.strip()
    while i < len(text):
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)
        while i < len(text) and text[i].isspace():
            i += 1
    return docs

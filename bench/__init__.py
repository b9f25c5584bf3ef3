"""``make bench``: what the agent costs the traced programs, and how much it carries.

One run measures, on loopback, nginx (TLS, keep-alive) driven by wrk under
several setups in turn — untraced, the count-only uprobe floor in both attach
modes, bcc's ``sslsniff`` and the agent in both attach modes — and prints
ratios against the untraced baseline measured in the same run.  ``bench.soak``
drives a million transactions through the agent and watches its memory.
"""

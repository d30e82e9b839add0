"""``make bench``: the service against the stack's own ceilings (see ``bench/runner.py``).

A harness of the repository, not part of the installed package: it runs from the
repository's root (``python -m bench``) and uses ``loadtest`` and ``app`` as installed.
"""

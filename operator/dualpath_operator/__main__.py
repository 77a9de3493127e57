"""``python -m dualpath_operator [kopf run options]``: run the operator.

Equivalent to ``kopf run --standalone -m dualpath_operator.handlers [options]`` (what the Helm chart
runs); extra options such as ``--namespace``/``--all-namespaces``, ``--liveness`` and ``--verbose`` are
passed to Kopf unchanged. Process settings come from ``DUALPATH_OPERATOR_*`` variables
(:class:`dualpath_operator.settings.OperatorConfig`).
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not any(
        a in ("--namespace", "-n", "--all-namespaces", "-A") or a.startswith("--namespace=") for a in args
    ):
        args = [*args, "--all-namespaces"]
    sys.argv = ["kopf", "run", "--standalone", "-m", "dualpath_operator.handlers", *args]
    runpy.run_module("kopf", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

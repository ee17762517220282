"""Demo upstreams and the bundled config behind `bastion demo`.

`run_demo` is imported lazily so `python -m bastion.demo.origin` does not import its own
module twice (runpy warns when a package imports the module it is about to run).
"""

from __future__ import annotations

__all__ = ["run_demo"]


def run_demo() -> int:
    """Start the demo origins and a gateway in front of them; block until Ctrl-C."""
    from bastion.demo.runner import run_demo as _run_demo

    return _run_demo()

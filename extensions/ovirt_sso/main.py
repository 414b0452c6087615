"""Entry point of the oVirt guest agent extension (run by the qga core with python3).

The bundle holds this file, the ``ovirt_agent`` package, ``sso.py`` (single
sign-on) and ``qga_ext_sdk.py`` (a copy of :mod:`qga.ext.sdk`), all beside
each other: Python puts this file's directory first on ``sys.path``.
"""

import sys

from ovirt_agent.runner import main

if __name__ == "__main__":
    sys.exit(main())

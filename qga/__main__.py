import sys

from qga.cli import main

sys.exit(main())

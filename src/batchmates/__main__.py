"""``python -m batchmates``: the same as the ``batchmates`` command."""

import sys

from batchmates.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the built application: the same `studio` command a pip install gives (window, CLI, self-test)."""

import multiprocessing
import sys

from studio.cli.main import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())

"""`python -m tfgpt.prepare`: the command of tfgpt/data/prepare.py under its short name."""

import sys

from tfgpt.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())

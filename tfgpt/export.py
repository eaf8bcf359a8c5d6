"""`python -m tfgpt.export`: the command of tfgpt/serving/export.py under its short name."""

import sys

from tfgpt.serving.export import main

if __name__ == "__main__":
    sys.exit(main())

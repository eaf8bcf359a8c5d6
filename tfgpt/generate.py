"""`python -m tfgpt.generate`: the command of tfgpt/serving/generate.py under its short name."""

import sys

from tfgpt.serving.generate import main

if __name__ == "__main__":
    sys.exit(main())

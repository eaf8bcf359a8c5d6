"""`python -m tfgpt.evaluate`: the command of tfgpt/serving/evaluate.py under its short name."""

import sys

from tfgpt.serving.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Train the miniature GPT. `python train.py --help` lists the flags."""

import sys

from tfgpt.cli import main

if __name__ == "__main__":
    sys.exit(main())

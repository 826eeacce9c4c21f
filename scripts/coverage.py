#!/usr/bin/env python
"""Regenerate docs/COVERAGE.md: every causal-LM architecture in transformers through autodeploy.

    python scripts/coverage.py                      # all model types, 2 at a time, writes docs/COVERAGE.md
    python scripts/coverage.py --only llama,gpt2    # a few, printed only

Same as ``autodeploy coverage`` (see ``autodeploy/commands/coverage.py`` for the options).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from autodeploy.cli import main

    sys.exit(main(["coverage", *sys.argv[1:]]))

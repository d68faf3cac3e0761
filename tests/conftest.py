"""Shared test set-up: make the flat top-level modules and tools/ importable."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Goldens and key lists copied from the functional specification (REFERENCE.md section 13).
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")

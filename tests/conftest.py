"""Shared test set-up: make the flat top-level modules and tools/ importable."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SPEC_DIR = os.path.join(os.path.dirname(ROOT), "shared", "spec")

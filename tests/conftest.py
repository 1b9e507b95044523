"""Test-wide setup: make the repository root and tests/ importable.

Test directories have no __init__.py (rootdir-relative layout); ``import support`` finds
tests/support.py and ``import node`` the package under test.
"""

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

for path in (str(REPO_ROOT), str(TESTS_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

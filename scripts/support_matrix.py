"""Rewrite docs/SUPPORT_MATRIX.md and README.md's matrix from a fresh run of tests/test_architectures.py.

The matrix is never written by hand: the architecture tests record each parity outcome and
refusal, and their last test renders them. Under the environment variable below that test
writes the files before comparing; a plain pytest run only compares, so CI fails on a stale matrix.

    python scripts/support_matrix.py        # a few minutes on CPU
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITE_ENV = "INFERCEPT_WRITE_SUPPORT_MATRIX"  # read by tests/test_architectures.py


def main() -> int:
    env = dict(os.environ, **{WRITE_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_architectures.py"]
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    print("wrote docs/SUPPORT_MATRIX.md and README.md's matrix" if code == 0 else "some architecture tests failed; see above")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Run a command and print `exit status: N` after its output, then exit 0.

lit's `not` only tells zero from non-zero; the CLI promises 2 for bad input and 1 for a
failed check, so tests that pin the number pipe this through FileCheck:

    python exit_status.py sgdgen emit ... 2>&1 | filecheck %s
"""

import subprocess
import sys

status = subprocess.run(sys.argv[1:]).returncode
sys.stdout.flush()
print(f"exit status: {status}")

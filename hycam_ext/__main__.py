"""python -m hycam_ext: environment, binary contents and a self-test of every op (see _selftest)."""
import sys

from ._selftest import main

try:
    sys.exit(main())
except BrokenPipeError:  # `python -m hycam_ext | head`: the reader left, nothing to report
    sys.stderr.close()
    sys.exit(1)

"""python -m hycam_ext: environment, binary contents and a self-test of every op (see _selftest)."""
import sys

from ._selftest import main

sys.exit(main())

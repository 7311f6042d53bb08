"""`python -m vitx_fast` is the `vitx` command."""
import sys

from vitx_fast.cli import main

sys.exit(main())

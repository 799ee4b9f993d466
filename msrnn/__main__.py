"""`python -m msrnn ...` is the `msrnn` command."""
import sys

from .cli import main

sys.exit(main())

"""`python -m lmx_gateway …` is the `lmx` command."""

import sys

from lmx_gateway.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["serve"]))

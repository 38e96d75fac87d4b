"""`python -m permkv.serve [options]`: the same as `permkv serve [options]`."""

import sys

from permkv.serve.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])

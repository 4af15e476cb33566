"""A module for the runner's tests: reports how it was started, then exits with the code it is given."""

import json
import multiprocessing
import os
import sys

if __name__ == "__main__":
    print("PROBE " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("KD_PROBE"),
                                 "start_method": multiprocessing.get_start_method(), "main": __name__}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[-1]))

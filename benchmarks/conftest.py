import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("benchmarks time real code paths: unset TRITON_INTERPRET")

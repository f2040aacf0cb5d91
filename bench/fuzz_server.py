"""A long schemathesis run against the server: the CI test in tests/test_openapi.py
(test_schemathesis_bounded_run) with many more generated requests (positive and negative, fixed seed)
against every operation of a server running a tiny random model with the real tokenizer and a 64-token
context. It passes with 0 x 5xx and every reply's status, content type and body as the OpenAPI document
declares.

    .venv/bin/python bench/fuzz_server.py [CASES_PER_OPERATION_AND_MODE]   # default 250: ~6,000 requests
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 250
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LLMKIT_OPENAPI_CASES": str(cases)}
    test = "tests/test_openapi.py::test_schemathesis_bounded_run"
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test],
                             cwd=root, env=env))

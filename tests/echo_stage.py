"""Run by tests/test_stage_zygote.py as `python -m tests.echo_stage <arg>`, forked and as a real
process: what a stage sees (cwd, argv, environment, sys.path[0], __name__), then an exit of the
argument's choosing."""
import json
import os
import sys
import time

print(json.dumps({"cwd": os.getcwd(), "argv": sys.argv[1:], "echo": os.environ.get("KVF_FAULT"),
                  "path0": sys.path[0], "name": __name__}))
print("a line on stderr", file=sys.stderr)
arg = sys.argv[1]
if arg == "raise":
    raise RuntimeError("an uncaught error")
if arg == "sleep":
    time.sleep(60)
sys.exit(int(arg) if arg.isdigit() else arg)

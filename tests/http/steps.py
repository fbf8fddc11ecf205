"""A job program for the HTTP tests: progress in steps of 20 %, a pause between them."""

import json
import sys
import time

for percent in (0, 20, 40, 60, 80):
    print(json.dumps({"progress": percent, "message": f"step {percent // 20 + 1}/5"}),
          flush=True)
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0.2)
print(json.dumps({"result": {"steps": 5}}), flush=True)

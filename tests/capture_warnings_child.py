"""Run ``astrea <args>`` in a fresh process and print every warning it raised as one JSON line.

Both kinds are caught: Python warnings (all categories, every occurrence) and WARNING-level log
records of the libraries astrea drives (transformers logs through its own logger, once per
process, which is why this runs in a fresh process). Used by tests/test_trained_folders.py.
"""

import json
import logging
import sys
import warnings

LOGGERS = ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "torch", "astrea_vlm", "")
records = []


class Collect(logging.Handler):
    def emit(self, record):
        records.append({"logger": record.name, "message": record.getMessage()})


for name in LOGGERS:
    logging.getLogger(name).addHandler(Collect(level=logging.WARNING))

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from astrea_vlm.cli import main

    rc = main(sys.argv[1:])

found = [{"category": w.category.__name__, "message": str(w.message), "where": f"{w.filename}:{w.lineno}"} for w in caught]
print("CAPTURED " + json.dumps({"rc": rc, "warnings": found, "logs": records}))

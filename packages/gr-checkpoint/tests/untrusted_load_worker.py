"""Fresh process: load each checkpoint given into a fresh model (and Adam); print one JSON line per path
with the error type and message (or "loaded")."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

import gr_checkpoint


def main() -> None:
    results = {}
    for path in sys.argv[1:]:
        model = nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters())
        try:
            gr_checkpoint.load(path, model, optimizer)
            results[path] = ["loaded", ""]
        except Exception as error:  # the test checks which error, and its message
            results[path] = [type(error).__name__, str(error)]
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()

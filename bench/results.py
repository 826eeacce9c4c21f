"""The benches' output: every measurement printed as one JSON line and, with the header, rewritten to a file.

``JsonResults(path, header)``: ``add(record)`` stamps ``t_s`` (seconds since the start), prints the record (less
the keys in ``quiet``, for long lists) and rewrites ``path`` with ``{**header, "results": [...]}``, so a run cut
short by a time limit keeps everything measured before. ``emit(phase, **fields)`` is ``add`` of a phase record.
"""

from __future__ import annotations

import json
import time
from typing import Any


class JsonResults:
    def __init__(self, path: str | None, header: dict[str, Any], quiet: tuple[str, ...] = ()):
        self.path, self.start, self.quiet = path, time.time(), quiet
        self.doc = {**header, "results": []}

    def elapsed(self) -> float:
        return time.time() - self.start

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "t_s": round(self.elapsed(), 1)}
        print(json.dumps({k: v for k, v in record.items() if k not in self.quiet}, default=str), flush=True)
        self.doc["results"].append(record)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.doc, f, indent=1, default=str)
        return record

    def emit(self, phase: str, **fields: Any) -> dict[str, Any]:
        return self.add({"phase": phase, **fields})

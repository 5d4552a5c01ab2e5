"""How every benchmark under bench/ ends: its figures one per line, then all of them as one JSON line for scripts."""

from __future__ import annotations

import json


def print_figures(results: dict) -> None:
    width = max(len(key) for key in results) + 2
    for key, value in results.items():
        print(f"{key:<{width}} {value:10.4f}" if isinstance(value, float) else f"{key:<{width}} {value}")
    print(json.dumps(results))

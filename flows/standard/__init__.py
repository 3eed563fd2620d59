"""The standard flows as flow files (``*.flow.yaml``) and their JSON Schema.

``edgesieve run telemetry.flow.yaml`` finds them here when no such file is
in the current directory.
"""

from pathlib import Path

__all__ = ["STANDARD_DIR"]

STANDARD_DIR = Path(__file__).parent
"""Where the standard flow files and ``flow.schema.json`` are."""

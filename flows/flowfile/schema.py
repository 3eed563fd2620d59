"""Write the flow file's JSON Schema: ``python -m flows.flowfile.schema`` (after a model change)."""

from flows.flowfile import schema_text
from flows.standard import STANDARD_DIR

if __name__ == "__main__":
    path = STANDARD_DIR / "flow.schema.json"
    path.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {path}")

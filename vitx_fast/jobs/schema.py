"""The result store's tables. docs/batch.md §3.

results: one row per (image, method, target). The unit of work and of exactly-once is the
(image, method, options_digest, model_id, target_spec) group of rows: it is written whole, in one shard, and a job
skips it when the store holds it.
errors: one row per failed unit (stage "decode" | "explain" | "write") with the reason.
records: what an executor's worker returns to the writer, a result or an error per row (`error` null for results).
"""
from __future__ import annotations

import pyarrow as pa

UNIT = ("image", "method", "options_digest", "model_id", "target_spec")

RESULTS = pa.schema([
    ("image", pa.string()),  # key: path relative to the input root, or the table's id
    ("method", pa.string()),
    ("options", pa.string()),  # canonical JSON of the resolved options
    ("options_digest", pa.string()),
    ("model", pa.string()),  # the --model argument
    ("model_id", pa.string()),  # name@sha256 of the weights, @pretrained or @random
    ("target_spec", pa.string()),  # top1 | topK | all | classes:3,5
    ("rank", pa.int32()),  # position of the class within the request, 0 = first (best for topK)
    ("num_targets", pa.int32()),  # rows of this unit: a unit is complete when all are present
    ("target", pa.int64()),  # class index (-1 for a model without a head)
    ("logit", pa.float64()),
    ("probability", pa.float64()),  # softmax over the logits
    ("map_height", pa.int32()),
    ("map_width", pa.int32()),
    ("map", pa.list_(pa.float32())),  # raw map, row-major map_height * map_width
    ("heatmap_height", pa.int32()),  # the optional heatmap: null unless the job asked for it
    ("heatmap_width", pa.int32()),
    ("heatmap", pa.list_(pa.uint8())),  # min-max normalised map, bilinear to the model input size, 0..255
    ("image_height", pa.int32()),  # the original image, after EXIF orientation
    ("image_width", pa.int32()),
    ("source", pa.string()),  # the file read, or '<table>#row=<i>'
    ("job_id", pa.string()),
    ("created", pa.timestamp("ms", tz="UTC")),
])

ERRORS = pa.schema([
    ("image", pa.string()),
    ("method", pa.string()),
    ("options_digest", pa.string()),
    ("model_id", pa.string()),
    ("target_spec", pa.string()),
    ("stage", pa.string()),  # decode | explain | write
    ("error", pa.string()),
    ("source", pa.string()),
    ("job_id", pa.string()),
    ("created", pa.timestamp("ms", tz="UTC")),
])

RECORDS = pa.schema(list(RESULTS) + [pa.field("stage", pa.string()), pa.field("error", pa.string())])


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def split_records(records: pa.Table) -> tuple[pa.Table, pa.Table]:
    """records -> (results, errors) tables in the store's schemas."""
    import pyarrow.compute as pc

    records = records.cast(RECORDS) if records.schema != RECORDS else records
    is_error = pc.is_valid(records["error"])
    results = records.filter(pc.invert(is_error)).select(RESULTS.names)
    errors = records.filter(is_error).select(ERRORS.names)
    return results, errors


def unit_keys(table: pa.Table) -> list[tuple]:
    """The unit of every row: [(image, method, options_digest, model_id, target_spec)]."""
    return list(zip(*(table.column(c).to_pylist() for c in UNIT), strict=True)) if table.num_rows else []

"""Files that are never seen half-written: the one durable writer (atomic writes, arrays without
pickle) and settings diffs, shared by run directories, gradient stores and the retraining cache."""

from influencer._kernel.files import (
    atomic_save_array,
    atomic_write_bytes,
    atomic_write_json,
    current_umask,
    describe_changes,
    file_sha256,
    json_roundtrip,
    write_durable,
)

__all__ = [
    "atomic_save_array",
    "atomic_write_bytes",
    "atomic_write_json",
    "current_umask",
    "describe_changes",
    "file_sha256",
    "json_roundtrip",
    "write_durable",
]

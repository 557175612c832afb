//! shapesync-sink-memory (placeholder)

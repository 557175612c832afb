//! shapesync-sink-redis (placeholder)

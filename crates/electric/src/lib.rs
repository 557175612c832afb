//! shapesync-electric (placeholder)

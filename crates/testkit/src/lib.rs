//! shapesync-testkit (placeholder)

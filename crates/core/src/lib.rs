//! shapesync's core: the data model, the `Source` / `Transform` / `Sink` traits,
//! the registry that maps config `type:` names to components, configuration
//! loading, and the pipeline runner. It knows no concrete source or sink.

pub mod change;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fleet;
pub mod lease;
pub mod offset;
pub mod registry;
pub mod relation;
pub mod row;
pub mod runner;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod transform;
pub mod value;

pub use change::{Batch, Change, LogPosition, Operation, ResyncReason};
pub use checkpoint::{Checkpoint, definition_hash};
pub use config::{Config, ConfigError};
pub use error::{BoxError, ErrorCode, find_cause, report};
pub use fleet::Fleet;
pub use lease::{Acquisition, Fence, LeaseInfo, LeaseRequest, LeaseTiming};
pub use offset::{Offset, OpPart, ParseOffsetError};
pub use registry::{
    Claim, PreparedPipeline, Registry, SinkConfig, SourceConfig, SourceContext, Space, TransformConfig,
};
pub use row::{ColumnName, Row};
pub use runner::{Health, Pipeline, PipelineError, PipelineState, PipelineStatus, RunMode};
pub use sink::{ShapeInfo, Sink, SinkContext, SinkError, SinkErrorKind};
pub use source::{ResumePoint, Source, SourceError, SourceErrorKind, SourceEvent, SourceResponse};
pub use transform::{Transform, TransformError};
pub use value::{ColumnType, Schema, TypeError, Value, array_delimiter, parse_value};

/// Re-exported so plugins use the same `async_trait` as the traits they implement.
pub use async_trait::async_trait;

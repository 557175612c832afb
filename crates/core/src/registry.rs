//! The explicit list of component types a binary knows, keyed by the `type:` name
//! used in pipeline files. Built-ins and plugins register the same way.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use figment::value::Value as Node;
use serde::de::DeserializeOwned;

use crate::config::{Config, ConfigError, PipelineSpec, RetrySpec, extract_node, join_key};
use crate::{ShapeInfo, Sink, SinkContext, SinkError, Source, SourceError, Transform};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type BuildSource = Box<dyn FnOnce() -> BoxFuture<Result<Box<dyn Source>, SourceError>> + Send>;
type BuildSink = Box<dyn FnOnce() -> BoxFuture<Result<Arc<dyn Sink>, SinkError>> + Send>;

/// A source's settings. Deserialized with `deny_unknown_fields` from the `source:`
/// mapping minus its `type` key.
#[async_trait]
pub trait SourceConfig: DeserializeOwned + Send + 'static {
    /// Checks what deserializing cannot, without I/O. Error keys are relative to `source`.
    fn check(&self) -> Result<(), ConfigError> {
        Ok(())
    }
    /// The shape this source streams.
    fn shape(&self) -> ShapeInfo;
    /// Creates the source. May do I/O, but must not fail on an unreachable server:
    /// sources retry transient faults themselves.
    async fn build(self, ctx: SourceContext) -> Result<Box<dyn Source>, SourceError>;
}

/// Everything a source is told about where it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceContext {
    /// The pipeline id, for metric labels and logs.
    pub pipeline: String,
}

/// A part of a store that a pipeline's sink writes: two pipelines whose claims overlap
/// would overwrite (and sweep away) each other's rows, so [`Registry::prepare`] refuses
/// them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The store, named without credentials: `redis://host:6379/0`, a file's absolute
    /// path, `postgres://host:5432/db`.
    pub store: String,
    /// The keys or table written in it.
    pub space: Space,
    /// The setting that chooses the space, relative to `sink` (named in the error).
    pub key: String,
    /// Other pipelines may claim the same names with `shared` too: writes there are
    /// idempotent and order-free (a cache key one pipeline invalidates, another may
    /// invalidate as well); an exclusive claim overlapping it is still refused.
    pub shared: bool,
}

/// Keys or names a [`Claim`] covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Space {
    /// Exactly this name (a table, a hash).
    Exact(String),
    /// Every name starting with this (rendered Redis keys).
    Prefix(String),
}

impl Space {
    /// Some name is in both.
    pub fn overlaps(&self, other: &Space) -> bool {
        match (self, other) {
            (Space::Exact(a), Space::Exact(b)) => a == b,
            (Space::Prefix(p), Space::Exact(e)) | (Space::Exact(e), Space::Prefix(p)) => {
                e.starts_with(p.as_str())
            }
            (Space::Prefix(a), Space::Prefix(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
        }
    }

    /// For error messages.
    pub fn describe(&self) -> String {
        match self {
            Space::Exact(name) => format!("`{name}`"),
            Space::Prefix(prefix) => format!("keys starting with `{prefix}`"),
        }
    }
}

impl Claim {
    /// Both claims write some name of one store, and not both as `shared`.
    pub fn overlaps(&self, other: &Claim) -> bool {
        self.store == other.store && !(self.shared && other.shared) && self.space.overlaps(&other.space)
    }
}

/// A sink's settings, from the `sink:` mapping minus its `type` key.
#[async_trait]
pub trait SinkConfig: DeserializeOwned + Send + 'static {
    /// Checks what deserializing cannot, without I/O. Error keys are relative to `sink`.
    fn check(&self, _ctx: &SinkContext) -> Result<(), ConfigError> {
        Ok(())
    }
    /// What this sink writes, so that two pipelines writing the same keys or table are
    /// refused before they start (default: nothing shared — a store of its own).
    fn claims(&self, _ctx: &SinkContext) -> Vec<Claim> {
        Vec::new()
    }
    /// Whether the sink can work from a source that sends no snapshot
    /// ([`ShapeInfo::changes_only`]): one that invalidates or refreshes a cache can; one
    /// that mirrors the shape (the default) cannot, and such a pipeline is refused.
    fn accepts_changes_only(&self) -> bool {
        false
    }
    /// Connects to the store.
    async fn build(self, ctx: SinkContext) -> Result<Arc<dyn Sink>, SinkError>;
}

/// A transform's settings, from one entry of `transforms:` minus its `type` key.
pub trait TransformConfig: DeserializeOwned + Send + 'static {
    /// The transform reads whole rows, so it needs `replica: full` upstream.
    fn needs_full_rows(&self) -> bool {
        false
    }
    /// Creates the transform. Error keys are relative to the list entry.
    fn build(self) -> Result<Box<dyn Transform>, ConfigError>;
}

type SourceCtor =
    Box<dyn Fn(&Node, &str, SourceContext) -> Result<PreparedSource, ConfigError> + Send + Sync>;
type SinkCtor = Box<dyn Fn(&Node, &str, SinkContext) -> Result<PreparedSink, ConfigError> + Send + Sync>;
type TransformCtor =
    Box<dyn Fn(&Node, &str) -> Result<(bool, Box<dyn Transform>), ConfigError> + Send + Sync>;

/// Component types by `type:` name.
#[derive(Default)]
pub struct Registry {
    sources: BTreeMap<String, SourceCtor>,
    sinks: BTreeMap<String, SinkCtor>,
    transforms: BTreeMap<String, TransformCtor>,
}

/// A source whose settings are valid, not yet started.
pub struct PreparedSource {
    /// The shape it streams.
    pub shape: ShapeInfo,
    build: BuildSource,
}

impl PreparedSource {
    /// Creates the source.
    pub async fn build(self) -> Result<Box<dyn Source>, SourceError> {
        (self.build)().await
    }
}

/// A sink whose settings are valid, not yet connected.
pub struct PreparedSink {
    /// The `type:` name.
    pub type_name: String,
    /// What it writes (see [`SinkConfig::claims`]).
    pub claims: Vec<Claim>,
    /// See [`SinkConfig::accepts_changes_only`].
    pub accepts_changes_only: bool,
    build: BuildSink,
}

impl PreparedSink {
    /// Connects the sink.
    pub async fn build(self) -> Result<Arc<dyn Sink>, SinkError> {
        (self.build)().await
    }
}

/// A pipeline whose every part checked out; [`crate::runner`] runs it once built.
pub struct PreparedPipeline {
    /// The pipeline id.
    pub id: String,
    /// Its source.
    pub source: PreparedSource,
    /// Its transforms, in order.
    pub transforms: Vec<Box<dyn Transform>>,
    /// Its sink.
    pub sink: PreparedSink,
    /// Source responses buffered ahead of the sink.
    pub buffer: usize,
    /// Sink retry backoff.
    pub retry: RetrySpec,
    /// The most changes of one unfinished transaction held in memory.
    pub max_transaction_changes: usize,
}

/// Reads the `type:` of the component mapping at `key` and finds its constructor among
/// `known` (of `kind`: source, sink, transform). Returns the constructor, the type name
/// and the mapping without its `type`.
fn lookup<'r, C>(
    known: &'r BTreeMap<String, C>,
    kind: &str,
    node: &Node,
    key: &str,
) -> Result<(&'r C, String, Node), ConfigError> {
    let Node::Dict(tag, dict) = node else {
        return Err(ConfigError::new(key, "expected a mapping with a `type` key"));
    };
    let mut dict = dict.clone();
    let name = match dict.remove("type") {
        Some(Node::String(_, s)) => s,
        Some(_) => return Err(ConfigError::new(join_key(key, "type"), "expected a string")),
        None => return Err(ConfigError::new(join_key(key, "type"), "missing required key")),
    };
    let Some(ctor) = known.get(&name) else {
        let names: Vec<&str> = known.keys().map(String::as_str).collect();
        return Err(ConfigError::new(
            join_key(key, "type"),
            match names.is_empty() {
                true => format!("unknown {kind} type `{name}`; this binary has no {kind} types registered"),
                false => format!("unknown {kind} type `{name}`; this binary knows: {}", names.join(", ")),
            },
        ));
    };
    Ok((ctor, name, Node::Dict(*tag, dict)))
}

/// Every pair of pipelines whose sinks would write the same keys or table.
fn shared_claims(config: &Config, pipelines: &[PreparedPipeline]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (i, later) in pipelines.iter().enumerate() {
        let conflict = pipelines[..i].iter().find_map(|earlier| {
            earlier
                .sink
                .claims
                .iter()
                .find_map(|a| later.sink.claims.iter().find(|b| a.overlaps(b)).map(|b| (earlier, a, b)))
        });
        let Some((earlier, theirs, ours)) = conflict else { continue };
        let spec = &config.pipelines[&later.id];
        let other = &config.pipelines[&earlier.id];
        errors.push(
            ConfigError::new(
                join_key(&join_key(&spec.key, "sink"), &ours.key),
                format!(
                    "writes {} in the same store as pipeline `{}` ({} in {}), which writes {}; each would overwrite and sweep away the other's rows, so give one of them its own `{}`",
                    ours.space.describe(),
                    earlier.id,
                    join_key(&join_key(&other.key, "sink"), &theirs.key),
                    other.file.display(),
                    theirs.space.describe(),
                    ours.key
                ),
            )
            .in_file(&spec.file),
        );
    }
    errors
}

fn relative(e: ConfigError, key: &str) -> ConfigError {
    ConfigError { key: join_key(key, &e.key), ..e }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a source type.
    pub fn source<C: SourceConfig>(&mut self, name: &str) -> &mut Self {
        let ctor: SourceCtor = Box::new(|node, key, ctx| {
            let config: C = extract_node(node, key)?;
            config.check().map_err(|e| relative(e, key))?;
            let shape = config.shape();
            Ok(PreparedSource { shape, build: Box::new(move || Box::pin(config.build(ctx))) })
        });
        self.sources.insert(name.to_owned(), ctor);
        self
    }

    /// Registers a sink type.
    pub fn sink<C: SinkConfig>(&mut self, name: &str) -> &mut Self {
        let type_name = name.to_owned();
        let ctor: SinkCtor = Box::new(move |node, key, ctx| {
            let config: C = extract_node(node, key)?;
            config.check(&ctx).map_err(|e| relative(e, key))?;
            Ok(PreparedSink {
                type_name: type_name.clone(),
                claims: config.claims(&ctx),
                accepts_changes_only: config.accepts_changes_only(),
                build: Box::new(move || Box::pin(config.build(ctx))),
            })
        });
        self.sinks.insert(name.to_owned(), ctor);
        self
    }

    /// Registers a transform type.
    pub fn transform<C: TransformConfig>(&mut self, name: &str) -> &mut Self {
        let ctor: TransformCtor = Box::new(|node, key| {
            let config: C = extract_node(node, key)?;
            let full = config.needs_full_rows();
            Ok((full, config.build().map_err(|e| relative(e, key))?))
        });
        self.transforms.insert(name.to_owned(), ctor);
        self
    }

    /// Types and checks every pipeline of `config`, without I/O. Returns every
    /// problem found, each naming its file and key path.
    pub fn prepare(&self, config: &Config) -> Result<Vec<PreparedPipeline>, Vec<ConfigError>> {
        let mut ready = Vec::new();
        let mut errors = Vec::new();
        for (id, spec) in &config.pipelines {
            match self.prepare_one(id, spec) {
                Ok(p) => ready.push(p),
                Err(e) => errors.push(e.in_file(&spec.file)),
            }
        }
        errors.extend(shared_claims(config, &ready));
        if errors.is_empty() { Ok(ready) } else { Err(errors) }
    }

    /// Prepares only the sink of a pipeline (for `checkpoints` and `reset`).
    pub fn prepare_sink(&self, id: &str, spec: &PipelineSpec) -> Result<PreparedSink, ConfigError> {
        let source = self.prepare_source(id, spec).map_err(|e| e.in_file(&spec.file))?;
        self.prepare_sink_with(id, spec, source.shape).map_err(|e| e.in_file(&spec.file))
    }

    fn prepare_source(&self, id: &str, spec: &PipelineSpec) -> Result<PreparedSource, ConfigError> {
        let key = join_key(&spec.key, "source");
        let (ctor, _, node) = lookup(&self.sources, "source", &spec.source, &key)?;
        ctor(&node, &key, SourceContext { pipeline: id.to_owned() })
    }

    fn prepare_sink_with(
        &self,
        id: &str,
        spec: &PipelineSpec,
        shape: ShapeInfo,
    ) -> Result<PreparedSink, ConfigError> {
        let key = join_key(&spec.key, "sink");
        let (ctor, _, node) = lookup(&self.sinks, "sink", &spec.sink, &key)?;
        ctor(&node, &key, SinkContext { pipeline: id.to_owned(), shape })
    }

    fn prepare_one(&self, id: &str, spec: &PipelineSpec) -> Result<PreparedPipeline, ConfigError> {
        let source = self.prepare_source(id, spec)?;
        let mut transforms = Vec::new();
        for (i, node) in spec.transforms.iter().enumerate() {
            let key = join_key(&spec.key, &format!("transforms.{i}"));
            let (ctor, name, node) = lookup(&self.transforms, "transform", node, &key)?;
            let (needs_full, transform) = ctor(&node, &key)?;
            if needs_full && !source.shape.full_rows {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "transform `{name}` reads whole rows, but updates carry only changed columns; set `replica: full` on the source"
                    ),
                ));
            }
            transforms.push(transform);
        }
        let sink = self.prepare_sink_with(id, spec, source.shape.clone())?;
        if source.shape.changes_only && !sink.accepts_changes_only {
            return Err(ConfigError::new(
                join_key(&spec.key, "source"),
                format!(
                    "sends only changes (`log: changes_only` or `offset: now`), but sink `{}` mirrors the shape and needs its snapshot of existing rows; use `log: full` without `offset`, or a sink that keeps an existing cache instead (`type: redis` with `mode: invalidate` or `mode: refresh`)",
                    sink.type_name
                ),
            ));
        }
        Ok(PreparedPipeline {
            id: id.to_owned(),
            source,
            transforms,
            sink,
            buffer: spec.buffer,
            retry: spec.retry,
            max_transaction_changes: spec.max_transaction_changes,
        })
    }
}

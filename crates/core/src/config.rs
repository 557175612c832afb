//! Pipeline files: YAML read with figment, `${VAR}` interpolation, strict keys,
//! and errors that name the file, the key path and what was expected.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::error::{Actual, Kind};
use figment::providers::{Format, Serialized, Yaml};
use figment::value::Value as Node;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A problem with a configuration file. Its message never contains a configured value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file, when the problem is tied to one.
    pub file: Option<PathBuf>,
    /// Dotted key path, e.g. `pipelines.projects.sink.url`; empty for the whole file.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl ConfigError {
    /// A problem at `key` (no file yet: [`ConfigError::in_file`] adds it).
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { file: None, key: key.into(), message: message.into() }
    }

    /// Attaches the file the key belongs to.
    pub fn in_file(mut self, file: &Path) -> Self {
        self.file.get_or_insert_with(|| file.to_path_buf());
        self
    }
}

/// Joins a parent key path and a child key.
pub fn join_key(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_owned(),
        (_, true) => parent.to_owned(),
        _ => format!("{parent}.{child}"),
    }
}

/// Every setting of the process: the union of all pipeline files given.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Pipelines by id, each remembering the file it came from.
    pub pipelines: BTreeMap<String, PipelineSpec>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere.
    pub metrics: Option<MetricsSpec>,
    /// Stop every pipeline when one fails (default: the others keep running).
    pub fail_fast: bool,
    /// How instances share pipelines (the `lease:` section).
    pub lease: LeaseSpec,
    lease_set: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    pipelines: BTreeMap<String, PipelineFileSpec>,
    /// Taken out (and expanded) before the rest of the file is read; named here so that
    /// an unknown top-level key's error lists it.
    #[serde(default, rename = "templates")]
    _templates: Option<Node>,
    #[serde(default)]
    metrics: Option<MetricsSpec>,
    #[serde(default)]
    fail_fast: bool,
    #[serde(default)]
    lease: Option<LeaseSpec>,
}

/// One entry of `templates:`: a pipeline written once, expanded over values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateSpec {
    /// Variable → its values: a list, or `{file: path}` (one value a line; blank lines
    /// and `#` comments skipped; relative to the pipeline file).
    for_each: BTreeMap<String, Node>,
    /// The pipeline, with `${variable}` where a value goes.
    pipeline: Node,
}

/// `for_each: {var: {file: …}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValuesFile {
    file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFileSpec {
    source: Node,
    #[serde(default)]
    transforms: Vec<Node>,
    sink: Node,
    #[serde(default)]
    buffer: Option<usize>,
    #[serde(default)]
    retry: RetrySpec,
    #[serde(default)]
    max_transaction_changes: Option<usize>,
}

/// The `metrics:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// Address of the HTTP listener, e.g. `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// How long a fault may last before `/readyz` reports it (a silent source, a failing
    /// sink): shorter retries leave a pipeline ready. The default covers Electric's
    /// slowest quiet-table heartbeat (an SSE stream's 60 s timeout, then a 20 s hold).
    #[serde(default = "defaults::ready_grace_ms", deserialize_with = "duration::ms")]
    pub ready_grace_ms: u64,
}

/// The `lease:` section: how instances running the same pipeline files share them.
/// Each pipeline is written by one instance at a time, the holder of its lease (kept
/// in the pipeline's sink); the others stand by and take over when it stops or dies.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSpec {
    /// The lease's time to live in milliseconds: a standby takes over this long after
    /// the owner dies (at once when it stops cleanly). The owner renews it three times
    /// per TTL.
    #[serde(deserialize_with = "duration::ms")]
    pub ttl_ms: u64,
    /// How often a standby asks for a lease, in milliseconds.
    #[serde(deserialize_with = "duration::ms")]
    pub poll_ms: u64,
    /// This instance's id in leases; default `<hostname>-<pid>-<random>`.
    pub instance: Option<String>,
    /// Spread pipelines over the instances that run the same files: each owns at most
    /// its share (pipelines / instances, rounded up), plus pipelines nobody took.
    pub spread: bool,
}

impl Default for LeaseSpec {
    fn default() -> Self {
        LeaseSpec {
            ttl_ms: defaults::LEASE_TTL_MS,
            poll_ms: defaults::LEASE_POLL_MS,
            instance: None,
            spread: true,
        }
    }
}

impl LeaseSpec {
    /// The lease timing this section sets.
    pub fn timing(&self) -> crate::LeaseTiming {
        crate::LeaseTiming {
            ttl: Duration::from_millis(self.ttl_ms),
            poll: Duration::from_millis(self.poll_ms),
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.ttl_ms < 300 {
            return Err(ConfigError::new("lease.ttl_ms", "expected at least 300 (milliseconds)"));
        }
        if self.poll_ms == 0 || self.poll_ms > self.ttl_ms {
            return Err(ConfigError::new("lease.poll_ms", "expected 0 < poll_ms <= ttl_ms (milliseconds)"));
        }
        if self.instance.as_deref().is_some_and(|i| i.is_empty() || i.len() > 200) {
            return Err(ConfigError::new(
                "lease.instance",
                "expected a non-empty id of at most 200 characters",
            ));
        }
        Ok(())
    }
}

/// Sink retry backoff: full jitter, doubling from `initial_ms` up to `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySpec {
    /// First backoff ceiling in milliseconds.
    #[serde(deserialize_with = "duration::ms")]
    pub initial_ms: u64,
    /// Largest backoff ceiling in milliseconds.
    #[serde(deserialize_with = "duration::ms")]
    pub max_ms: u64,
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec { initial_ms: defaults::RETRY_INITIAL_MS, max_ms: defaults::RETRY_MAX_MS }
    }
}

impl RetrySpec {
    /// The backoff ceiling before retry number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let ms = self.initial_ms.saturating_mul(1u64 << attempt.min(32)).min(self.max_ms);
        Duration::from_millis(ms)
    }
}

/// Duration keys: a whole number in the key's own unit (`ttl_ms: 5000`,
/// `timeout_secs: 45`), or text with a unit — `250ms`, `5s`, `2m`, `1h` (`1m30s` too).
/// Use with `#[serde(deserialize_with = …)]` on a `u64` field named for its unit.
pub mod duration {
    use std::time::Duration;

    use serde::Deserialize;
    use serde::de::{self, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Number(u64),
        Text(String),
    }

    /// Parses `250ms`, `5s`, `2m`, `1h`, `1m30s` (or a bare number, in `unit`).
    pub fn parse(text: &str, unit: Duration) -> Result<Duration, String> {
        let text = text.trim();
        if let Ok(n) = text.parse::<u64>() {
            return unit
                .checked_mul(u32::try_from(n).map_err(|_| "is too large".to_owned())?)
                .ok_or_else(|| "is too large".to_owned());
        }
        let bad = || {
            format!("expected a whole number or a duration such as `250ms`, `5s`, `2m`, `1h`, found `{text}`")
        };
        let (mut total, mut rest) = (Duration::ZERO, text);
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let (scale, len) = if rest.starts_with("ms") {
                (Duration::from_millis(1), 2)
            } else if rest.starts_with('s') {
                (Duration::from_secs(1), 1)
            } else if rest.starts_with('m') {
                (Duration::from_secs(60), 1)
            } else if rest.starts_with('h') {
                (Duration::from_secs(3600), 1)
            } else {
                return Err(bad());
            };
            rest = &rest[len..];
            let part = scale.checked_mul(u32::try_from(n).map_err(|_| bad())?).ok_or_else(bad)?;
            total = total.checked_add(part).ok_or_else(bad)?;
        }
        Ok(total)
    }

    fn read<'de, D: Deserializer<'de>>(d: D, unit: Duration) -> Result<Duration, D::Error> {
        match Given::deserialize(d)? {
            Given::Number(n) => parse(&n.to_string(), unit),
            Given::Text(text) => parse(&text, unit),
        }
        .map_err(de::Error::custom)
    }

    /// A key in milliseconds (`…_ms`).
    pub fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let value = read(d, Duration::from_millis(1))?;
        u64::try_from(value.as_millis()).map_err(|_| de::Error::custom("is too large"))
    }

    /// A key in whole seconds (`…_secs`): text with a unit must come to whole seconds.
    pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let value = read(d, Duration::from_secs(1))?;
        if value.subsec_nanos() != 0 {
            return Err(de::Error::custom("expected whole seconds (this key counts seconds)"));
        }
        Ok(value.as_secs())
    }
}

/// Every default value of the pipeline settings, in one place.
pub mod defaults {
    /// Source responses buffered ahead of the sink.
    pub const BUFFER: usize = 1;
    /// First sink-retry backoff ceiling.
    pub const RETRY_INITIAL_MS: u64 = 100;
    /// Largest sink-retry backoff ceiling.
    pub const RETRY_MAX_MS: u64 = 30_000;
    /// The most changes of one transaction held in memory while its end has not arrived
    /// (~0.5–1 GB of rows): a server that never ends a transaction cannot fill memory.
    pub const MAX_TRANSACTION_CHANGES: usize = 1_000_000;
    /// A pipeline lease's time to live.
    pub const LEASE_TTL_MS: u64 = 5_000;
    /// How often a standby asks for a lease.
    pub const LEASE_POLL_MS: u64 = 500;
    /// How long a fault may last before `/readyz` turns 503.
    pub const READY_GRACE_MS: u64 = 90_000;

    /// [`READY_GRACE_MS`], for serde.
    pub fn ready_grace_ms() -> u64 {
        READY_GRACE_MS
    }
}

/// One pipeline as written, with its components still untyped: the registry types
/// them by their `type:` key.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// The file it was read from.
    pub file: PathBuf,
    /// `pipelines.<id>`.
    pub key: String,
    /// The `source:` mapping.
    pub source: Node,
    /// The `transforms:` list.
    pub transforms: Vec<Node>,
    /// The `sink:` mapping.
    pub sink: Node,
    /// Source responses buffered ahead of the sink.
    pub buffer: usize,
    /// Sink retry backoff.
    pub retry: RetrySpec,
    /// The most changes of one transaction held while its end has not arrived.
    pub max_transaction_changes: usize,
}

impl Config {
    /// Reads and merges pipeline files, interpolating `${VAR}` from the process environment.
    pub fn load(files: &[PathBuf]) -> Result<Config, ConfigError> {
        Self::load_with_env(files, &|name| std::env::var(name).ok())
    }

    /// As [`Config::load`], with an explicit variable lookup.
    pub fn load_with_env(
        files: &[PathBuf],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        for file in files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| ConfigError::new("", format!("cannot read the file: {e}")).in_file(file))?;
            config.merge(file, &text, env)?;
        }
        Ok(config)
    }

    /// Parses one file's text and adds its pipelines.
    pub fn merge(
        &mut self,
        file: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let (mut spec, templates): (FileSpec, Vec<Expanded>) =
            parse_file(text, env, file).map_err(|e| e.in_file(file))?;
        let mut pipelines: Vec<(String, String, PipelineFileSpec)> = std::mem::take(&mut spec.pipelines)
            .into_iter()
            .map(|(id, p)| (format!("pipelines.{id}"), id, p))
            .collect();
        for (key, id, node) in templates {
            let p: PipelineFileSpec = extract_node(&node, &key).map_err(|e| e.in_file(file))?;
            pipelines.push((key, id, p));
        }
        for (key, id, p) in pipelines {
            let generated = key.starts_with("templates.");
            if !generated && !valid_id(&id) {
                return Err(ConfigError::new(
                    key,
                    "a pipeline id may only hold letters, digits, '_' and '-' (it names keys and metrics)",
                )
                .in_file(file));
            }
            if let Some(other) = self.pipelines.get(&id) {
                return Err(ConfigError::new(
                    key,
                    format!("pipeline id is already defined in {}", other.file.display()),
                )
                .in_file(file));
            }
            let buffer = p.buffer.unwrap_or(defaults::BUFFER);
            let max_transaction_changes =
                p.max_transaction_changes.unwrap_or(defaults::MAX_TRANSACTION_CHANGES);
            if max_transaction_changes == 0 {
                return Err(ConfigError::new(format!("{key}.max_transaction_changes"), "must be at least 1")
                    .in_file(file));
            }
            if buffer == 0 {
                return Err(ConfigError::new(format!("{key}.buffer"), "must be at least 1").in_file(file));
            }
            if p.retry.initial_ms == 0 || p.retry.max_ms < p.retry.initial_ms {
                return Err(ConfigError::new(format!("{key}.retry"), "expected 0 < initial_ms <= max_ms")
                    .in_file(file));
            }
            self.pipelines.insert(
                id,
                PipelineSpec {
                    file: file.to_path_buf(),
                    key,
                    source: p.source,
                    transforms: p.transforms,
                    sink: p.sink,
                    buffer,
                    retry: p.retry,
                    max_transaction_changes,
                },
            );
        }
        if let Some(m) = spec.metrics {
            if self.metrics.as_ref().is_some_and(|old| old != &m) {
                return Err(
                    ConfigError::new("metrics", "already set differently by an earlier file").in_file(file)
                );
            }
            self.metrics = Some(m);
        }
        self.fail_fast |= spec.fail_fast;
        if let Some(lease) = spec.lease {
            lease.check().map_err(|e| e.in_file(file))?;
            if self.lease_set && self.lease != lease {
                return Err(
                    ConfigError::new("lease", "already set differently by an earlier file").in_file(file)
                );
            }
            self.lease = lease;
            self.lease_set = true;
        }
        Ok(())
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads a file: `T` from everything but `templates:`, interpolated with `env`; and each
/// template's pipelines — (key path, pipeline id, pipeline node), one per combination of
/// its values, interpolated with those values first, then `env`.
fn parse_file<T: DeserializeOwned>(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    file: &Path,
) -> Result<(T, Vec<Expanded>), ConfigError> {
    let raw: Node =
        Figment::from(Yaml::string(text)).extract::<Node>().map_err(|e| describe_figment_error(&e, ""))?;
    let mut raw = match raw {
        // An empty file parses as nothing; treat it as an empty mapping.
        Node::Empty(..) => Node::from(figment::value::Dict::new()),
        other => other,
    };
    let templates = match &mut raw {
        Node::Dict(_, dict) => dict.remove("templates"),
        _ => None,
    };
    let node = interpolate_node(raw, "", env)?;
    let spec = extract_node(&node, "")?;
    let expanded = match templates {
        Some(templates) => expand_templates(templates, env, file)?,
        None => Vec::new(),
    };
    Ok((spec, expanded))
}

/// A pipeline a template expanded to: its key path, its id and its mapping.
type Expanded = (String, String, Node);

/// The most pipelines one template may expand to.
const MAX_TEMPLATE_PIPELINES: usize = 10_000;

/// Expands `templates:` into pipelines `<template>.<value>[.<value>…]` (one per
/// combination of the variables' values, in the variables' name order). Errors name the
/// template and, for a pipeline, the values (`templates.t[tenant=acme].pipeline.sink`).
fn expand_templates(
    templates: Node,
    env: &dyn Fn(&str) -> Option<String>,
    file: &Path,
) -> Result<Vec<Expanded>, ConfigError> {
    let templates: BTreeMap<String, Node> = match templates {
        Node::Dict(_, dict) => dict.into_iter().collect(),
        other => {
            return Err(ConfigError::new(
                "templates",
                format!("expected a mapping, found {}", node_kind(&other)),
            ));
        }
    };
    let mut out = Vec::new();
    for (name, node) in templates {
        let key = format!("templates.{name}");
        if !valid_id(&name) {
            return Err(ConfigError::new(
                key,
                "a template name may only hold letters, digits, '_' and '-' (it starts its pipelines' ids)",
            ));
        }
        let spec: TemplateSpec = extract_node(&node, &key)?;
        if spec.for_each.is_empty() {
            return Err(ConfigError::new(
                join_key(&key, "for_each"),
                "name at least one variable and its values",
            ));
        }
        let mut combinations: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (var, values) in &spec.for_each {
            let values_key = join_key(&join_key(&key, "for_each"), var);
            let values = template_values(values, &values_key, env, file)?;
            if values.is_empty() {
                return Err(ConfigError::new(values_key, "expected at least one value"));
            }
            combinations = combinations
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((var.clone(), v.clone()));
                        c
                    })
                })
                .collect();
            if combinations.len() > MAX_TEMPLATE_PIPELINES {
                return Err(ConfigError::new(
                    join_key(&key, "for_each"),
                    format!("expands to more than {MAX_TEMPLATE_PIPELINES} pipelines"),
                ));
            }
        }
        for values in combinations {
            let id = std::iter::once(name.as_str())
                .chain(values.iter().map(|(_, v)| v.as_str()))
                .collect::<Vec<_>>()
                .join(".");
            let named: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let pipeline_key = format!("{key}[{}].pipeline", named.join(","));
            let lookup = |var: &str| {
                values.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()).or_else(|| env(var))
            };
            let node = interpolate_node(spec.pipeline.clone(), &pipeline_key, &lookup)?;
            out.push((pipeline_key, id, node));
        }
    }
    Ok(out)
}

/// A variable's values: a list of strings or numbers, or `{file: path}`. Each must be
/// usable in a pipeline id.
fn template_values(
    node: &Node,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    file: &Path,
) -> Result<Vec<String>, ConfigError> {
    let values: Vec<String> = match node {
        Node::Array(_, items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Node::String(_, s) => {
                    interpolate(s, env).map_err(|m| ConfigError::new(join_key(key, &i.to_string()), m))
                }
                Node::Num(_, n) => n.to_u128().map(|u| u.to_string()).ok_or_else(|| {
                    ConfigError::new(
                        join_key(key, &i.to_string()),
                        "expected a string or a whole number of 0 or more",
                    )
                }),
                other => Err(ConfigError::new(
                    join_key(key, &i.to_string()),
                    format!("expected a string or a number, found {}", node_kind(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Node::Dict(..) => {
            let spec: ValuesFile = extract_node(node, key)?;
            let path = match spec.file.is_absolute() {
                true => spec.file.clone(),
                false => file.parent().unwrap_or(Path::new(".")).join(&spec.file),
            };
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(join_key(key, "file"), format!("cannot read {}: {e}", path.display()))
            })?;
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        }
        other => {
            return Err(ConfigError::new(
                key,
                format!("expected a list of values or `{{file: path}}`, found {}", node_kind(other)),
            ));
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for value in &values {
        if !valid_id(value) {
            return Err(ConfigError::new(
                key,
                format!("value `{value}` cannot be part of a pipeline id: use letters, digits, '_' and '-'"),
            ));
        }
        if !seen.insert(value) {
            return Err(ConfigError::new(key, format!("value `{value}` is given twice")));
        }
    }
    Ok(values)
}

/// Deserializes a configuration node into `T`, reporting errors under `key`.
///
/// Strings are read leniently (`"6379"` fills a number), so interpolated values work.
pub fn extract_node<T: DeserializeOwned>(node: &Node, key: &str) -> Result<T, ConfigError> {
    if !matches!(node, Node::Dict(..)) {
        return Err(ConfigError::new(key, format!("expected a mapping, found {}", node_kind(node))));
    }
    Figment::from(Serialized::defaults(node))
        .extract_lossy::<T>()
        .map_err(|e| describe_figment_error(&e, key))
}

fn node_kind(node: &Node) -> &'static str {
    match node {
        Node::String(..) | Node::Char(..) => "a string",
        Node::Bool(..) => "a boolean",
        Node::Num(..) => "a number",
        Node::Empty(..) => "nothing",
        Node::Dict(..) => "a mapping",
        Node::Array(..) => "a list",
    }
}

/// Turns a figment error into ours, without echoing any configured value.
fn describe_figment_error(e: &figment::Error, key: &str) -> ConfigError {
    let path: Vec<&str> = e.path.iter().map(String::as_str).filter(|p| *p != "default").collect();
    let mut full = key.to_owned();
    for p in &path {
        full = join_key(&full, p);
    }
    let message = match &e.kind {
        Kind::Message(m) => m.clone(),
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {}", actual_kind(actual)),
        Kind::InvalidValue(actual, expected) => format!("expected {expected}, found {}", actual_kind(actual)),
        Kind::InvalidLength(len, expected) => format!("expected {expected}, found {len} items"),
        Kind::UnknownVariant(found, expected) => {
            format!("unknown value `{found}`; expected one of: {}", expected.join(", "))
        }
        Kind::UnknownField(found, expected) => {
            if path.last() != Some(&found.as_str()) {
                full = join_key(&full, found);
            }
            format!("unknown key; expected one of: {}", expected.join(", "))
        }
        Kind::MissingField(field) => {
            full = join_key(&full, field);
            "missing required key".to_owned()
        }
        Kind::DuplicateField(field) => {
            full = join_key(&full, field);
            "key given twice".to_owned()
        }
        other => other.to_string(),
    };
    ConfigError::new(full, message)
}

fn actual_kind(actual: &Actual) -> &'static str {
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit | Actual::Option => "nothing",
        Actual::Seq => "a list",
        Actual::Map => "a mapping",
        _ => "another kind of value",
    }
}

fn interpolate_node(
    node: Node,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Node, ConfigError> {
    Ok(match node {
        Node::String(tag, s) => {
            Node::String(tag, interpolate(&s, env).map_err(|m| ConfigError::new(key, m))?)
        }
        Node::Dict(tag, dict) => {
            let mut out = figment::value::Dict::new();
            for (k, v) in dict {
                let child = interpolate_node(v, &join_key(key, &k), env)?;
                out.insert(k, child);
            }
            Node::Dict(tag, out)
        }
        Node::Array(tag, items) => Node::Array(
            tag,
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| interpolate_node(v, &join_key(key, &i.to_string()), env))
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

/// Expands `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.
///
/// A variable that is unset (and has no default) is an error naming the variable.
pub fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| {
                "unterminated `${` (close it with `}`, or write `$$` for a literal `$`)".to_owned()
            })?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("`${{{name}}}` is not a valid variable name"));
            }
            match (env(name).filter(|v| default.is_none() || !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (give a default with ${{{name}:-value}})"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.internal".into()),
            "EMPTY" => Some(String::new()),
            "PORT" => Some("6380".into()),
            _ => None,
        }
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        c.merge(Path::new("p.yaml"), text, &env).map(|_| c)
    }

    const TEMPLATE: &str = "
templates:
  tenant_projects:
    for_each: {tenant: [acme, globex, initech]}
    pipeline:
      source: {type: electric, url: 'http://${HOST}/v1/shape', table: projects, where: 'tenant = $1', params: {1: '${tenant}'}}
      sink: {type: redis, url: 'redis://h', prefix: '${tenant}:'}
pipelines:
  plain: {source: {type: electric}, sink: {type: memory}}
";

    #[test]
    fn a_template_expands_over_its_values() {
        let c = load(TEMPLATE).unwrap();
        let ids: Vec<&str> = c.pipelines.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            ["plain", "tenant_projects.acme", "tenant_projects.globex", "tenant_projects.initech"]
        );
        let globex = &c.pipelines["tenant_projects.globex"];
        assert_eq!(globex.key, "templates.tenant_projects[tenant=globex].pipeline");
        let text = format!("{:?} {:?}", globex.source, globex.sink);
        assert!(
            text.contains("globex:") && text.contains("db.internal"),
            "values, then the environment: {text}"
        );
        assert!(!text.contains("acme"), "{text}");
        // Two variables: every combination, named in the variables' order.
        let two = "templates:\n  t:\n    for_each: {region: [eu, us], tenant: [a, b]}\n    pipeline: {source: {x: '${region}-${tenant}'}, sink: {y: 1}}\n";
        let ids: Vec<String> = load(two).unwrap().pipelines.into_keys().collect();
        assert_eq!(ids, ["t.eu.a", "t.eu.b", "t.us.a", "t.us.b"]);
    }

    #[test]
    fn template_values_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("shapesync-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tenants.txt"), "# tenants\nacme\n\nglobex\n").unwrap();
        let text = "templates:\n  t:\n    for_each: {tenant: {file: tenants.txt}}\n    pipeline: {source: {x: '${tenant}'}, sink: {y: 1}}\n";
        let mut c = Config::default();
        c.merge(&dir.join("p.yaml"), text, &env).unwrap();
        assert_eq!(c.pipelines.into_keys().collect::<Vec<_>>(), ["t.acme", "t.globex"]);
        let mut c = Config::default();
        let e = c.merge(&dir.join("p.yaml"), &text.replace("tenants.txt", "missing.txt"), &env).unwrap_err();
        assert_eq!(e.key, "templates.t.for_each.tenant.file", "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn template_errors_name_the_template_and_the_value() {
        let bad = |text: &str| load(text).unwrap_err();
        let e = bad(&TEMPLATE.replace("'${tenant}:'", "'${tenant}:${NOPE}'"));
        assert!(e.key.starts_with("templates.tenant_projects[tenant=acme].pipeline.sink.prefix"), "{e}");
        assert!(e.message.contains("NOPE"), "{e}");
        let e = bad(&TEMPLATE.replace("[acme, globex, initech]", "[acme, 'glo bex']"));
        assert_eq!(e.key, "templates.tenant_projects.for_each.tenant");
        assert!(e.message.contains("`glo bex`"), "{e}");
        let e = bad(&TEMPLATE.replace("[acme, globex, initech]", "[acme, acme]"));
        assert!(e.message.contains("twice"), "{e}");
        let e = bad(&TEMPLATE.replace("[acme, globex, initech]", "[acme, 1.5]"));
        assert_eq!(e.key, "templates.tenant_projects.for_each.tenant.1", "{e}");
        let e = bad(&TEMPLATE.replace("[acme, globex, initech]", "[]"));
        assert!(e.message.contains("at least one value"), "{e}");
        let e = bad(&TEMPLATE.replace("for_each", "for_all"));
        assert_eq!(e.key, "templates.tenant_projects.for_all", "{e}");
        let e =
            bad(&TEMPLATE.replace("      sink: {type: redis, url: 'redis://h', prefix: '${tenant}:'}\n", ""));
        assert_eq!(e.key, "templates.tenant_projects[tenant=acme].pipeline.sink", "{e}");
        // A generated id may not clash with a written one.
        let e = bad(&format!("{TEMPLATE}  tenant_projects.acme: {{source: {{}}, sink: {{}}}}\n"));
        assert!(e.key.contains("tenant_projects"), "{e}");
    }

    #[test]
    fn durations_take_units() {
        use std::time::Duration;
        let ms = Duration::from_millis(1);
        assert_eq!(duration::parse("250ms", ms).unwrap(), Duration::from_millis(250));
        assert_eq!(duration::parse("5s", ms).unwrap(), Duration::from_secs(5));
        assert_eq!(duration::parse("1m30s", ms).unwrap(), Duration::from_secs(90));
        assert_eq!(duration::parse("2h", ms).unwrap(), Duration::from_secs(7200));
        assert_eq!(
            duration::parse("700", ms).unwrap(),
            Duration::from_millis(700),
            "a bare number is in the key's unit"
        );
        for bad in ["", "5 s", "5x", "s", "-1s", "1.5s", "ms"] {
            assert!(duration::parse(bad, ms).is_err(), "{bad}");
        }
        let c = load(
            "lease: {ttl_ms: 2s, poll_ms: 250ms}\nmetrics: {listen: '127.0.0.1:1', ready_grace_ms: 1m}\n",
        )
        .unwrap();
        assert_eq!((c.lease.ttl_ms, c.lease.poll_ms), (2000, 250));
        assert_eq!(c.metrics.unwrap().ready_grace_ms, 60_000);
        let c = load("lease: {ttl_ms: 3000}\n").unwrap();
        assert_eq!(c.lease.ttl_ms, 3000, "integers as before");
        let e = load("lease: {ttl_ms: soon}\n").unwrap_err();
        assert_eq!(e.key, "lease.ttl_ms", "{e}");
        assert!(e.message.contains("`250ms`"), "{e}");
    }

    #[test]
    fn interpolation_forms() {
        assert_eq!(interpolate("redis://${HOST}:6379", &env).unwrap(), "redis://db.internal:6379");
        assert_eq!(interpolate("${MISSING:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(interpolate("${EMPTY:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(interpolate("${EMPTY}", &env).unwrap(), "");
        assert_eq!(interpolate("${MISSING:-}", &env).unwrap(), "");
        assert_eq!(interpolate("cost $$5 and $x", &env).unwrap(), "cost $5 and $x");
        assert_eq!(interpolate("${HOST}${PORT}", &env).unwrap(), "db.internal6380");
        let err = interpolate("x ${MISSING} y", &env).unwrap_err();
        assert!(err.contains("MISSING") && err.contains("not set"), "{err}");
        assert!(interpolate("${HOST", &env).is_err());
        assert!(interpolate("${A-B}", &env).is_err());
    }

    const GOOD: &str = "
pipelines:
  projects:
    source:
      type: electric
      url: http://localhost:3000/v1/shape
      table: projects
    sink:
      type: memory
metrics:
  listen: 127.0.0.1:9464
";

    #[test]
    fn reads_a_good_file() {
        let c = load(GOOD).unwrap();
        let p = &c.pipelines["projects"];
        assert_eq!(p.key, "pipelines.projects");
        assert_eq!(p.buffer, defaults::BUFFER);
        assert!(p.transforms.is_empty());
        assert_eq!(c.metrics.unwrap().listen.port(), 9464);
    }

    #[test]
    fn missing_variable_names_its_key_path() {
        let text = GOOD.replace("table: projects", "table: ${TABLE_NAME}");
        let e = load(&text).unwrap_err();
        assert_eq!(e.key, "pipelines.projects.source.table");
        assert!(e.message.contains("TABLE_NAME"), "{e}");
        assert!(e.to_string().starts_with("p.yaml: pipelines.projects.source.table: "), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_at_every_level() {
        let e = load(&GOOD.replace("metrics:", "metricz:")).unwrap_err();
        assert_eq!(e.key, "metricz", "{e}");
        let e = load(&GOOD.replace("    sink:", "    snk: {}\n    sink:")).unwrap_err();
        assert_eq!(e.key, "pipelines.projects.snk", "{e}");
        let e = load(&GOOD.replace("  listen:", "  port: 1\n  listen:")).unwrap_err();
        assert_eq!(e.key, "metrics.port", "{e}");
        assert!(e.message.contains("listen"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key_and_hide_the_value() {
        let e = load(&GOOD.replace("127.0.0.1:9464", "not-an-address-s3cret")).unwrap_err();
        assert_eq!(e.key, "metrics.listen", "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = load(&GOOD.replace("    sink:", "    buffer: lots\n    sink:")).unwrap_err();
        assert_eq!(e.key, "pipelines.projects.buffer", "{e}");
    }

    #[test]
    fn missing_sections_are_named() {
        let e = load("pipelines:\n  p:\n    source: {type: electric}\n").unwrap_err();
        assert_eq!(e.key, "pipelines.p.sink", "{e}");
        assert!(e.message.contains("missing"), "{e}");
    }

    #[test]
    fn malformed_yaml_is_a_clear_error() {
        let e = load("pipelines:\n  p: [unclosed\n").unwrap_err();
        assert_eq!(e.file.as_deref(), Some(Path::new("p.yaml")));
        assert!(!e.message.is_empty());
    }

    #[test]
    fn interpolated_numbers_fill_numeric_keys() {
        let c = load(&GOOD.replace("    sink:", "    buffer: ${PORT}\n    sink:")).unwrap();
        assert_eq!(c.pipelines["projects"].buffer, 6380);
    }

    #[test]
    fn duplicate_and_bad_ids() {
        let mut c = Config::default();
        c.merge(Path::new("a.yaml"), GOOD, &env).unwrap();
        let e = c.merge(Path::new("b.yaml"), GOOD, &env).unwrap_err();
        assert!(e.to_string().contains("already defined in a.yaml"), "{e}");
        let e = load(&GOOD.replace("  projects:", "  \"bad id\":")).unwrap_err();
        assert_eq!(e.key, "pipelines.bad id");
    }

    #[test]
    fn extract_node_reports_nested_paths() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            port: u16,
        }
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            inner: Inner,
        }
        let c = load(&GOOD.replace("type: memory", "type: memory\n      inner: {port: 99999}")).unwrap();
        let e = extract_node::<Outer>(&c.pipelines["projects"].sink, "pipelines.projects.sink").unwrap_err();
        assert!(e.key.starts_with("pipelines.projects.sink"), "{e}");
    }
}

//! The alert rules and the dashboard shipped in `docker/` only use metrics that exist:
//! every `shapesync_…` name they mention is in `core::telemetry::CATALOGUE` (a histogram
//! also as its `_bucket`, `_sum` and `_count` series).

use shapesync_core::telemetry::{CATALOGUE, Kind};

fn names_in(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("shapesync_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn exists(name: &str) -> bool {
    CATALOGUE.iter().any(|m| {
        m.name == name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s) == Some(m.name)))
    })
}

#[test]
fn alert_rules_and_dashboard_only_use_metrics_that_exist() {
    let docker = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docker");
    let mut checked = 0;
    for file in ["alerts.yml", "grafana/dashboards/shapesync.json"] {
        let text = std::fs::read_to_string(format!("{docker}/{file}")).unwrap();
        for name in names_in(&text) {
            assert!(exists(&name), "{file} uses `{name}`, which shapesync does not export");
            checked += 1;
        }
    }
    assert!(checked > 10, "the files name metrics ({checked} found)");
}

#[test]
fn metric_names_follow_prometheus_conventions() {
    for m in CATALOGUE {
        assert!(m.name.starts_with("shapesync_"), "{}", m.name);
        match m.kind {
            Kind::Counter => assert!(m.name.ends_with("_total"), "counter {} ends in _total", m.name),
            _ => assert!(!m.name.ends_with("_total"), "{} is not a counter", m.name),
        }
        assert!(!m.help.is_empty(), "{} has help text", m.name);
    }
}

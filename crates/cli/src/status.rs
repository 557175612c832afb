//! `shapesync status`: one look at a running instance, through the `/status` of its
//! metrics listener — each pipeline's state, rows committed per second (two readings a
//! second apart), lag, last commit and last error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use shapesync_core::Config;

/// How far apart the two readings that give rows/s are.
const SAMPLE: Duration = Duration::from_secs(1);

/// Prints the instance's status; exit 0 when every pipeline is ready, 1 when one is not,
/// 2 when the instance cannot be found or reached.
pub async fn print(files: &[PathBuf], url: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let base = match (url, files.is_empty()) {
        (Some(url), _) => url.trim_end_matches('/').to_owned(),
        (None, false) => match Config::load(files) {
            Ok(Config { metrics: Some(m), .. }) => {
                let mut listen = m.listen;
                if listen.ip().is_unspecified() {
                    listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{listen}")
            }
            Ok(_) => {
                eprintln!("error: the pipeline files set no `metrics.listen`; give the instance with --url");
                return Ok(ExitCode::from(2));
            }
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        (None, true) => {
            eprintln!(
                "error: name the instance: its pipeline files (for `metrics.listen`) or --url http://host:port"
            );
            return Ok(ExitCode::from(2));
        }
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let Some(first) = fetch(&http, &base).await else { return Ok(ExitCode::from(2)) };
    tokio::time::sleep(SAMPLE).await;
    let Some(second) = fetch(&http, &base).await else { return Ok(ExitCode::from(2)) };
    let pipelines = second["pipelines"].as_array().cloned().unwrap_or_default();
    if json {
        println!("{second}");
    } else {
        println!(
            "{:<32} {:<14} {:<8} {:>9} {:>9} {:>12}  LAST ERROR",
            "PIPELINE", "STATE", "OWNED", "ROWS/S", "LAG", "LAST COMMIT"
        );
        for p in &pipelines {
            let id = p["pipeline"].as_str().unwrap_or("?");
            let before = first["pipelines"]
                .as_array()
                .and_then(|all| all.iter().find(|q| q["pipeline"] == p["pipeline"]))
                .and_then(|q| q["changes_committed"].as_u64());
            let rate = match (before, p["changes_committed"].as_u64()) {
                (Some(a), Some(b)) => format!("{:.0}", b.saturating_sub(a) as f64 / SAMPLE.as_secs_f64()),
                _ => "-".to_owned(),
            };
            let secs = |v: &Value| v.as_f64().map_or_else(|| "-".to_owned(), |s| format!("{s:.1}s"));
            let owned = match (p["owned"].as_bool(), p["lease_holder"].as_str()) {
                (Some(true), _) => "yes".to_owned(),
                (_, Some(holder)) => format!("no ({holder})"),
                _ => "no".to_owned(),
            };
            println!(
                "{:<32} {:<14} {:<8} {:>9} {:>9} {:>12}  {}",
                id,
                p["state"].as_str().unwrap_or("?"),
                owned,
                rate,
                secs(&p["lag_secs"]),
                p["last_commit_secs_ago"]
                    .as_f64()
                    .map_or_else(|| "never".to_owned(), |s| format!("{s:.1}s ago")),
                p["last_error"].as_str().unwrap_or("-"),
            );
        }
    }
    let all_ready = pipelines.iter().all(|p| p["ready"].as_bool() == Some(true));
    Ok(if all_ready { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `GET <base>/status`, or `None` after saying why it failed.
async fn fetch(http: &reqwest::Client, base: &str) -> Option<Value> {
    let url = format!("{base}/status");
    let answer = match http.get(&url).send().await {
        Ok(response) if response.status().is_success() => {
            response.json::<Value>().await.map_err(|e| e.to_string())
        }
        Ok(response) => Err(format!("it answered {}", response.status())),
        Err(e) => Err(e.to_string()),
    };
    answer
        .inspect_err(|e| {
            eprintln!("error: cannot read {url}: {e}; is shapesync running there, with `metrics.listen` set?")
        })
        .ok()
}

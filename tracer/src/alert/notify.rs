//! Alert notifications outside the tracer's own output: a command
//! (`--alert-exec`) and an Alertmanager-compatible webhook
//! (`--alert-webhook`). Both run in the background: a slow receiver never
//! delays tracing, and failures are logged, not fatal.

use std::time::Duration;

use serde_json::json;
use tokio::{io::AsyncWriteExt, task::JoinHandle};

use crate::alert::{Alert, Level};

const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Where alerts go besides the sink.
#[derive(Default)]
pub struct Notifier {
    pub exec: Option<String>,
    pub webhook: Option<String>,
    pending: Vec<JoinHandle<()>>,
}

impl Notifier {
    pub fn new(exec: Option<String>, webhook: Option<String>) -> Self {
        Self {
            exec,
            webhook,
            pending: Vec::new(),
        }
    }

    /// Sends `alert` (its JSON line as `json`) without waiting.
    pub fn send(&mut self, alert: &Alert, json: String) {
        self.pending.retain(|h| !h.is_finished());
        if let Some(cmd) = self.exec.clone() {
            let json = json.clone();
            self.pending.push(tokio::spawn(async move {
                if let Err(e) = run_exec(&cmd, json).await {
                    log::warn!("--alert-exec `{cmd}`: {e}");
                }
            }));
        }
        if let Some(url) = self.webhook.clone() {
            let body = alertmanager_payload(alert).to_string();
            self.pending.push(tokio::task::spawn_blocking(move || {
                if let Err(e) = post(&url, &body) {
                    log::warn!("--alert-webhook {url}: {e}");
                }
            }));
        }
    }

    /// Gives notifications in flight a moment to finish before exit.
    pub async fn flush(&mut self, within: Duration) {
        let pending = std::mem::take(&mut self.pending);
        let _ = tokio::time::timeout(within, async {
            for h in pending {
                let _ = h.await;
            }
        })
        .await;
    }
}

async fn run_exec(cmd: &str, json: String) -> std::io::Result<()> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(json.as_bytes()).await?;
        stdin.write_all(b"\n").await?;
    }
    match tokio::time::timeout(EXEC_TIMEOUT, child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                return Err(std::io::Error::other(format!("exited with {status}")));
            }
            Ok(())
        }
        Err(_) => Err(std::io::Error::other(format!(
            "still running after {EXEC_TIMEOUT:?}; killed"
        ))),
    }
}

fn post(url: &str, body: &str) -> Result<(), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .build()
        .into();
    agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .map(|_| ())
}

/// The Alertmanager webhook format (version 4), so receivers written for
/// Alertmanager take tracer alerts unchanged.
pub fn alertmanager_payload(alert: &Alert) -> serde_json::Value {
    let status = if alert.severity == Level::Ok {
        "resolved"
    } else {
        "firing"
    };
    let severity = match alert.severity {
        Level::Ok | Level::Warning => "warning",
        Level::Critical => "critical",
    };
    let culprit = alert
        .top_sites
        .first()
        .and_then(|s| s.culprit())
        .map(|f| f.short())
        .unwrap_or_default();
    let labels = json!({
        "alertname": "TracerOOMRisk",
        "severity": severity,
        "pid": alert.pid.to_string(),
    });
    let ts = humantime::format_rfc3339_millis(alert.ts).to_string();
    let annotations = json!({
        "summary": format!("pid {}: {}", alert.pid, alert.reason),
        "description": format!(
            "usage {} bytes of limit {}; ETA {}; top growing site: {culprit}",
            alert.usage_bytes,
            alert.limit_bytes.map_or("none".into(), |l| l.to_string()),
            alert.eta_s.map_or("none".into(), |e| format!("{e:.0} s")),
        ),
        "culprit": culprit,
    });
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"TracerOOMRisk\", pid=\"{}\"}}", alert.pid),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "tracer",
        "groupLabels": {"alertname": "TracerOOMRisk"},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "",
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": ts,
            "endsAt": if status == "resolved" { ts.clone() } else { "0001-01-01T00:00:00Z".into() },
            "generatorURL": "",
            "fingerprint": format!("{:016x}", u64::from(alert.pid) * 0x9e37_79b9_7f4a_7c15),
        }],
    })
}

//! Alert notifications outside the tracer's own output: a command
//! (`--alert-exec`), Alertmanager's own API (`--alertmanager`, the way
//! Prometheus posts to it) and an Alertmanager-compatible webhook
//! (`--alert-webhook`). All run in the background: a slow or absent
//! receiver never delays tracing. Deliveries to a URL go through a bounded
//! queue of their own and are retried with backoff until they land, so an
//! Alertmanager restarting mid-incident still gets every alert; failures
//! are counted (`tracer_alert_delivery_failures_total`) and logged.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime},
};

use serde_json::json;
use tokio::{io::AsyncWriteExt, sync::mpsc, task::JoinHandle};

use crate::alert::{Alert, Level};

const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries waiting per URL; beyond it the newest is refused (counted).
const QUEUE: usize = 1024;
/// How often a firing alert is sent again (Prometheus's default), and how
/// long Alertmanager keeps it firing without news (four resends, as
/// Prometheus sets `endsAt`).
const RESEND: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Failed delivery attempts since start (each retry counts).
pub fn delivery_failures() -> u64 {
    FAILURES.load(Ordering::Relaxed)
}

/// Where alerts go besides the sink, and what they are labelled with.
#[derive(Clone, Debug, Default)]
pub struct NotifyConfig {
    pub exec: Option<String>,
    pub webhook: Option<String>,
    /// Alertmanager base URLs (`http://am:9093`), each sent every alert.
    pub alertmanagers: Vec<String>,
    /// `--label` pairs, and `container` under `--container`.
    pub labels: Vec<(String, String)>,
}

/// A URL's delivery queue and its worker.
struct Route {
    tx: mpsc::Sender<String>,
    worker: JoinHandle<()>,
}

/// The alert Alertmanager knows as firing: its identity and start.
#[derive(Clone)]
struct Firing {
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    starts_at: SystemTime,
    sent: Instant,
}

/// Sends alerts to the configured receivers.
#[derive(Default)]
pub struct Notifier {
    cfg: NotifyConfig,
    pending: Vec<JoinHandle<()>>,
    routes: BTreeMap<String, Route>,
    firing: Option<Firing>,
}

impl Notifier {
    pub fn new(cfg: NotifyConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Sends `alert` (its JSON line as `json`) without waiting.
    pub fn send(&mut self, alert: &Alert, json: String) {
        self.pending.retain(|h| !h.is_finished());
        if let Some(cmd) = self.cfg.exec.clone() {
            let json = json.clone();
            self.pending.push(tokio::spawn(async move {
                if let Err(e) = run_exec(&cmd, json).await {
                    log::warn!("--alert-exec `{cmd}`: {e}");
                }
            }));
        }
        if let Some(url) = self.cfg.webhook.clone() {
            let body = webhook_payload(alert, &self.cfg.labels).to_string();
            self.deliver(&url, body);
        }
        if self.cfg.alertmanagers.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let (labels, annotations) = alertmanager_alert(alert, &self.cfg.labels);
        let mut batch = Vec::new();
        // A new identity (another severity, another culprit) ends the old
        // alert: Alertmanager matches alerts by their labels.
        if let Some(old) = self.firing.take()
            && (alert.severity == Level::Ok || old.labels != labels)
        {
            batch.push(am_entry(&old.labels, &old.annotations, old.starts_at, now));
        }
        if alert.severity != Level::Ok {
            let starts_at = match &self.firing {
                Some(f) if f.labels == labels => f.starts_at,
                _ => now,
            };
            batch.push(am_entry(&labels, &annotations, starts_at, now + 4 * RESEND));
            self.firing = Some(Firing {
                labels,
                annotations,
                starts_at,
                sent: Instant::now(),
            });
        }
        self.post_alertmanagers(batch);
    }

    /// Re-sends the firing alert when due (each interval): Alertmanager
    /// resolves an alert by itself once its `endsAt` passes without news.
    pub fn tick(&mut self) {
        let Some(f) = self.firing.as_mut() else {
            return;
        };
        if f.sent.elapsed() < RESEND {
            return;
        }
        f.sent = Instant::now();
        let entry = am_entry(
            &f.labels,
            &f.annotations,
            f.starts_at,
            SystemTime::now() + 4 * RESEND,
        );
        self.post_alertmanagers(vec![entry]);
    }

    /// The target is gone (exited, OOM-killed, no longer traced): a firing
    /// alert is resolved.
    pub fn resolve(&mut self) {
        if let Some(f) = self.firing.take() {
            let entry = am_entry(&f.labels, &f.annotations, f.starts_at, SystemTime::now());
            self.post_alertmanagers(vec![entry]);
        }
    }

    fn post_alertmanagers(&mut self, batch: Vec<serde_json::Value>) {
        if batch.is_empty() {
            return;
        }
        let body = serde_json::Value::Array(batch).to_string();
        for base in self.cfg.alertmanagers.clone() {
            let url = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
            self.deliver(&url, body.clone());
        }
    }

    /// Queues `body` for `url`, whose worker posts it until it lands.
    fn deliver(&mut self, url: &str, body: String) {
        let route = self.routes.entry(url.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            Route {
                tx,
                worker: tokio::spawn(post_forever(url.to_string(), rx)),
            }
        });
        if let Err(e) = route.tx.try_send(body) {
            FAILURES.fetch_add(1, Ordering::Relaxed);
            log::warn!("alert to {url} dropped: {QUEUE} deliveries already wait ({e})");
        }
    }

    /// Gives notifications in flight up to `within` to land before exit.
    pub async fn flush(&mut self, within: Duration) {
        let pending = std::mem::take(&mut self.pending);
        // Closing the queues lets each worker end once they are empty.
        let workers: Vec<JoinHandle<()>> = std::mem::take(&mut self.routes)
            .into_values()
            .map(|r| r.worker)
            .collect();
        let done = tokio::time::timeout(within, async {
            for h in pending.into_iter().chain(workers) {
                let _ = h.await;
            }
        })
        .await;
        if done.is_err() {
            log::warn!("alert deliveries still failing after {within:?}: given up at exit");
        }
    }
}

/// Posts each queued body to `url` in order, retrying with exponential
/// backoff (0.5 s to 30 s) until it lands.
async fn post_forever(url: String, mut rx: mpsc::Receiver<String>) {
    while let Some(body) = rx.recv().await {
        let mut backoff = Duration::from_millis(500);
        let mut failures = 0u32;
        loop {
            let (u, b) = (url.clone(), body.clone());
            match tokio::task::spawn_blocking(move || post(&u, &b)).await {
                Ok(Ok(())) => {
                    if failures > 0 {
                        log::info!("alert delivered to {url} after {failures} failed attempts");
                    }
                    break;
                }
                Ok(Err(e)) => {
                    FAILURES.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        log::warn!("alert to {url}: {e}; retrying (attempt {failures})");
                    }
                }
                Err(e) => {
                    log::warn!("alert to {url}: {e}");
                    break;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
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
        .timeout_global(Some(POST_TIMEOUT))
        .build()
        .into();
    agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .map(|_| ())
}

/// This host's name (the `instance` label).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The labels and annotations of `alert` as Alertmanager sees them.
pub fn alertmanager_alert(
    alert: &Alert,
    extra: &[(String, String)],
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let severity = match alert.severity {
        Level::Ok | Level::Warning => "warning",
        Level::Critical => "critical",
    };
    let top = alert.top_sites.first();
    let culprit = top
        .and_then(|s| s.culprit())
        .map(|f| f.short())
        .unwrap_or_default();
    let comm = top
        .and_then(|s| s.process.as_ref())
        .map(|p| p.comm.clone())
        .or_else(|| {
            std::fs::read_to_string(format!("/proc/{}/comm", alert.pid))
                .ok()
                .map(|c| c.trim().to_string())
        })
        .unwrap_or_default();
    let mut labels: BTreeMap<String, String> = [
        ("alertname", "TracerOOMRisk".to_string()),
        ("severity", severity.into()),
        ("instance", hostname()),
        ("pid", alert.pid.to_string()),
        ("comm", comm),
        ("culprit", culprit.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(cg) = &alert.memory.cgroup {
        labels.insert("cgroup".into(), cg.display().to_string());
    }
    for (k, v) in extra {
        labels.insert(k.clone(), v.clone());
    }
    labels.retain(|_, v| !v.is_empty());
    let sites = alert
        .top_sites
        .iter()
        .take(5)
        .map(|s| {
            format!(
                "{} {} B (+{:.0} B/s){}",
                s.culprit()
                    .map_or_else(|| "[unknown]".into(), |f| f.short()),
                s.outstanding_bytes,
                s.growth_bytes_per_s,
                s.process
                    .as_ref()
                    .map_or(String::new(), |p| format!(" in {} ({})", p.comm, p.pid))
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let annotations: BTreeMap<String, String> = [
        ("summary", format!("pid {}: {}", alert.pid, alert.reason)),
        ("reason", alert.reason.clone()),
        (
            "eta",
            alert.eta_s.map_or("none".into(), |e| format!("{e:.0} s")),
        ),
        ("usage_bytes", alert.usage_bytes.to_string()),
        (
            "limit_bytes",
            alert.limit_bytes.map_or("none".into(), |l| l.to_string()),
        ),
        ("top_sites", sites),
        ("culprit", culprit.clone()),
        (
            "description",
            format!(
                "usage {} bytes of limit {}; ETA {}; top growing site: {culprit}",
                alert.usage_bytes,
                alert.limit_bytes.map_or("none".into(), |l| l.to_string()),
                alert.eta_s.map_or("none".into(), |e| format!("{e:.0} s")),
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    (labels, annotations)
}

/// One alert of Alertmanager's `POST /api/v2/alerts` body.
fn am_entry(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    starts_at: SystemTime,
    ends_at: SystemTime,
) -> serde_json::Value {
    let ts = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
    json!({
        "labels": labels,
        "annotations": annotations,
        "startsAt": ts(starts_at),
        "endsAt": ts(ends_at),
        "generatorURL": format!("http://{}/tracer", hostname()),
    })
}

/// The Alertmanager webhook format (version 4), so receivers written for
/// Alertmanager take tracer alerts unchanged.
pub fn webhook_payload(alert: &Alert, extra: &[(String, String)]) -> serde_json::Value {
    let status = if alert.severity == Level::Ok {
        "resolved"
    } else {
        "firing"
    };
    let (labels, annotations) = alertmanager_alert(alert, extra);
    let ts = humantime::format_rfc3339_millis(alert.ts).to_string();
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
            "generatorURL": format!("http://{}/tracer", hostname()),
            "fingerprint": format!("{:016x}", u64::from(alert.pid).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{MemoryState, Scope};
    use std::io::{Read, Write};

    fn alert(severity: Level) -> Alert {
        Alert {
            pid: 42,
            severity,
            reason: "limit reached in ~30 s".into(),
            eta_s: Some(30.0),
            usage_bytes: 900,
            limit_bytes: Some(1000),
            memory: MemoryState {
                scope: Scope::CgroupV2,
                cgroup: Some("/sys/fs/cgroup/app".into()),
                usage_bytes: 900,
                limit_bytes: Some(1000),
                high_bytes: None,
                high_events: None,
                oom_kills: Some(0),
                pressure_some_avg10: None,
            },
            top_sites: Vec::new(),
            target_growth_bytes_per_s: None,
            growing_processes: Vec::new(),
            ts: SystemTime::now(),
        }
    }

    /// A receiver answering each request with the next status of
    /// `statuses` (the last one from then on); the bodies it got.
    fn receiver(statuses: Vec<u16>) -> (String, std::sync::mpsc::Receiver<(u16, String)>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { continue };
                let status = statuses[i.min(statuses.len() - 1)];
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = conn.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            let _ =
                                write!(conn, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                            let _ = tx.send((status, body.to_string()));
                            break;
                        }
                    }
                }
            }
        });
        (url, rx)
    }

    /// An Alertmanager answering 500 twice: the alert is retried until it
    /// lands, the failures counted; then resolved with the same labels.
    #[tokio::test(flavor = "current_thread")]
    async fn failed_deliveries_are_retried_until_they_land_and_counted() {
        let (url, got) = receiver(vec![500, 500, 200]);
        let before = delivery_failures();
        let mut n = Notifier::new(NotifyConfig {
            alertmanagers: vec![url],
            labels: vec![("cluster".into(), "eu1".into())],
            ..NotifyConfig::default()
        });
        n.send(&alert(Level::Warning), String::new());
        n.resolve();
        n.flush(Duration::from_secs(20)).await;
        let all: Vec<(u16, String)> = got.try_iter().collect();
        assert_eq!(
            all.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [500, 500, 200, 200],
            "two failures, the firing alert, then its resolution"
        );
        assert!(delivery_failures() >= before + 2);
        let firing: serde_json::Value = serde_json::from_str(&all[2].1).unwrap();
        let resolved: serde_json::Value = serde_json::from_str(&all[3].1).unwrap();
        let labels = &firing[0]["labels"];
        assert_eq!(labels["alertname"], "TracerOOMRisk");
        assert_eq!(labels["severity"], "warning");
        assert_eq!(labels["pid"], "42");
        assert_eq!(labels["cgroup"], "/sys/fs/cgroup/app");
        assert_eq!(labels["cluster"], "eu1");
        assert_eq!(resolved[0]["labels"], *labels, "resolved as the same alert");
        let ends = |v: &serde_json::Value| {
            humantime::parse_rfc3339(v[0]["endsAt"].as_str().unwrap()).unwrap()
        };
        assert!(ends(&firing) > SystemTime::now() + Duration::from_secs(120));
        assert!(ends(&resolved) <= SystemTime::now());
    }

    /// A webhook that never answers within the timeout, and an
    /// --alert-exec that fails: neither blocks nor panics; the exit gives
    /// up after its grace period.
    #[tokio::test(flavor = "current_thread")]
    async fn a_dead_receiver_and_a_failing_command_do_not_block() {
        // Bound, never accepted: connects, then no answer.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", silent.local_addr().unwrap());
        let mut n = Notifier::new(NotifyConfig {
            exec: Some("exit 3".into()),
            webhook: Some(url),
            ..NotifyConfig::default()
        });
        let started = std::time::Instant::now();
        n.send(&alert(Level::Critical), "{}".into());
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "send never waits"
        );
        n.flush(Duration::from_secs(1)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "exit gives up in time"
        );
        drop(silent);
    }
}

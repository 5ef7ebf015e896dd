//! `/metrics` in the Prometheus/OpenMetrics text format while attached.
//!
//! Every snapshot is rendered once into a fresh registry and the text is
//! swapped in whole, so a scrape always sees one consistent snapshot and sites
//! that fall out of the top N disappear instead of going stale. Label
//! cardinality is bounded: per kind, the `top` sites holding the most get a
//! series of their own, the rest are summed into `site="other"`.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::UNIX_EPOCH,
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::{Attached, EndReason, Exit, Sink};
use crate::{
    alert::{Alert, Level, OomKill},
    schema::{SiteKind, SiteReport, Snapshot, TRUNCATED_STACKS},
};

type Labels = Vec<(&'static str, String)>;
type FGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the latest snapshot's metrics over HTTP.
pub struct PrometheusSink {
    page: Arc<Mutex<String>>,
    state: State,
    server: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

/// What the metrics are rendered from, kept between events.
#[derive(Default)]
struct State {
    top: usize,
    /// `--label` pairs, on every series.
    labels: Vec<(String, String)>,
    /// Under `--cgroup`: its directory, a label of every process's series.
    cgroup: Option<String>,
    /// Every process traced, by pid (a session follows children, a cgroup's
    /// processes).
    procs: std::collections::BTreeMap<u32, Proc>,
}

/// One traced process's last events.
#[derive(Default)]
struct Proc {
    attached: Option<Attached>,
    snapshot: Option<Snapshot>,
    level: Option<Level>,
    alerts: u64,
    oom_kills: u64,
    up: bool,
}

impl PrometheusSink {
    /// Listens on `addr` (must be called inside the tokio runtime). `top`
    /// sites per kind get series of their own.
    pub fn bind(addr: SocketAddr, top: usize, labels: Vec<(String, String)>) -> io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let page = Arc::new(Mutex::new(String::from("# EOF\n")));
        let server = tokio::spawn(serve(listener, page.clone()));
        Ok(Self {
            page,
            state: State {
                top,
                labels,
                ..State::default()
            },
            server,
            addr,
        })
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn publish(&self) -> io::Result<()> {
        let text = render(&self.state).map_err(|_| io::Error::other("cannot render metrics"))?;
        *self.page.lock().unwrap_or_else(|e| e.into_inner()) = text;
        Ok(())
    }
}

impl Drop for PrometheusSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: tokio::net::TcpListener, page: Arc<Mutex<String>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let page = page.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &page)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, page: &Mutex<String>) -> Response<Full<Bytes>> {
    let reply = |status, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            let text = page.lock().unwrap_or_else(|e| e.into_inner()).clone();
            reply(StatusCode::OK, CONTENT_TYPE, text)
        }
        (&hyper::Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "tracer: metrics at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".into(),
        ),
    }
}

/// The site series of every process, per kind: the `top` sites holding the
/// most over all processes, then the rest summed per process
/// (`site="other"`). `who` gives a process's labels.
fn bounded_sites(
    sites: &[(u32, &SiteReport)],
    top: usize,
    who: impl Fn(u32) -> Labels,
) -> Vec<(Labels, SiteSums)> {
    let mut kinds: Vec<SiteKind> = sites.iter().map(|(_, s)| s.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let mut out = Vec::new();
    for kind in kinds {
        let mut of_kind: Vec<&(u32, &SiteReport)> =
            sites.iter().filter(|(_, s)| s.kind == kind).collect();
        // Bytes first; goroutines and timers hold counts, not bytes.
        of_kind.sort_by(|(pa, a), (pb, b)| {
            (b.outstanding_bytes, b.outstanding_count, &a.site_id, pa).cmp(&(
                a.outstanding_bytes,
                a.outstanding_count,
                &b.site_id,
                pb,
            ))
        });
        let mut rest: std::collections::BTreeMap<u32, (SiteSums, usize)> = Default::default();
        for (i, (pid, s)) in of_kind.iter().enumerate() {
            if i < top {
                let function = s
                    .culprit()
                    .map_or_else(|| "[unknown]".to_string(), |f| f.function.clone());
                let mut labels = who(*pid);
                labels.extend([
                    ("kind", kind.to_string()),
                    ("site", s.site_id.clone()),
                    ("function", function),
                ]);
                out.push((labels, SiteSums::of(s)));
            } else {
                let r = rest.entry(*pid).or_default();
                r.0.add(&SiteSums::of(s));
                r.1 += 1;
            }
        }
        for (pid, (sums, others)) in rest {
            let mut labels = who(pid);
            labels.extend([
                ("kind", kind.to_string()),
                ("site", "other".into()),
                ("function", format!("[{others} other sites]")),
            ]);
            out.push((labels, sums));
        }
    }
    out
}

#[derive(Default)]
struct SiteSums {
    bytes: f64,
    objects: f64,
    growth_bytes: f64,
    growth_objects: f64,
}

impl SiteSums {
    fn of(s: &SiteReport) -> Self {
        Self {
            bytes: s.outstanding_bytes as f64,
            objects: s.outstanding_count as f64,
            growth_bytes: s.growth_bytes_per_s,
            growth_objects: s.growth_count_per_s,
        }
    }

    fn add(&mut self, o: &Self) {
        self.bytes += o.bytes;
        self.objects += o.objects;
        self.growth_bytes += o.growth_bytes;
        self.growth_objects += o.growth_objects;
    }
}

/// Registers a gauge family and fills it.
fn gauges(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    values: impl IntoIterator<Item = (Labels, f64)>,
) {
    let family = Family::<Labels, FGauge>::default();
    for (labels, v) in values {
        family.get_or_create(&labels).set(v);
    }
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, family),
        None => reg.register(name, help, family),
    }
}

/// Registers a counter family (the `_total` suffix is added) and fills it.
fn counters(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (labels, v) in values {
        family.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, family);
}

fn render(st: &State) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix_and_labels(
        "tracer",
        st.labels
            .iter()
            .map(|(k, v)| (k.clone().into(), v.clone().into())),
    );
    // Each process's series carry its pid (its command and cgroup with
    // several processes).
    let several = st.procs.len() > 1 || st.cgroup.is_some();
    let who = |pid: u32| -> Labels {
        let mut l: Labels = vec![("pid", pid.to_string())];
        if several {
            let comm = st
                .procs
                .get(&pid)
                .and_then(|p| p.attached.as_ref())
                .map(|a| a.comm.clone())
                .unwrap_or_default();
            l.push(("comm", comm));
            if let Some(cg) = &st.cgroup {
                l.push(("cgroup", cg.clone()));
            }
        }
        l
    };
    let with = |pid: u32, extra: Labels| -> Labels {
        let mut l = who(pid);
        l.extend(extra);
        l
    };
    let procs = || st.procs.iter().map(|(&pid, p)| (pid, p));
    let snaps = || procs().filter_map(|(pid, p)| Some((pid, p.snapshot.as_ref()?)));
    gauges(
        &mut reg,
        "target_up",
        "1 while the target is alive and traced",
        None,
        procs().map(|(pid, p)| (with(pid, vec![]), f64::from(u8::from(p.up)))),
    );
    gauges(
        &mut reg,
        "target_info",
        "The traced process (value 1)",
        None,
        procs().filter_map(|(pid, p)| {
            let a = p.attached.as_ref()?;
            Some((
                with(
                    pid,
                    vec![
                        ("exe", a.exe.clone()),
                        ("go_version", a.go_version.clone().unwrap_or_default()),
                    ]
                    .into_iter()
                    .chain((!several).then(|| ("comm", a.comm.clone())))
                    .collect(),
                ),
                1.0,
            ))
        }),
    );
    gauges(
        &mut reg,
        "probes_attached",
        "Uprobes live in the target",
        None,
        procs().filter_map(|(pid, p)| {
            Some((with(pid, vec![]), p.attached.as_ref()?.probes.len() as f64))
        }),
    );
    counters(
        &mut reg,
        "alerts",
        "OOM-risk alerts raised (warning, critical or resolved)",
        procs().map(|(pid, p)| (with(pid, vec![]), p.alerts)),
    );
    counters(
        &mut reg,
        "oom_kills",
        "OOM kills of the target seen",
        procs().map(|(pid, p)| (with(pid, vec![]), p.oom_kills)),
    );
    counters(
        &mut reg,
        "alert_delivery_failures",
        "Alert deliveries (Alertmanager, --alert-webhook) that failed and were retried or given up",
        [(vec![], crate::alert::notify::delivery_failures())],
    );
    gauges(
        &mut reg,
        "alert_level",
        "Current OOM-risk level: 0 ok, 1 warning, 2 critical",
        None,
        procs().filter_map(|(pid, p)| Some((with(pid, vec![]), p.level? as u8 as f64))),
    );
    let all_sites: Vec<(u32, &SiteReport)> = snaps()
        .flat_map(|(pid, s)| s.sites.iter().map(move |site| (pid, site)))
        .collect();
    let series = bounded_sites(&all_sites, st.top, who);
    let site_gauge = |reg: &mut Registry, name, help, unit, pick: fn(&SiteSums) -> f64| {
        gauges(
            reg,
            name,
            help,
            unit,
            series.iter().map(|(l, s)| (l.clone(), pick(s))),
        );
    };
    site_gauge(
        &mut reg,
        "site_outstanding",
        "Bytes held by a call site (allocated, not yet freed)",
        Some(Unit::Bytes),
        |s| s.bytes,
    );
    site_gauge(
        &mut reg,
        "site_outstanding_objects",
        "Blocks, goroutines or timers held by a call site",
        None,
        |s| s.objects,
    );
    site_gauge(
        &mut reg,
        "site_growth_bytes_per_second",
        "Growth of a site's outstanding bytes over the trend window",
        None,
        |s| s.growth_bytes,
    );
    site_gauge(
        &mut reg,
        "site_growth_objects_per_second",
        "Growth of a site's outstanding objects over the trend window",
        None,
        |s| s.growth_objects,
    );
    let mut per_kind: Vec<(u32, SiteKind, usize, u64)> = Vec::new();
    for (pid, s) in &all_sites {
        match per_kind.iter_mut().find(|k| k.0 == *pid && k.1 == s.kind) {
            Some(k) => {
                k.2 += 1;
                k.3 += s.outstanding_bytes;
            }
            None => per_kind.push((*pid, s.kind, 1, s.outstanding_bytes)),
        }
    }
    gauges(
        &mut reg,
        "sites",
        "Distinct call sites seen, per kind (series beyond the top are summed as site=\"other\")",
        None,
        per_kind
            .iter()
            .map(|k| (with(k.0, vec![("kind", k.1.to_string())]), k.2 as f64)),
    );
    gauges(
        &mut reg,
        "outstanding",
        "Bytes held over all sites, per kind",
        Some(Unit::Bytes),
        per_kind
            .iter()
            .map(|k| (with(k.0, vec![("kind", k.1.to_string())]), k.3 as f64)),
    );
    let memory = || snaps().filter_map(|(pid, s)| Some((pid, s.memory.as_ref()?)));
    gauges(
        &mut reg,
        "memory_usage",
        "Working set of the target's memory cgroup (or the system)",
        Some(Unit::Bytes),
        memory().map(|(pid, m)| (with(pid, vec![]), m.state.usage_bytes as f64)),
    );
    gauges(
        &mut reg,
        "memory_limit",
        "Memory limit that applies to the target",
        Some(Unit::Bytes),
        memory().filter_map(|(pid, m)| Some((with(pid, vec![]), m.state.limit_bytes? as f64))),
    );
    gauges(
        &mut reg,
        "memory_growth_bytes_per_second",
        "Robust trend of memory usage",
        None,
        memory().filter_map(|(pid, m)| Some((with(pid, vec![]), m.growth_bytes_per_s?))),
    );
    gauges(
        &mut reg,
        "oom_eta",
        "Estimated time until the memory limit is reached (absent: not growing)",
        Some(Unit::Seconds),
        memory().filter_map(|(pid, m)| Some((with(pid, vec![]), m.eta_s?))),
    );
    let overhead = || snaps().filter_map(|(pid, s)| Some((pid, s.overhead?)));
    gauges(
        &mut reg,
        "probe_overhead_ratio",
        "Share of the target's CPU time spent in the tracer's probes (traps and eBPF programs)",
        None,
        overhead().map(|(pid, o)| (with(pid, vec![]), o.share_pct / 100.0)),
    );
    gauges(
        &mut reg,
        "probed_calls_per_second",
        "Probed calls per second in the target",
        None,
        overhead().map(|(pid, o)| (with(pid, vec![]), o.calls_per_s)),
    );
    gauges(
        &mut reg,
        "probe_cost_per_call",
        "Cost of one probed call, traps and programs",
        Some(Unit::Seconds),
        overhead().map(|(pid, o)| (with(pid, vec![]), o.ns_per_call / 1e9)),
    );
    // The kernel side's counters are the session's, over every process:
    // shown once, with the first process's labels.
    if let Some((pid, snap)) = snaps().next() {
        let lost = &snap.lost;
        counters(
            &mut reg,
            "lost",
            "What the kernel side could not account, by reason (see the README)",
            lost.described()
                .filter(|(name, _, _)| *name != TRUNCATED_STACKS)
                .map(|(r, v, _)| (with(pid, vec![("reason", r.to_string())]), v)),
        );
        let act = &snap.activity;
        gauges(
            &mut reg,
            "map_fill_ratio",
            "Fill of the kernel maps (0 to 1)",
            None,
            [
                ("addresses", act.addr_map_fill),
                ("sites", act.site_map_fill),
            ]
            .map(|(m, v)| (with(pid, vec![("map", m.to_string())]), v)),
        );
        counters(
            &mut reg,
            "probe_events",
            "Probe hits and what they saw, by event",
            act.counts
                .iter()
                .map(|(e, v)| (with(pid, vec![("event", e.clone())]), *v)),
        );
    }
    gauges(
        &mut reg,
        "truncated_stacks",
        "Sites whose recorded stack lacks its outer frames",
        None,
        snaps().map(|(pid, s)| (with(pid, vec![]), s.lost.get(TRUNCATED_STACKS) as f64)),
    );
    gauges(
        &mut reg,
        "snapshot_timestamp",
        "When the kernel maps behind these values were read",
        Some(Unit::Seconds),
        snaps().map(|(pid, s)| {
            let ts =
                s.ts.duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
            (with(pid, vec![]), ts)
        }),
    );
    let mut text = String::new();
    encode(&mut text, &reg)?;
    Ok(text)
}

impl Sink for PrometheusSink {
    fn attached(&mut self, info: &Attached) -> io::Result<()> {
        let p = self.state.procs.entry(info.pid).or_default();
        p.attached = Some(info.clone());
        p.up = true;
        self.publish()
    }

    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        let p = self.state.procs.entry(snap.pid).or_default();
        p.snapshot = Some(snap.clone());
        if let Some(m) = &snap.memory {
            p.level = Some(m.level);
        }
        self.publish()
    }

    fn target_exited(&mut self, exit: &Exit) -> io::Result<()> {
        self.state.procs.entry(exit.pid).or_default().up = false;
        self.publish()
    }

    fn notice(&mut self, _pid: u32, _message: &str) -> io::Result<()> {
        Ok(())
    }

    fn alert(&mut self, alert: &Alert) -> io::Result<()> {
        let p = self.state.procs.entry(alert.pid).or_default();
        p.alerts += 1;
        p.level = Some(alert.severity);
        self.publish()
    }

    fn oom_kill(&mut self, kill: &OomKill) -> io::Result<()> {
        let p = self.state.procs.entry(kill.pid).or_default();
        p.oom_kills += 1;
        p.up = false;
        self.publish()
    }

    fn finish(&mut self, snap: &Snapshot, _reason: EndReason, _elapsed_s: f64) -> io::Result<()> {
        self.state.procs.entry(snap.pid).or_default().snapshot = Some(snap.clone());
        self.publish()
    }

    fn cgroup(&mut self, totals: &crate::schema::CgroupTotals) -> io::Result<()> {
        if self.state.cgroup.as_ref() != Some(&totals.cgroup) {
            self.state.cgroup = Some(totals.cgroup.clone());
            self.publish()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolize::Frame;

    fn site(kind: SiteKind, id: &str, func: &str, bytes: u64, count: u64) -> SiteReport {
        SiteReport {
            site_id: id.into(),
            kind,
            outstanding_bytes: bytes,
            outstanding_count: count,
            allocs: count,
            frees: 0,
            alloc_bytes: bytes,
            growth_bytes_per_s: 1.5,
            growth_count_per_s: 0.0,
            peak: Default::default(),
            states: Default::default(),
            start_function: None,
            sampled: false,
            truncated: false,
            frames: vec![Frame {
                function: func.into(),
                file: None,
                line: Some(1),
                module: None,
                addr: 0,
                inlined: false,
            }]
            .into(),
            process: None,
        }
    }

    #[test]
    fn labels_stay_bounded_and_nothing_is_dropped() {
        let mut sites: Vec<SiteReport> = (0..1000)
            .map(|i| site(SiteKind::Heap, &format!("{i:012x}"), &format!("f{i}"), i, 1))
            .collect();
        sites.push(site(SiteKind::Goroutine, "g1", "main.worker", 0, 50));
        // Two processes: the top is over both, the rest summed per process.
        let all: Vec<(u32, &SiteReport)> = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (if i % 2 == 0 { 1 } else { 2 }, s))
            .collect();
        let series = bounded_sites(&all, 5, |pid| vec![("pid", pid.to_string())]);
        let heap: Vec<_> = series.iter().filter(|(l, _)| l[1].1 == "heap").collect();
        assert_eq!(heap.len(), 7, "5 top sites and one aggregate per process");
        assert_eq!(heap[0].0[3].1, "f999");
        let others: Vec<_> = heap.iter().filter(|(l, _)| l[2].1 == "other").collect();
        assert_eq!(others.len(), 2);
        let n_other: usize = others
            .iter()
            .map(|(l, _)| {
                l[3].1
                    .trim_start_matches('[')
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
            .sum();
        assert_eq!(n_other, 995);
        let total: f64 = heap.iter().map(|(_, s)| s.bytes).sum();
        assert_eq!(total, (0..1000).sum::<u64>() as f64);
        let g = series.iter().find(|(l, _)| l[1].1 == "goroutine").unwrap();
        assert_eq!(g.1.objects, 50.0);
    }

    #[test]
    fn renders_openmetrics_text() {
        let mut snap = Snapshot {
            ts: UNIX_EPOCH,
            pid: 42,
            sites: vec![site(SiteKind::Heap, "abc", "leak", 10000, 10)],
            lost: Default::default(),
            activity: Default::default(),
            total_outstanding_bytes: 10000,
            memory: None,
            mappings: vec![],
            overhead: None,
            previous_images: vec![],
        };
        snap.lost.0.insert("stacks_lost".into(), 3);
        let mut st = State {
            top: 10,
            labels: vec![("cluster".into(), "eu1".into())],
            ..State::default()
        };
        st.procs.insert(
            42,
            Proc {
                snapshot: Some(snap),
                up: true,
                ..Proc::default()
            },
        );
        let text = render(&st).unwrap();
        assert!(text.contains(
            "tracer_site_outstanding_bytes{cluster=\"eu1\",pid=\"42\",kind=\"heap\",site=\"abc\",function=\"leak\"} 10000.0"
        ), "{text}");
        assert!(
            text.contains("tracer_lost_total{cluster=\"eu1\",pid=\"42\",reason=\"stacks_lost\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tracer_target_up{cluster=\"eu1\",pid=\"42\"} 1.0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}

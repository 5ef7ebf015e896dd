//! Command-line glue: parse arguments, set up logging, run the session, map
//! errors to exit codes.

use std::{
    fs::File,
    io::{self, IsTerminal, Write},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracer::{
    TracerError,
    alert::Thresholds,
    alert::watch::AlertOptions,
    kernel::MapSizes,
    options::Options,
    session,
    sink::{
        Sink, Tee, export::Exports, json::JsonSink, prometheus::PrometheusSink, table::TableSink,
        tui::TuiSink,
    },
};

/// Live allocation tracing of unmodified processes with eBPF uprobes: which
/// call stacks hold memory, and how fast they grow.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More diagnostics on stderr (-v: info and eBPF-side messages, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to a running process.
    Attach {
        /// Process id of the target.
        #[arg(required_unless_present_any = ["cgroup", "container"], conflicts_with_all = ["cgroup", "container"])]
        pid: Option<u32>,
        /// Trace every process of this cgroup directory (v1 or v2, its
        /// child cgroups included), those started or moved in later too.
        #[arg(long, value_name = "DIR", conflicts_with = "container")]
        cgroup: Option<PathBuf>,
        /// Trace every process of this container (its id or a 12+
        /// character prefix, as `docker ps` or `crictl ps` shows it).
        #[arg(long, value_name = "ID")]
        container: Option<String>,
        /// Trace the processes it starts too (fork, posix_spawn), each as a
        /// target of its own, with its pid; and theirs.
        #[arg(long)]
        follow_forks: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Watch a process's memory limit and alert before an OOM kill, without
    /// hooking its allocator (no call sites, no overhead in the target).
    Watch {
        /// Process id of the target.
        pid: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Start a command and trace it from its first allocation.
    Run {
        /// Trace the command alone, not the processes it starts (by default
        /// they are traced too: a shell wrapper is the common case).
        #[arg(long)]
        no_follow_forks: bool,
        #[command(flatten)]
        common: Common,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// Replay a recording (`-f json -o FILE`) afterwards: the final table,
    /// alerts and OOM kill, and the pprof profile or flame graph of its last
    /// snapshot (e.g. after the target was OOM-killed).
    Report {
        /// The JSON Lines file a session wrote.
        file: PathBuf,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// A live table on a terminal, a final report at the end.
    Table,
    /// JSON Lines, one object per line (schema in the README).
    Json,
}

/// Where results go; shared by the live commands and `report`.
#[derive(Args)]
struct Output {
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    format: Format,
    /// Write the output to this file instead of stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Sites shown in the table and the report.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    top: u64,
    /// Write the in-use profile as gzipped pprof (`go tool pprof FILE`), at
    /// the end and on SIGUSR1; goroutine and timer profiles go next to it
    /// (FILE.goroutines.pb.gz, FILE.timers.pb.gz).
    #[arg(long, value_name = "FILE.pb.gz")]
    pprof: Option<PathBuf>,
    /// Write the in-use stacks in folded form (flamegraph.pl, inferno,
    /// speedscope), at the end and on SIGUSR1.
    #[arg(long, value_name = "FILE")]
    folded: Option<PathBuf>,
    /// Write an in-use memory flame graph (SVG), at the end and on SIGUSR1.
    #[arg(long, value_name = "FILE.svg")]
    flamegraph: Option<PathBuf>,
    /// Write a self-contained HTML report (memory against the limit over
    /// time with the alerts and the kill, the top sites over time,
    /// goroutines and timers, the flame graph, the final table with whole
    /// stacks), at the end and on SIGUSR1.
    #[arg(long, value_name = "FILE.html")]
    html: Option<PathBuf>,
    /// Print the plain live table instead of the full-screen view that
    /// `attach` and `watch` show when stdout and stdin are a terminal.
    #[arg(long)]
    no_tui: bool,
}

impl Output {
    /// Export files are written at the end, possibly hours later: refuse a
    /// path whose directory does not exist now rather than lose the result.
    fn validate(&self) {
        use clap::CommandFactory;
        for (flag, path) in [
            ("--pprof", &self.pprof),
            ("--folded", &self.folded),
            ("--flamegraph", &self.flamegraph),
            ("--html", &self.html),
        ] {
            let Some(path) = path else { continue };
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            if !dir.is_dir() {
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ValueValidation,
                        format!(
                            "{flag} {}: the directory {} does not exist",
                            path.display(),
                            dir.display()
                        ),
                    )
                    .exit();
            }
        }
    }

    fn exports(&self) -> Exports {
        Exports {
            pprof: self.pprof.clone(),
            folded: self.folded.clone(),
            flamegraph: self.flamegraph.clone(),
        }
    }

    /// Whether the live view is the full-screen UI: the table format, on a
    /// terminal that can also send keys, not written to a file.
    fn tui(&self) -> bool {
        matches!(self.format, Format::Table)
            && self.output.is_none()
            && !self.no_tui
            && io::stdout().is_terminal()
            && io::stdin().is_terminal()
    }

    /// The terminal or JSON sink: the full-screen UI when `tui` (see
    /// [`Output::tui`]), else the plain table; `metrics` is the metrics
    /// endpoint's URL, which `attached` records tell.
    fn sink(
        &self,
        labels: &[(String, String)],
        tui: bool,
        metrics: Option<String>,
    ) -> anyhow::Result<Box<dyn Sink>> {
        let (out, interactive): (Box<dyn Write>, bool) = match &self.output {
            Some(path) => (
                Box::new(io::BufWriter::new(File::create(path).with_context(
                    || format!("cannot create the output file {}", path.display()),
                )?)),
                false,
            ),
            None => (Box::new(io::stdout()), io::stdout().is_terminal()),
        };
        let main: Box<dyn Sink> = match self.format {
            Format::Json => Box::new(JsonSink::new(out).with_labels(labels).with_metrics(metrics)),
            Format::Table if tui => {
                Box::new(TuiSink::new(self.top as usize).context("cannot take over the terminal")?)
            }
            Format::Table => Box::new(TableSink::new(out, interactive, self.top as usize)),
        };
        Ok(match &self.html {
            Some(path) => Box::new(Tee(vec![
                main,
                Box::new(tracer::sink::html::HtmlSink::new(path.clone())),
            ])),
            None => main,
        })
    }
}

#[derive(Args)]
struct Common {
    #[command(flatten)]
    output: Output,
    /// Serve Prometheus metrics at http://ADDR/metrics while tracing (e.g.
    /// 127.0.0.1:9464). Port 0 picks a free port: the JSON `attached`
    /// records give the URL (field `metrics`).
    #[arg(long, value_name = "ADDR")]
    prometheus: Option<SocketAddr>,
    /// Sites per kind with series of their own in the metrics; the rest are
    /// summed into site="other" (bounds the label cardinality).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    prometheus_sites: u64,
    /// Seconds between snapshots.
    #[arg(short, long, default_value = "1", value_parser = parse_secs)]
    interval: Duration,
    /// Stop after this many seconds (default: until Ctrl-C or the target exits).
    #[arg(short, long, value_parser = parse_secs)]
    duration: Option<Duration>,
    /// Seconds of history over which growth rates are computed.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    trend_window: Duration,
    /// Live blocks the kernel can track at once.
    #[arg(long, default_value_t = tracer_common::DEFAULT_MAX_ALLOCS, value_parser = clap::value_parser!(u32).range(1..))]
    max_allocs: u32,
    /// Distinct call sites the kernel can track.
    #[arg(long, default_value_t = tracer_common::DEFAULT_MAX_SITES, value_parser = clap::value_parser!(u32).range(1..))]
    max_sites: u32,
    /// Distinct stacks the kernel can record.
    #[arg(long, default_value_t = tracer_common::DEFAULT_MAX_STACKS, value_parser = clap::value_parser!(u32).range(1..))]
    max_stacks: u32,
    /// Walk every stack with frame pointers only (the kernel's walker), as
    /// profilers did before DWARF unwinding: a little cheaper for programs
    /// built with frame pointers; code without them gives truncated stacks.
    #[arg(long, conflicts_with = "unwind_rows")]
    frame_pointers_only: bool,
    /// Rows of DWARF unwind tables the kernel holds, for every code file the
    /// target maps without frame pointers (16 bytes each; python3 with libc
    /// needs about 110k). Default: what the files mapped at attach need,
    /// plus room for libraries loaded later.
    #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u32).range(1..))]
    unwind_rows: Option<u32>,
    /// Sample heap allocations by size instead of tracing each one: a block
    /// of s bytes is kept with probability min(1, s/N) and weighs 1/p, so
    /// totals stay unbiased; left-out allocations cost no map update and no
    /// stack walk (e.g. 524288, as pprof). Default: trace every allocation.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=(1u64 << 32) - 1))]
    sample_bytes: Option<u64>,
    /// Keep the probes' cost under this share of the target's CPU time
    /// (percent; about the throughput a CPU-bound service loses): past it,
    /// heap sampling starts or its rate rises; when even the traps on every
    /// entry cost more, the probes are taken off with a notice and only the
    /// memory watch goes on. Default: no bound (the estimate is still shown).
    #[arg(long, value_name = "PCT", value_parser = parse_percent)]
    max_overhead: Option<f64>,
    /// Go heap sampling rate to set in the target, in bytes (default: turn
    /// sampling on at 512 KiB only where the binary has it off).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    go_sample_rate: Option<u64>,
    /// Milliseconds per snapshot spent reading a Go program's goroutine
    /// list: a longer list is read over several snapshots (new goroutines
    /// first). The default keeps a million goroutines under 2% of a core.
    #[arg(long, value_name = "MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    go_census_ms: u64,
    /// Never write to the target's memory (Go heap sampling stays as it is).
    #[arg(long)]
    no_write: bool,
    /// Leave the Go heap sampling rate the tracer set in place when it
    /// detaches (by default the target's own rate is written back).
    #[arg(long, conflicts_with = "no_write")]
    keep_writes: bool,
    /// Also look for separate debug files here (`.build-id/xx/….debug`, or
    /// by debuglink) before /usr/lib/debug; repeatable.
    #[arg(long = "debug-dir", value_name = "DIR")]
    debug_dirs: Vec<PathBuf>,
    /// Warn when the target's memory is estimated to hit its limit within
    /// this many seconds.
    #[arg(long, default_value = "300", value_parser = parse_secs)]
    warn_eta: Duration,
    /// Critical alert when the limit is estimated within this many seconds.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    crit_eta: Duration,
    /// Warn when usage passes this percentage of the limit.
    #[arg(long, default_value = "80", value_parser = parse_percent)]
    warn_usage: f64,
    /// Critical alert when usage passes this percentage of the limit.
    #[arg(long, default_value = "95", value_parser = parse_percent)]
    crit_usage: f64,
    /// Least seconds between two alerts of an unchanged level.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    alert_reminder: Duration,
    /// Seconds of memory history the OOM trend is computed over.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    oom_window: Duration,
    /// Run this shell command for each alert, with the alert's JSON on stdin.
    #[arg(long, value_name = "CMD")]
    alert_exec: Option<String>,
    /// POST each alert to this URL in the Alertmanager webhook format
    /// (retried with backoff until it lands).
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    alert_webhook: Option<String>,
    /// Send alerts to this Alertmanager (`http://host:9093`) through its
    /// API, as Prometheus does: re-sent while firing, resolved when memory
    /// recovers or the target is gone, retried until delivered. Repeat for
    /// each member of an HA pair.
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    alertmanager: Vec<String>,
    /// Add KEY=VALUE to every alert, metric and JSON line (repeatable):
    /// tells nodes, clusters and services apart across a fleet.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// Do not watch the memory limit nor alert.
    #[arg(long)]
    no_alerts: bool,
    /// Processes traced at once (followed children).
    #[arg(long, default_value_t = tracer_common::DEFAULT_MAX_PROCESSES, value_parser = clap::value_parser!(u32).range(1..))]
    max_processes: u32,
    /// Threads that can be inside an allocator call at once.
    #[arg(long, default_value_t = tracer_common::DEFAULT_MAX_THREADS, value_parser = clap::value_parser!(u32).range(1..))]
    max_threads: u32,
    /// Live goroutines (and Go timers) the kernel can track at once.
    #[arg(long, default_value_t = tracer_common::DEFAULT_MAX_GOROUTINES, value_parser = clap::value_parser!(u32).range(1..))]
    max_goroutines: u32,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    let valid = !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && !k.starts_with("__");
    if !valid {
        return Err(format!(
            "`{k}` is not a label name: letters, digits and _, not starting with a digit or __"
        ));
    }
    const TAKEN: [&str; 10] = [
        "pid",
        "comm",
        "cgroup",
        "kind",
        "site",
        "function",
        "reason",
        "event",
        "map",
        "alertname",
    ];
    if TAKEN.contains(&k) {
        return Err(format!("`{k}` is a label the tracer sets itself"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage"))?;
    if !(v > 0.0 && v <= 100.0) {
        return Err(format!("`{s}` must be a percentage between 0 and 100"));
    }
    Ok(v / 100.0)
}

fn parse_url(s: &str) -> Result<String, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.to_string())
    } else {
        Err(format!("`{s}` is not an http:// or https:// URL"))
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        return Err(format!("`{s}` must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

impl Common {
    fn options(&self) -> Options {
        Options {
            interval: self.interval,
            duration: self.duration,
            trend_window: self.trend_window,
            exports: self.output.exports(),
            follow_forks: false,
            labels: self.label.clone(),
            debug_dirs: self.debug_dirs.clone(),
            frame_pointers_only: self.frame_pointers_only,
            go_census_budget: Duration::from_millis(self.go_census_ms),
            max_overhead: self.max_overhead,
            go_sampling: tracer::go::SamplingPolicy {
                rate: self.go_sample_rate,
                no_write: self.no_write,
                keep_writes: self.keep_writes,
            },
            alerts: (!self.no_alerts).then(|| AlertOptions {
                thresholds: Thresholds {
                    warn_eta: self.warn_eta,
                    crit_eta: self.crit_eta,
                    warn_usage: self.warn_usage,
                    crit_usage: self.crit_usage,
                    reminder: self.alert_reminder,
                },
                window: self.oom_window,
                notify: tracer::alert::notify::NotifyConfig {
                    exec: self.alert_exec.clone(),
                    webhook: self.alert_webhook.clone(),
                    alertmanagers: self.alertmanager.clone(),
                    labels: self.label.clone(),
                },
            }),
            sizes: MapSizes {
                allocs: self.max_allocs,
                sites: self.max_sites,
                stacks: self.max_stacks,
                threads: self.max_threads,
                goroutines: self.max_goroutines,
                processes: self.max_processes,
                sample_bytes: self.sample_bytes.unwrap_or(0),
                unwind_rows: self.unwind_rows.unwrap_or(0),
                adaptive_sampling: self.max_overhead.is_some(),
            },
        }
    }

    /// The output sink, with the metrics endpoint next to it when asked.
    /// Must run inside the tokio runtime (the endpoint is a task of it).
    /// The endpoint is bound first: with port 0 the kernel picks a free
    /// one, and the `attached` records tell the URL it got (no port has to
    /// be guessed free and raced for).
    fn sink(&self, labels: &[(String, String)], tui: bool) -> anyhow::Result<Box<dyn Sink>> {
        let Some(addr) = self.prometheus else {
            return self.output.sink(labels, tui, None);
        };
        let metrics = PrometheusSink::bind(addr, self.prometheus_sites as usize, labels.to_vec())
            .map_err(|e| TracerError::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        let url = format!("http://{}/metrics", metrics.local_addr());
        log::info!("serving metrics at {url}");
        let out = self.output.sink(labels, tui, Some(url))?;
        Ok(Box::new(Tee(vec![out, Box::new(metrics)])))
    }
}

impl Common {
    /// Cross-checks clap cannot express; a usage error (exit 2) otherwise.
    fn validate(&self) {
        use clap::CommandFactory;
        self.output.validate();
        let fail = |msg: &str| {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, msg)
                .exit()
        };
        if self.crit_usage < self.warn_usage {
            fail("--crit-usage must not be below --warn-usage");
        }
        for dir in &self.debug_dirs {
            if !dir.is_dir() {
                fail(&format!(
                    "--debug-dir {}: no such directory; give a directory holding debug files",
                    dir.display()
                ));
            }
        }
        if self.crit_eta > self.warn_eta {
            fail("--crit-eta must not exceed --warn-eta");
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Attach { common, .. }
        | Command::Watch { common, .. }
        | Command::Run { common, .. } => common.validate(),
        Command::Report { output, .. } => output.validate(),
    }
    // -v: what the tracer does (plan, attach, each snapshot); -vv: its
    // debugging detail; -vvv: the libraries' too (aya's relocation log alone
    // is hundreds of lines).
    let (level, libraries) = match cli.verbose {
        0 => (log::LevelFilter::Warn, log::LevelFilter::Warn),
        1 => (log::LevelFilter::Info, log::LevelFilter::Warn),
        2 => (log::LevelFilter::Debug, log::LevelFilter::Info),
        _ => (log::LevelFilter::Trace, log::LevelFilter::Debug),
    };
    // `run`'s command shares the terminal (its output would land in the
    // view, and raw mode would take its keys and line endings): the plain
    // table. A replayed report has nothing live to show.
    let tui = match &cli.command {
        Command::Attach { common, .. } | Command::Watch { common, .. } => common.output.tui(),
        Command::Run { .. } | Command::Report { .. } => false,
    };
    let mut logger = env_logger::Builder::new();
    logger
        .filter_level(libraries)
        .filter_module("tracer", level)
        .parse_env("TRACER_LOG");
    if tui {
        // Lines written to stderr would land in the middle of the screen:
        // the UI shows them, and prints them once it gives the terminal back.
        logger.target(env_logger::Target::Pipe(Box::new(
            tracer::sink::tui::LogPipe,
        )));
    }
    logger.init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Attach {
                pid,
                cgroup,
                container,
                follow_forks,
                common,
            } => {
                let mut opts = common.options();
                opts.follow_forks = *follow_forks;
                if let Some(id) = container {
                    opts.add_label("container", id);
                }
                let group = match (cgroup, container) {
                    (Some(dir), _) => Some(tracer::cgroup::Cgroup::at(dir)?),
                    (None, Some(id)) => Some(tracer::cgroup::Cgroup::of_container(id)?),
                    (None, None) => None,
                };
                let mut sink = common.sink(&opts.labels, tui)?;
                match (group, pid) {
                    (Some(cg), _) => Ok(session::attach_cgroup(cg, &opts, sink.as_mut()).await?),
                    (None, Some(pid)) => Ok(session::attach(*pid, &opts, sink.as_mut()).await?),
                    (None, None) => anyhow::bail!("give a PID, --cgroup DIR or --container ID"),
                }
            }
            Command::Watch { pid, common } => {
                if common.no_alerts {
                    anyhow::bail!("`watch` with --no-alerts has nothing to do");
                }
                let opts = common.options();
                let mut sink = common.sink(&opts.labels, tui)?;
                Ok(session::watch(*pid, &opts, sink.as_mut()).await?)
            }
            Command::Run {
                common,
                argv,
                no_follow_forks,
            } => {
                let mut opts = common.options();
                opts.follow_forks = !*no_follow_forks;
                let mut sink = common.sink(&opts.labels, tui)?;
                Ok(session::run(argv, &opts, sink.as_mut()).await?)
            }
            Command::Report { file, output } => {
                let mut sink = output.sink(&[], false, None)?;
                let replayed = tracer::report::replay(file, sink.as_mut())?;
                for path in output.exports().write(&replayed.snapshot)? {
                    log::info!("wrote {}", path.display());
                }
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `tracer ... | head`: the reader is gone, which is not a failure.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = e
                .downcast_ref::<TracerError>()
                .map_or(1, TracerError::exit_code);
            eprintln!("tracer: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}

//! The live terminal UI (ratatui on crossterm), when stdout and stdin are a
//! terminal: memory against the limit, the alert until it resolves, the OOM
//! kill, and the sites of each kind ranked by growth with their history.
//!
//! The session calls the sink from its own loop; keys are read by a thread
//! of the sink's. Both draw, one at a time, through [`Shared`]. `q` raises
//! SIGINT at the tracer itself: the session detaches exactly as on Ctrl-C.
//! When the sink is dropped (the session ended, or failed) the terminal is
//! given back and the plain final report is printed on the normal screen,
//! where it stays; a panic hook gives the terminal back too.

use std::{
    collections::{HashMap, VecDeque},
    io::{self, Stdout, Write},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
        execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, LineGauge, Paragraph, Row, Table, TableState},
};

use super::{Attached, EndReason, Exit, Sink, human_bytes, table::TableSink};
use crate::schema::{
    Alert, CgroupTotals, Level, MemoryStatus, OomKill, Scope, SiteKind, SiteReport, Snapshot,
    TRUNCATED_STACKS,
};

/// Samples of history each site keeps for its sparkline.
const HISTORY: usize = 16;
/// Width of the column naming the frame that allocates.
const VIA: u16 = 28;
/// Notices (and log lines) kept for the footer.
const NOTICES: usize = 50;

/// How the sites of a kind are ranked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Bytes per second (count per second for goroutines and timers).
    Growth,
    /// Outstanding bytes.
    Size,
    /// Outstanding blocks, goroutines or timers.
    Count,
}

impl Sort {
    fn next(self) -> Self {
        match self {
            Self::Growth => Self::Size,
            Self::Size => Self::Count,
            Self::Count => Self::Growth,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Growth => "growth",
            Self::Size => "size",
            Self::Count => "count",
        }
    }
}

/// What is drawn over the view.
#[derive(Clone, Debug, PartialEq)]
enum Popup {
    None,
    Help,
    /// The whole stack of a site, scrolled by this many lines.
    Stack(Box<SiteRow>, u16),
}

/// A site as the table shows it: its process, numbers and recent history.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteRow {
    pub pid: u32,
    pub site: SiteReport,
    /// Oldest first: bytes (heap, mmap) or count (goroutines, timers).
    pub history: Vec<u64>,
}

/// What a key asks of the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The view changed: redraw.
    Redraw,
    /// Detach as on Ctrl-C (the final report follows).
    Detach,
    /// A second `q` while detaching: quit at once, as a second Ctrl-C does.
    QuitNow,
    Nothing,
}

/// Everything the screen shows, apart from the terminal: built by the sink's
/// events and the keys, drawn by [`View::render`].
pub struct View {
    comms: HashMap<u32, String>,
    /// The latest snapshot of each process traced (ended ones removed).
    snaps: std::collections::BTreeMap<u32, Snapshot>,
    /// Per process, per site: recent figures.
    history: HashMap<u32, HashMap<String, VecDeque<u64>>>,
    memory: Option<MemoryStatus>,
    cgroup: Option<CgroupTotals>,
    /// The alert firing (none once resolved).
    alert: Option<Alert>,
    kill: Option<OomKill>,
    exits: Vec<Exit>,
    notices: VecDeque<String>,
    kind: SiteKind,
    sort: Sort,
    selected: usize,
    /// The rows frozen by `p`.
    paused: Option<Vec<SiteRow>>,
    popup: Popup,
    detaching: bool,
    ended: Option<EndReason>,
}

impl Default for View {
    fn default() -> Self {
        Self::new()
    }
}

impl View {
    /// An empty view: heap sites, ranked by growth.
    pub fn new() -> Self {
        Self {
            comms: HashMap::new(),
            snaps: Default::default(),
            history: HashMap::new(),
            memory: None,
            cgroup: None,
            alert: None,
            kill: None,
            exits: Vec::new(),
            notices: VecDeque::new(),
            kind: SiteKind::Heap,
            sort: Sort::Growth,
            selected: 0,
            paused: None,
            popup: Popup::None,
            detaching: false,
            ended: None,
        }
    }

    /// A process is traced: its command name.
    pub fn attached(&mut self, info: &Attached) {
        self.comms.insert(info.pid, info.comm.clone());
    }

    /// A process's snapshot: its sites, their history, the memory status.
    pub fn snapshot(&mut self, snap: &Snapshot) {
        // Sites gone from the snapshot drop their history with them.
        let mut old = self.history.remove(&snap.pid).unwrap_or_default();
        let mut new = HashMap::with_capacity(snap.sites.len());
        for s in &snap.sites {
            let mut h = old.remove(&s.site_id).unwrap_or_default();
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(held(s));
            new.insert(s.site_id.clone(), h);
        }
        self.history.insert(snap.pid, new);
        if snap.memory.is_some() {
            self.memory = snap.memory.clone();
        }
        self.snaps.insert(snap.pid, snap.clone());
    }

    /// A cgroup's totals (`--cgroup`): its memory and processes.
    pub fn cgroup(&mut self, totals: &CgroupTotals) {
        if totals.memory.is_some() {
            self.memory = totals.memory.clone();
        }
        self.cgroup = Some(totals.clone());
    }

    /// An alert, or its end (severity `ok`).
    pub fn alert(&mut self, alert: &Alert) {
        // The panel stays until the alert resolves.
        self.alert = (alert.severity != Level::Ok).then(|| alert.clone());
    }

    /// The kernel OOM-killed a target.
    pub fn oom_kill(&mut self, kill: &OomKill) {
        self.kill = Some(kill.clone());
    }

    /// A target exited.
    pub fn target_exited(&mut self, exit: &Exit) {
        self.exits.push(exit.clone());
    }

    /// Something the user must know (the footer shows the latest).
    pub fn notice(&mut self, message: &str) {
        if self.notices.len() == NOTICES {
            self.notices.pop_front();
        }
        self.notices.push_back(message.to_string());
    }

    /// A target's final snapshot.
    pub fn finish(&mut self, snap: &Snapshot, reason: EndReason) {
        self.snapshot(snap);
        self.ended = Some(reason);
    }

    /// The sites of the kind shown, ranked by the sort.
    pub fn rows(&self) -> Vec<SiteRow> {
        let mut rows: Vec<SiteRow> = match &self.paused {
            Some(frozen) => frozen
                .iter()
                .filter(|r| r.site.kind == self.kind)
                .cloned()
                .collect(),
            None => self
                .all_rows()
                .into_iter()
                .filter(|r| r.site.kind == self.kind)
                .collect(),
        };
        let sort = self.sort;
        rows.sort_by(|a, b| {
            let (a, b) = (&a.site, &b.site);
            let by_growth = growth_value(b).total_cmp(&growth_value(a));
            let by_size = b.outstanding_bytes.cmp(&a.outstanding_bytes);
            let by_count = b.outstanding_count.cmp(&a.outstanding_count);
            match sort {
                Sort::Growth => by_growth.then(by_size).then(by_count),
                Sort::Size => by_size.then(by_count).then(by_growth),
                Sort::Count => by_count.then(by_size).then(by_growth),
            }
            .then_with(|| a.site_id.cmp(&b.site_id))
        });
        rows
    }

    fn all_rows(&self) -> Vec<SiteRow> {
        self.snaps
            .values()
            .flat_map(|snap| {
                let hist = self.history.get(&snap.pid);
                snap.sites.iter().map(move |s| SiteRow {
                    pid: snap.pid,
                    site: s.clone(),
                    history: hist
                        .and_then(|h| h.get(&s.site_id))
                        .map(|h| h.iter().copied().collect())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Handles a key press.
    pub fn key(&mut self, key: KeyEvent) -> Action {
        let ctrl_c =
            key.modifiers.contains(KeyModifiers::CONTROL) && matches!(key.code, KeyCode::Char('c'));
        if ctrl_c || key.code == KeyCode::Char('q') {
            if self.detaching {
                return Action::QuitNow;
            }
            self.detaching = true;
            return Action::Detach;
        }
        if let Popup::Stack(_, scroll) = &mut self.popup {
            match key.code {
                KeyCode::Down | KeyCode::Char('j') => *scroll = scroll.saturating_add(1),
                KeyCode::Up | KeyCode::Char('k') => *scroll = scroll.saturating_sub(1),
                KeyCode::PageDown => *scroll = scroll.saturating_add(10),
                KeyCode::PageUp => *scroll = scroll.saturating_sub(10),
                KeyCode::Esc | KeyCode::Enter | KeyCode::Backspace => self.popup = Popup::None,
                _ => return Action::Nothing,
            }
            return Action::Redraw;
        }
        if self.popup == Popup::Help {
            // Any key closes the help.
            self.popup = Popup::None;
            return Action::Redraw;
        }
        match key.code {
            KeyCode::Tab | KeyCode::BackTab => {
                let i = SiteKind::ALL
                    .iter()
                    .position(|k| *k == self.kind)
                    .unwrap_or(0);
                let n = SiteKind::ALL.len();
                let next = if key.code == KeyCode::Tab {
                    (i + 1) % n
                } else {
                    (i + n - 1) % n
                };
                self.kind = SiteKind::ALL[next];
                self.selected = 0;
            }
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('p') => {
                self.paused = match self.paused {
                    Some(_) => None,
                    None => Some(self.all_rows()),
                };
            }
            KeyCode::Char('?') | KeyCode::Char('h') => self.popup = Popup::Help,
            KeyCode::Down | KeyCode::Char('j') => self.selected = self.selected.saturating_add(1),
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::PageDown => self.selected = self.selected.saturating_add(10),
            KeyCode::PageUp => self.selected = self.selected.saturating_sub(10),
            KeyCode::Home => self.selected = 0,
            KeyCode::Enter => {
                let rows = self.rows();
                match rows.get(self.selected.min(rows.len().saturating_sub(1))) {
                    Some(row) => self.popup = Popup::Stack(Box::new(row.clone()), 0),
                    None => return Action::Nothing,
                }
            }
            KeyCode::Esc => self.popup = Popup::None,
            _ => return Action::Nothing,
        }
        Action::Redraw
    }

    /// Draws the whole screen into `f`.
    pub fn render(&self, f: &mut Frame) {
        let area = f.area();
        let panel = self.panel_lines(area.width.saturating_sub(2) as usize);
        let panel_height = if panel.is_empty() {
            0
        } else {
            panel.len() as u16 + 2
        };
        let [header, panel_area, tabs, table, footer] = Layout::vertical([
            Constraint::Length(3),
            Constraint::Length(panel_height),
            Constraint::Length(1),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(area);
        self.render_header(f, header);
        if !panel.is_empty() {
            let (title, colour) = self.panel_title();
            f.render_widget(
                Paragraph::new(panel).block(
                    Block::default()
                        .borders(Borders::ALL)
                        .border_style(Style::default().fg(colour))
                        .title(Span::styled(title, Style::default().fg(colour).bold())),
                ),
                panel_area,
            );
        }
        self.render_tabs(f, tabs);
        self.render_table(f, table);
        self.render_footer(f, footer);
        match &self.popup {
            Popup::None => {}
            Popup::Help => render_help(f, area),
            Popup::Stack(row, scroll) => render_stack(f, area, row, *scroll),
        }
    }

    fn target(&self) -> String {
        if let Some(cg) = &self.cgroup {
            return format!(
                "cgroup {} ({} processes)",
                cg.cgroup,
                cg.processes.iter().filter(|p| !p.ended).count()
            );
        }
        let live: Vec<u32> = self.snaps.keys().copied().collect();
        let pids: Vec<u32> = if live.is_empty() {
            let mut v: Vec<u32> = self.comms.keys().copied().collect();
            v.sort_unstable();
            v
        } else {
            live
        };
        match pids.as_slice() {
            [] => "attaching…".into(),
            [pid] => format!(
                "pid {pid} ({})",
                self.comms.get(pid).map_or("?", String::as_str)
            ),
            [first, ..] => format!(
                "pid {first} ({}) and {} more",
                self.comms.get(first).map_or("?", String::as_str),
                pids.len() - 1
            ),
        }
    }

    fn render_header(&self, f: &mut Frame, area: Rect) {
        let [l1, gauge, l3] = Layout::vertical([Constraint::Length(1); 3]).areas(area);
        let mut spans = vec![
            Span::styled(
                " tracer ",
                Style::default().fg(Color::Black).bg(Color::Cyan),
            ),
            Span::raw(" "),
            Span::styled(self.target(), Style::default().bold()),
        ];
        let sep = || Span::styled("  │  ", Style::default().fg(Color::DarkGray));
        let mut ratio = None;
        let mut level = None;
        match &self.memory {
            Some(m) => {
                let st = &m.state;
                spans.push(sep());
                let limit = match st.limit_bytes {
                    Some(l) => {
                        ratio = (l > 0).then(|| st.usage_bytes as f64 / l as f64);
                        format!(" / {}", human_bytes(l as f64))
                    }
                    None => " / no limit".into(),
                };
                spans.push(Span::styled(
                    format!("used {}{limit}", human_bytes(st.usage_bytes as f64)),
                    Style::default().bold(),
                ));
                if let Some(r) = ratio {
                    spans.push(Span::raw(format!(" ({:.0}%)", r * 100.0)));
                }
                spans.push(Span::styled(
                    format!(" {}", scope(st.scope.clone())),
                    Style::default().fg(Color::DarkGray),
                ));
                spans.push(sep());
                spans.push(Span::raw(match m.growth_bytes_per_s {
                    Some(g) => format!("{}/s", signed_bytes(g)),
                    None => "growth: measuring".into(),
                }));
                spans.push(sep());
                spans.push(match (m.eta_s, st.limit_bytes) {
                    (Some(e), _) => Span::styled(
                        format!("ETA {}", eta(e)),
                        Style::default().fg(level_colour(m.level)).bold(),
                    ),
                    (None, None) => Span::raw("ETA: no limit"),
                    (None, Some(_)) => Span::raw("ETA: none (not growing)"),
                });
                if let Some(p) = st.pressure_some_avg10 {
                    spans.push(sep());
                    spans.push(Span::raw(format!("PSI {p:.1}%")));
                }
                spans.push(sep());
                spans.push(level_span(m.level));
                level = Some(m.level);
            }
            None => {
                spans.push(sep());
                spans.push(Span::styled(
                    "memory limit not watched",
                    Style::default().fg(Color::DarkGray),
                ));
            }
        }
        f.render_widget(Line::from(spans), l1);
        let colour = level.map_or(Color::DarkGray, level_colour);
        f.render_widget(
            LineGauge::default()
                .filled_style(Style::default().fg(colour))
                .unfilled_style(Style::default().fg(Color::DarkGray))
                .label(Span::raw(" memory "))
                .ratio(ratio.unwrap_or(0.0).clamp(0.0, 1.0)),
            gauge,
        );
        let (mut lost, mut truncated, mut sites, mut total) = (0u64, 0u64, 0usize, 0u64);
        for s in self.snaps.values() {
            lost += s
                .lost
                .described()
                .filter(|(name, _, _)| *name != TRUNCATED_STACKS)
                .map(|(_, n, _)| n)
                .sum::<u64>();
            truncated += s.lost.get(TRUNCATED_STACKS);
            sites += s.sites.len();
            total += s.total_outstanding_bytes;
        }
        let mut third = vec![
            Span::raw(format!(
                " {} outstanding in {sites} sites  ",
                human_bytes(total as f64)
            )),
            Span::styled(
                format!("lost {lost}"),
                if lost > 0 {
                    Style::default().fg(Color::Yellow).bold()
                } else {
                    Style::default()
                },
            ),
            Span::raw(format!("  truncated stacks {truncated}")),
        ];
        if let Some(o) = self.snaps.values().find_map(|s| s.overhead) {
            third.push(Span::raw(format!("  probes +{:.0}% CPU", o.added_cpu_pct)));
        }
        f.render_widget(Line::from(third), l3);
    }

    /// The alert panel's lines, or the OOM kill's (which stays); none when
    /// neither.
    fn panel_lines(&self, width: usize) -> Vec<Line<'static>> {
        let mut lines = Vec::new();
        let site_line = |c: &Culprit| {
            let kind = if c.sites > 1 {
                format!("{} ×{}", c.site.kind.as_str(), c.sites)
            } else {
                c.site.kind.as_str().to_string()
            };
            let fig = format!("  {:>14} {kind:<12} ", c.figure);
            let rest = width.saturating_sub(fig.chars().count());
            Line::from(vec![
                Span::raw(fig),
                Span::styled(fit(&site_text(&c.site), rest), Style::default().bold()),
            ])
        };
        if let Some(k) = &self.kill {
            let rss = k.anon_rss_bytes.map_or(String::new(), |b| {
                format!(" with {} anonymous RSS", human_bytes(b as f64))
            });
            let mem = k.memory.as_ref().map_or(String::new(), |m| {
                format!(
                    "; memory then {} of {}",
                    human_bytes(m.state.usage_bytes as f64),
                    m.state
                        .limit_bytes
                        .map_or("no limit".into(), |l| human_bytes(l as f64))
                )
            });
            lines.push(Line::from(fit(
                &format!(
                    "pid {} was killed by the kernel's OOM killer{rss}{mem} ({}). Holding memory then:",
                    k.pid, k.detected_by
                ),
                width,
            )));
            // The kill's sites are the largest by bytes; goroutines and
            // timers hold none: add the last snapshot's largest of those.
            let mut sites = k.top_sites.clone();
            if let Some(snap) = self.snaps.get(&k.pid) {
                for kind in [SiteKind::Timer, SiteKind::Goroutine] {
                    let top = snap
                        .sites
                        .iter()
                        .filter(|s| s.kind == kind && s.outstanding_count > 0)
                        .max_by_key(|s| s.outstanding_count);
                    if let Some(t) = top.filter(|t| !sites.iter().any(|s| s.site_id == t.site_id)) {
                        sites.push(t.clone());
                    }
                }
            }
            let held: Vec<SiteReport> = holders(&sites).into_iter().cloned().collect();
            for c in group(&held, false).iter().take(4) {
                lines.push(site_line(c));
            }
            return lines;
        }
        if let Some(a) = &self.alert {
            lines.push(Line::from(fit(&a.reason, width)));
            let limit = a
                .limit_bytes
                .map_or("no limit".into(), |l| human_bytes(l as f64));
            let eta = a
                .eta_s
                .map_or(String::new(), |e| format!("; limit reached {}", eta(e)));
            let since = humantime::format_rfc3339_seconds(a.ts).to_string();
            lines.push(Line::from(fit(
                &format!(
                    "{} of {limit} at {}{eta}. Culprits:",
                    human_bytes(a.usage_bytes as f64),
                    since.get(11..19).unwrap_or(&since)
                ),
                width,
            )));
            for p in a.growing_processes.iter().take(3) {
                lines.push(Line::from(fit(
                    &format!(
                        "  {} ({}) grows {}/s",
                        p.comm,
                        p.pid,
                        human_bytes(p.growth_bytes_per_s)
                    ),
                    width,
                )));
            }
            for c in group(&a.top_sites, true).iter().take(4) {
                lines.push(site_line(c));
            }
        }
        lines
    }

    fn panel_title(&self) -> (String, Color) {
        if let Some(k) = &self.kill {
            return (format!(" OOM KILLED: pid {} ", k.pid), Color::Red);
        }
        match &self.alert {
            Some(a) => (
                format!(
                    " {} alert: pid {} ",
                    if a.severity == Level::Critical {
                        "CRITICAL"
                    } else {
                        "WARNING"
                    },
                    a.pid
                ),
                level_colour(a.severity),
            ),
            None => (String::new(), Color::Reset),
        }
    }

    fn render_tabs(&self, f: &mut Frame, area: Rect) {
        let all = match &self.paused {
            Some(rows) => rows.clone(),
            None => self.all_rows(),
        };
        let mut spans = vec![Span::raw(" ")];
        for kind in SiteKind::ALL {
            let sites: Vec<&SiteRow> = all.iter().filter(|r| r.site.kind == kind).collect();
            let label = match kind {
                SiteKind::Heap | SiteKind::Mmap => format!(
                    " {} {} ",
                    kind.as_str(),
                    human_bytes(sites.iter().map(|r| r.site.outstanding_bytes).sum::<u64>() as f64)
                ),
                SiteKind::Goroutine => format!(
                    " goroutines {} ",
                    sites.iter().map(|r| r.site.outstanding_count).sum::<u64>()
                ),
                SiteKind::Timer => format!(
                    " timers {} ",
                    sites.iter().map(|r| r.site.outstanding_count).sum::<u64>()
                ),
            };
            spans.push(if kind == self.kind {
                Span::styled(
                    label,
                    Style::default()
                        .fg(Color::Black)
                        .bg(Color::White)
                        .add_modifier(Modifier::BOLD),
                )
            } else {
                Span::raw(label)
            });
            spans.push(Span::raw(" "));
        }
        spans.push(Span::styled(
            format!("  sorted by {}", self.sort.as_str()),
            Style::default().fg(Color::DarkGray),
        ));
        if self.paused.is_some() {
            spans.push(Span::styled(
                "  PAUSED",
                Style::default().fg(Color::Black).bg(Color::Yellow),
            ));
        }
        f.render_widget(Line::from(spans), area);
    }

    fn render_table(&self, f: &mut Frame, area: Rect) {
        let rows = self.rows();
        let multi = self.snaps.len() > 1 || self.cgroup.is_some();
        let mut widths = vec![
            Constraint::Length(13),
            Constraint::Length(11),
            Constraint::Length(9),
            Constraint::Length(HISTORY as u16),
            Constraint::Length(VIA),
        ];
        if multi {
            widths.push(Constraint::Length(7));
        }
        // Whatever is left, less the highlight symbol and column spacing.
        let fixed: u16 = widths
            .iter()
            .map(|c| match c {
                Constraint::Length(n) => *n + 1,
                _ => 0,
            })
            .sum::<u16>()
            + 2;
        let site_width = area.width.saturating_sub(fixed) as usize;
        widths.push(Constraint::Min(10));
        let mut header = vec!["GROWTH", "HELD", "COUNT", "HISTORY", "ALLOCATED IN"];
        if multi {
            header.push("PID");
        }
        header.push("SITE (culprit first ← its callers)");
        let body = rows.iter().map(|r| {
            let s = &r.site;
            let mut cells = vec![
                Cell::from(format!("{:>13}", growth_text(s))),
                Cell::from(format!(
                    "{:>11}",
                    if s.outstanding_bytes > 0 || matches!(s.kind, SiteKind::Heap | SiteKind::Mmap)
                    {
                        human_bytes(s.outstanding_bytes as f64)
                    } else {
                        "-".into()
                    }
                )),
                Cell::from(format!("{:>9}", s.outstanding_count)),
                Cell::from(Span::styled(
                    sparkline(&r.history),
                    Style::default().fg(Color::Cyan),
                )),
                Cell::from(Span::styled(
                    fit(&via(s), VIA as usize),
                    Style::default().fg(Color::DarkGray),
                )),
            ];
            if multi {
                cells.push(Cell::from(r.pid.to_string()));
            }
            cells.push(Cell::from(site_line(s, site_width)));
            Row::new(cells)
        });
        let empty = rows.is_empty();
        let table = Table::new(body, widths)
            .header(Row::new(header).style(Style::default().add_modifier(Modifier::BOLD)))
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
            .highlight_symbol("▶ ");
        let mut state = TableState::default()
            .with_selected((!empty).then(|| self.selected.min(rows.len() - 1)));
        f.render_stateful_widget(table, area, &mut state);
        if empty {
            let what = match self.kind {
                SiteKind::Heap => "no heap site holds memory allocated since attach",
                SiteKind::Mmap => "no mapping made since attach is held",
                SiteKind::Goroutine => "no goroutine sites (not a Go program, or none yet)",
                SiteKind::Timer => "no pending timers (not a Go program, or none yet)",
            };
            let y = area.y.saturating_add(2);
            if y < area.bottom() {
                f.render_widget(
                    Line::styled(format!("  {what}"), Style::default().fg(Color::DarkGray)),
                    Rect::new(area.x, y, area.width, 1),
                );
            }
        }
    }

    fn render_footer(&self, f: &mut Frame, area: Rect) {
        let status = if self.ended.is_some() {
            Span::styled(
                " ended ",
                Style::default().fg(Color::Black).bg(Color::Yellow),
            )
        } else if self.detaching {
            Span::styled(
                " detaching… (q again quits at once) ",
                Style::default().fg(Color::Black).bg(Color::Yellow),
            )
        } else {
            Span::styled(
                " q quit  tab kind  s sort  ↑↓ select  enter stack  p pause  ? help ",
                Style::default().fg(Color::Black).bg(Color::Gray),
            )
        };
        let used = status.width();
        let mut spans = vec![status];
        let exited = self.exits.last().map(|e| {
            format!(
                "pid {} exited{}",
                e.pid,
                match (e.code, e.signal) {
                    (Some(c), _) => format!(" with status {c}"),
                    (_, Some(s)) => format!(" killed by signal {s}"),
                    _ => String::new(),
                }
            )
        });
        if let Some(last) = self.notices.back().or(exited.as_ref()) {
            let room = (area.width as usize).saturating_sub(used + 1);
            spans.push(Span::raw(" "));
            spans.push(Span::styled(
                fit(last, room),
                Style::default().fg(Color::Yellow),
            ));
        }
        f.render_widget(Line::from(spans), area);
    }
}

/// The alert's or kill's sites with one culprit frame, as one line.
struct Culprit {
    /// The first site of the group (the one shown).
    site: SiteReport,
    sites: usize,
    /// Summed growth (`growth`) or holding.
    figure: String,
}

/// `sites` grouped by kind and culprit frame, in their order: several
/// stacks through one line of the program (a context, its timer, its
/// defer) are one culprit. `growth`: sum the growth, else what they hold.
fn group(sites: &[SiteReport], growth: bool) -> Vec<Culprit> {
    let mut groups: Vec<(SiteReport, usize, f64, u64, u64)> = Vec::new();
    for s in sites {
        let key = s.culprit().map(|f| f.short());
        match groups
            .iter_mut()
            .find(|g| g.0.kind == s.kind && g.0.culprit().map(|f| f.short()) == key)
        {
            Some(g) => {
                g.1 += 1;
                g.2 += growth_value(s);
                g.3 += s.outstanding_bytes;
                g.4 += s.outstanding_count;
            }
            None => groups.push((
                s.clone(),
                1,
                growth_value(s),
                s.outstanding_bytes,
                s.outstanding_count,
            )),
        }
    }
    groups
        .into_iter()
        .map(|(site, n, g, bytes, count)| {
            let mut sum = site.clone();
            sum.growth_bytes_per_s = if bytes_kind(site.kind) { g } else { 0.0 };
            sum.growth_count_per_s = if bytes_kind(site.kind) { 0.0 } else { g };
            sum.outstanding_bytes = bytes;
            sum.outstanding_count = count;
            Culprit {
                figure: if growth {
                    growth_text(&sum)
                } else {
                    held_text(&sum)
                },
                site,
                sites: n,
            }
        })
        .collect()
}

fn bytes_kind(k: SiteKind) -> bool {
    matches!(k, SiteKind::Heap | SiteKind::Mmap)
}

/// The innermost frame past the allocator and Go's allocation entries
/// (what allocates: `time.newTimer`, `runtime.newdefer`), which tells apart
/// sites with one culprit; empty when that is the culprit itself.
fn via(s: &SiteReport) -> String {
    const GO_ALLOCATION: [&str; 12] = [
        "runtime.newobject",
        "runtime.mallocgc",
        "runtime.makeslice",
        "runtime.makeslicecopy",
        "runtime.growslice",
        "runtime.makemap",
        "runtime.makemap_small",
        "runtime.newarray",
        "runtime.makechan",
        "runtime.rawstring",
        "runtime.rawbyteslice",
        "runtime.rawruneslice",
    ];
    let frames = s.past_allocator();
    let Some(c) = s.culprit() else {
        return String::new();
    };
    // Only frames inside the culprit: a site whose culprit is a runtime
    // frame (no frame of the program's own) has nothing to add.
    let inside = frames
        .iter()
        .position(|f| std::ptr::eq(f, c))
        .map_or(&frames[..0], |i| &frames[..i]);
    inside
        .iter()
        .find(|f| !GO_ALLOCATION.contains(&f.function.as_str()))
        .or(inside.first())
        .map_or(String::new(), |f| f.function.clone())
}

/// A site's figure for the history: bytes, or count where it holds none.
fn held(s: &SiteReport) -> u64 {
    match s.kind {
        SiteKind::Heap | SiteKind::Mmap => s.outstanding_bytes,
        SiteKind::Goroutine | SiteKind::Timer => s.outstanding_count,
    }
}

fn held_text(s: &SiteReport) -> String {
    match s.kind {
        SiteKind::Heap | SiteKind::Mmap => human_bytes(s.outstanding_bytes as f64),
        SiteKind::Goroutine | SiteKind::Timer => s.outstanding_count.to_string(),
    }
}

/// The sites holding something, most first (bytes, then count).
fn holders(sites: &[SiteReport]) -> Vec<&SiteReport> {
    let mut v: Vec<&SiteReport> = sites
        .iter()
        .filter(|s| s.outstanding_bytes > 0 || s.outstanding_count > 0)
        .collect();
    v.sort_by_key(|s| std::cmp::Reverse((s.outstanding_bytes, s.outstanding_count)));
    v
}

/// The growth a site is ranked by: bytes per second, count per second for
/// goroutines and timers (which hold no bytes).
fn growth_value(s: &SiteReport) -> f64 {
    match s.kind {
        SiteKind::Heap | SiteKind::Mmap => s.growth_bytes_per_s,
        SiteKind::Goroutine | SiteKind::Timer => s.growth_count_per_s,
    }
}

fn growth_text(s: &SiteReport) -> String {
    let g = growth_value(s);
    match s.kind {
        SiteKind::Heap | SiteKind::Mmap if g.abs() >= 0.5 => format!("{}/s", signed_bytes(g)),
        SiteKind::Goroutine | SiteKind::Timer if g.abs() >= 0.05 => format!("{g:+.1}/s"),
        _ => "0".into(),
    }
}

fn signed_bytes(g: f64) -> String {
    if g > 0.0 {
        format!("+{}", human_bytes(g))
    } else {
        human_bytes(g)
    }
}

/// `in 1m 05s`, `in ~42 s`, `now`.
fn eta(s: f64) -> String {
    if s < 1.0 {
        "now".into()
    } else if s < 120.0 {
        format!("in ~{s:.0} s")
    } else if s < 2.0 * 3600.0 {
        format!("in ~{:.0} min", s / 60.0)
    } else {
        format!("in ~{:.1} h", s / 3600.0)
    }
}

fn scope(s: Scope) -> &'static str {
    match s {
        Scope::CgroupV2 => "cgroup v2",
        Scope::CgroupV1 => "cgroup v1",
        Scope::System => "system",
    }
}

fn level_colour(l: Level) -> Color {
    match l {
        Level::Ok => Color::Green,
        Level::Warning => Color::Yellow,
        Level::Critical => Color::Red,
    }
}

fn level_span(l: Level) -> Span<'static> {
    let text = match l {
        Level::Ok => " OK ",
        Level::Warning => " WARNING ",
        Level::Critical => " CRITICAL ",
    };
    Span::styled(
        text,
        Style::default()
            .fg(Color::Black)
            .bg(level_colour(l))
            .add_modifier(Modifier::BOLD),
    )
}

/// The recent history as block characters, scaled to its own maximum.
fn sparkline(h: &[u64]) -> String {
    const BARS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = h.iter().copied().max().unwrap_or(0);
    let mut s: String = std::iter::repeat_n(' ', HISTORY.saturating_sub(h.len())).collect();
    for &v in h {
        s.push(if max == 0 {
            BARS[0]
        } else {
            // At least the lowest bar for anything held.
            let i = (v as f64 / max as f64 * 8.0).round() as usize;
            BARS[i.clamp(usize::from(v > 0), 8)]
        });
    }
    s
}

/// `s` cut to `width` characters, an ellipsis marking the cut.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

/// A site in one line: the culprit frame first (the program's own code
/// nearest the allocation), then its callers outward.
pub fn site_text(s: &SiteReport) -> String {
    let frames = s.past_allocator();
    let culprit = s.culprit();
    let Some(c) = culprit else {
        return "[no stack]".into();
    };
    let mut text = match (&s.start_function, s.kind, frames.is_empty()) {
        (Some(f), SiteKind::Timer, true) => {
            format!("[timers running {}; creation not sampled yet]", f.function)
        }
        _ => c.short(),
    };
    if !s.states.is_empty() {
        let mut v: Vec<(&String, &u64)> = s.states.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let states: Vec<String> = v.iter().map(|(st, n)| format!("{n} {st}")).collect();
        text.push_str(&format!(" [{}]", states.join(", ")));
    }
    if let Some(i) = frames.iter().position(|f| std::ptr::eq(f, c)) {
        for f in &frames[i + 1..] {
            text.push_str(" ← ");
            text.push_str(&f.short());
        }
    }
    text
}

/// The site's line of the table, the culprit in bold, fitted to `width`.
fn site_line(s: &SiteReport, width: usize) -> Line<'static> {
    let text = fit(&site_text(s), width);
    let culprit_len = s
        .culprit()
        .map(|c| c.short())
        .filter(|c| text.starts_with(c.as_str()))
        .map_or(0, |c| c.chars().count());
    let head: String = text.chars().take(culprit_len).collect();
    let tail: String = text.chars().skip(culprit_len).collect();
    Line::from(vec![
        Span::styled(head, Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(tail),
    ])
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

const KEYS: [(&str, &str); 9] = [
    (
        "q, Ctrl-C",
        "detach (the final report stays on the terminal)",
    ),
    (
        "tab, shift-tab",
        "next / previous kind: heap, mmap, goroutines, timers",
    ),
    ("s", "sort by growth, size, count"),
    ("↑ ↓, j k", "select a site"),
    ("enter", "the selected site's whole stack (esc closes)"),
    ("p", "pause the view (again: resume)"),
    ("?", "this help (any key closes)"),
    ("", ""),
    (
        "header",
        "used / limit, growth, ETA to the limit, PSI, alert level",
    ),
];

fn render_help(f: &mut Frame, area: Rect) {
    let rect = centered(area, 84, KEYS.len() as u16 + 2);
    let lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:>15}  "), Style::default().bold()),
                Span::raw(*what),
            ])
        })
        .collect();
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" keys ")),
        rect,
    );
}

fn render_stack(f: &mut Frame, area: Rect, row: &SiteRow, scroll: u16) {
    let rect = centered(
        area,
        area.width.saturating_sub(6),
        area.height.saturating_sub(4),
    );
    let s = &row.site;
    let culprit = s.culprit();
    let mut lines = vec![Line::from(format!(
        "{} site {} of pid {}: {} held, {} live, growth {}, {} allocs / {} frees{}",
        s.kind,
        s.site_id,
        row.pid,
        human_bytes(s.outstanding_bytes as f64),
        s.outstanding_count,
        growth_text(s),
        s.allocs,
        s.frees,
        if s.truncated {
            " [stack truncated]"
        } else {
            ""
        }
    ))];
    if let Some(start) = &s.start_function {
        lines.push(Line::from(format!("running {}", start.short())));
    }
    lines.push(Line::from(""));
    let width = rect.width.saturating_sub(4) as usize;
    let mut module = None;
    for f in s.frames.iter() {
        // The object file, named where it changes.
        let changed = f.module.is_some() && f.module != module;
        module = f.module.clone();
        let mark = culprit.is_some_and(|c| std::ptr::eq(c, f));
        let text = fit(
            &format!(
                "{} {}{}{}",
                if mark { "▶" } else { " " },
                f.short(),
                if f.inlined { " (inlined)" } else { "" },
                match f.module.as_deref() {
                    Some(m) if changed => format!("  [{}]", m.rsplit('/').next().unwrap_or(m)),
                    _ => String::new(),
                }
            ),
            width,
        );
        lines.push(if mark {
            Line::styled(text, Style::default().add_modifier(Modifier::BOLD))
        } else {
            Line::from(text)
        });
    }
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines)
            .scroll((scroll, 0))
            .block(Block::bordered().title(" stack (innermost first; ↑↓ scroll, esc closes) ")),
        rect,
    );
}

/// Whether the terminal is ours now (for the panic hook and the log pipe).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Log lines written while the terminal is ours: shown in the footer, and
/// printed on the normal screen afterwards.
static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The logger's target (`env_logger`'s pipe): stderr, except while the UI
/// owns the terminal, when lines are kept to be shown and printed after.
pub struct LogPipe;

impl Write for LogPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !ACTIVE.load(Ordering::SeqCst) {
            return io::stderr().write(buf);
        }
        let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
        for line in String::from_utf8_lossy(buf).lines() {
            if log.len() < 1000 {
                log.push(line.to_string());
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Gives the terminal back (idempotent): normal screen, cooked mode, cursor.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

struct Shared {
    view: View,
    terminal: Terminal<CrosstermBackend<Stdout>>,
    log_seen: usize,
}

impl Shared {
    fn draw(&mut self) -> io::Result<()> {
        if !ACTIVE.load(Ordering::SeqCst) {
            // Given back (a second q, a panic): the normal screen is not ours.
            return Ok(());
        }
        let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
        for line in &log[self.log_seen.min(log.len())..] {
            self.view.notice(line);
        }
        self.log_seen = log.len();
        drop(log);
        let view = &self.view;
        self.terminal.draw(|f| view.render(f)).map(|_| ())
    }
}

/// The full-screen live view. See the module documentation.
pub struct TuiSink {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    /// The plain report, printed on the normal screen at the end.
    report: TableSink<Vec<u8>>,
}

impl TuiSink {
    /// Takes over the terminal: alternate screen, raw mode, the key reader.
    pub fn new(top: usize) -> io::Result<Self> {
        install_panic_hook();
        terminal::enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        let mut out = io::stdout();
        if let Err(e) = execute!(out, EnterAlternateScreen, cursor::Hide) {
            restore();
            return Err(e);
        }
        let terminal = match Terminal::new(CrosstermBackend::new(out)) {
            Ok(t) => t,
            Err(e) => {
                restore();
                return Err(e);
            }
        };
        let shared = Arc::new(Mutex::new(Shared {
            view: View::new(),
            terminal,
            log_seen: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (shared, stop) = (shared.clone(), stop.clone());
            if let Err(e) = std::thread::Builder::new()
                .name("tracer-keys".into())
                .spawn(move || read_keys(&shared, &stop))
            {
                restore();
                return Err(e);
            }
        }
        let sink = Self {
            shared,
            stop,
            report: TableSink::new(Vec::new(), false, top),
        };
        sink.lock().draw()?;
        Ok(sink)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn update(&self, f: impl FnOnce(&mut View)) -> io::Result<()> {
        let mut s = self.lock();
        f(&mut s.view);
        s.draw()
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while drawing leaves the view as it was: go on with it.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key reader: handles each key and redraws, until the sink stops it.
fn read_keys(shared: &Mutex<Shared>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        // Polled: the thread must notice `stop` within a tenth of a second.
        match event::poll(Duration::from_millis(100)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        let Ok(ev) = event::read() else { return };
        let mut s = lock(shared);
        if stop.load(Ordering::SeqCst) {
            // The terminal was given back meanwhile: draw nothing more.
            return;
        }
        let action = match ev {
            Event::Key(k) if k.kind != KeyEventKind::Release => s.view.key(k),
            Event::Resize(..) => Action::Redraw,
            _ => Action::Nothing,
        };
        match action {
            Action::Nothing => continue,
            Action::Redraw => {}
            // The session's own Ctrl-C path: final report, clean detach.
            Action::Detach => raise_sigint(),
            Action::QuitNow => {
                // The session reset SIGINT to its default action when the
                // first one arrived: this one ends the tracer at once.
                restore();
                raise_sigint();
                return;
            }
        }
        let _ = s.draw();
    }
}

fn raise_sigint() {
    // SAFETY: sending a signal to this process.
    unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The message must land on a sane, normal screen.
            restore();
            previous(info);
        }));
    });
}

impl Drop for TuiSink {
    fn drop(&mut self) {
        {
            // Under the lock, so that no key is being drawn: the key thread
            // sees `stop` before it draws again, and ends within its poll.
            // It is not waited for: a tenth of a second on every exit.
            let _s = self.lock();
            self.stop.store(true, Ordering::SeqCst);
            restore();
        }
        // What was logged, then the report: in the order it happened.
        let log = std::mem::take(&mut *LOG.lock().unwrap_or_else(|e| e.into_inner()));
        for line in log {
            eprintln!("{line}");
        }
        let mut out = io::stdout();
        let _ = out.write_all(self.report.get_ref());
        let _ = out.flush();
    }
}

impl Sink for TuiSink {
    fn attached(&mut self, info: &Attached) -> io::Result<()> {
        self.report.attached(info)?;
        self.update(|v| v.attached(info))
    }

    fn snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.update(|v| v.snapshot(snap))
    }

    fn target_exited(&mut self, exit: &Exit) -> io::Result<()> {
        self.report.target_exited(exit)?;
        self.update(|v| v.target_exited(exit))
    }

    fn notice(&mut self, pid: u32, message: &str) -> io::Result<()> {
        self.report.notice(pid, message)?;
        self.update(|v| v.notice(message))
    }

    fn alert(&mut self, alert: &Alert) -> io::Result<()> {
        self.report.alert(alert)?;
        self.update(|v| v.alert(alert))
    }

    fn oom_kill(&mut self, kill: &OomKill) -> io::Result<()> {
        self.report.oom_kill(kill)?;
        self.update(|v| v.oom_kill(kill))
    }

    fn finish(&mut self, snap: &Snapshot, reason: EndReason, elapsed_s: f64) -> io::Result<()> {
        self.report.finish(snap, reason, elapsed_s)?;
        self.update(|v| v.finish(snap, reason))
    }

    fn cgroup(&mut self, totals: &CgroupTotals) -> io::Result<()> {
        self.update(|v| v.cgroup(totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Frame as StackFrame, Lost, MemoryState, Peak};
    use ratatui::backend::TestBackend;
    use std::{sync::Arc, time::SystemTime};

    const LIMIT: u64 = 256 << 20;

    fn frame(function: &str, line: u32) -> StackFrame {
        StackFrame {
            function: function.into(),
            file: Some("/src/app/main.go".into()),
            line: Some(line),
            module: Some("/bin/leaky".into()),
            addr: 0x1000 + line as u64,
            inlined: false,
        }
    }

    fn site(id: &str, kind: SiteKind, bytes: u64, count: u64, growth: f64) -> SiteReport {
        SiteReport {
            site_id: id.into(),
            kind,
            outstanding_bytes: bytes,
            outstanding_count: count,
            allocs: count,
            frees: 0,
            alloc_bytes: bytes,
            growth_bytes_per_s: if bytes > 0 { growth } else { 0.0 },
            growth_count_per_s: if bytes > 0 { 0.0 } else { growth },
            peak: Peak::default(),
            states: Default::default(),
            start_function: None,
            sampled: false,
            truncated: false,
            frames: Arc::from(vec![frame(&format!("main.{id}"), 10)]),
            process: None,
        }
    }

    /// The seed's timer site: the library frames first, the culprit in the
    /// middle.
    fn timer_site() -> SiteReport {
        let mut s = site("timers", SiteKind::Timer, 0, 709_462, 4000.0);
        s.frames = Arc::from(vec![
            frame("time.newTimer", 1),
            frame("time.AfterFunc", 2),
            frame("context.WithDeadlineCause", 3),
            frame("context.WithDeadline", 4),
            frame("context.WithTimeout", 5),
            frame("main.timerFlood", 58),
            frame("main.main", 266),
            frame("runtime.main", 283),
        ]);
        s
    }

    fn memory(usage: u64, level: Level) -> MemoryStatus {
        MemoryStatus {
            state: MemoryState {
                scope: Scope::CgroupV1,
                cgroup: Some("/sys/fs/cgroup/memory/test".into()),
                usage_bytes: usage,
                limit_bytes: Some(LIMIT),
                high_bytes: None,
                high_events: None,
                oom_kills: Some(0),
                pressure_some_avg10: Some(2.5),
            },
            eta_s: Some(17.0),
            growth_bytes_per_s: Some(4.0 * 1048576.0),
            level,
        }
    }

    fn snapshot(sites: Vec<SiteReport>, mem: Option<MemoryStatus>) -> Snapshot {
        Snapshot {
            ts: SystemTime::now(),
            pid: 4242,
            total_outstanding_bytes: sites.iter().map(|s| s.outstanding_bytes).sum(),
            sites,
            lost: Lost::default(),
            activity: Default::default(),
            memory: mem,
            mappings: Vec::new(),
            overhead: None,
            previous_images: Vec::new(),
        }
    }

    fn alert(severity: Level) -> Alert {
        let m = memory(200 << 20, severity);
        Alert {
            pid: 4242,
            severity,
            reason: "limit reached in ~17 s at the current growth".into(),
            eta_s: Some(17.0),
            usage_bytes: m.state.usage_bytes,
            limit_bytes: m.state.limit_bytes,
            memory: m.state,
            top_sites: vec![timer_site()],
            target_growth_bytes_per_s: None,
            growing_processes: Vec::new(),
            ts: SystemTime::now(),
        }
    }

    fn view() -> View {
        let mut v = View::new();
        v.comms.insert(4242, "leaky".into());
        v.snapshot(&snapshot(
            vec![
                site("cache", SiteKind::Heap, 50 << 20, 800, 0.0),
                site("grow", SiteKind::Heap, 10 << 20, 100, 2e6),
                timer_site(),
            ],
            Some(memory(200 << 20, Level::Warning)),
        ));
        v
    }

    fn screen(v: &View) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(150, 24)).unwrap();
        t.draw(|f| v.render(f)).unwrap();
        let buf = t.backend().buffer();
        buf.content
            .chunks(150)
            .map(|row| row.iter().map(|c| c.symbol()).collect())
            .collect()
    }

    fn shows(lines: &[String], text: &str) -> bool {
        lines.iter().any(|l| l.contains(text))
    }

    /// The one line of the screen showing `text`.
    fn line_with<'l>(lines: &'l [String], text: &str) -> &'l str {
        let hits: Vec<&String> = lines.iter().filter(|l| l.contains(text)).collect();
        assert_eq!(hits.len(), 1, "{text} once in {lines:#?}");
        hits[0]
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn the_header_has_usage_limit_scope_growth_eta_psi_and_level() {
        let lines = screen(&view());
        let top = &lines[0];
        for want in [
            "pid 4242 (leaky)",
            "used 200.0 MiB / 256.0 MiB (78%)",
            "cgroup v1",
            "+4.0 MiB/s",
            "ETA in ~17 s",
            "PSI 2.5%",
            "WARNING",
        ] {
            assert!(top.contains(want), "no {want:?} in {top:?}");
        }
        assert!(lines[2].contains("lost 0"), "{}", lines[2]);
        assert!(lines[2].contains("truncated stacks 0"), "{}", lines[2]);
    }

    #[test]
    fn the_alert_panel_stays_until_resolved() {
        let mut v = view();
        assert!(!shows(&screen(&v), "CRITICAL alert"));
        v.alert(&alert(Level::Critical));
        for _ in 0..5 {
            v.snapshot(&snapshot(
                vec![timer_site()],
                Some(memory(210 << 20, Level::Critical)),
            ));
            let lines = screen(&v);
            assert!(shows(&lines, "CRITICAL alert: pid 4242"));
            assert!(shows(&lines, "limit reached in ~17 s"));
            // The culprit, though the live table shows heap sites.
            assert!(line_with(&lines, "main.timerFlood (main.go:58)").contains("+4000.0/s timer"));
        }
        v.alert(&alert(Level::Ok));
        assert!(!shows(&screen(&v), "CRITICAL alert"));
    }

    #[test]
    fn the_oom_kill_stays_with_who_held_the_memory() {
        let mut v = view();
        v.alert(&alert(Level::Critical));
        v.oom_kill(&OomKill {
            pid: 4242,
            detected_by: "oom:mark_victim tracepoint".into(),
            anon_rss_bytes: Some(250 << 20),
            file_rss_bytes: None,
            shmem_rss_bytes: None,
            total_vm_bytes: None,
            memory: Some(memory(255 << 20, Level::Critical)),
            top_sites: vec![
                site("cache", SiteKind::Heap, 50 << 20, 800, 0.0),
                timer_site(),
            ],
        });
        v.snapshot(&snapshot(vec![], None));
        let lines = screen(&v);
        assert!(shows(&lines, "OOM KILLED: pid 4242"));
        assert!(shows(&lines, "with 250.0 MiB anonymous RSS"));
        assert!(line_with(&lines, "main.cache (main.go:10)").contains("50.0 MiB heap"));
        assert!(line_with(&lines, "main.timerFlood").contains("709462 timer"));
    }

    #[test]
    fn chains_start_at_the_culprit_and_are_cut_not_wrapped() {
        let mut long = timer_site();
        let mut frames: Vec<StackFrame> = long.frames.to_vec();
        for i in 0..20 {
            frames.push(frame(
                &format!("github.com/acme/service/pkg{i}.(*Handler).Serve"),
                i,
            ));
        }
        long.frames = Arc::from(frames);
        let mut v = View::new();
        v.snapshot(&snapshot(vec![long], None));
        v.key(key(KeyCode::Tab));
        v.key(key(KeyCode::Tab));
        v.key(key(KeyCode::Tab));
        let lines = screen(&v);
        let row: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("main.timerFlood"))
            .collect();
        assert_eq!(row.len(), 1, "{lines:#?}");
        // What allocates, then the culprit first, the callers after, the
        // cut marked.
        let culprit = row[0].find("main.timerFlood").expect("the culprit");
        assert!(row[0][..culprit].contains("time.newTimer"), "{}", row[0]);
        let text = &row[0][culprit..];
        assert!(
            text.starts_with("main.timerFlood (main.go:58) ← main.main"),
            "{text}"
        );
        assert!(row[0].trim_end().ends_with('…'), "{}", row[0]);
        // Nothing of the chain spills onto the next line.
        let next = lines
            .iter()
            .position(|l| l.contains("main.timerFlood"))
            .unwrap()
            + 1;
        assert!(!lines[next].contains("Serve"), "{}", lines[next]);
    }

    #[test]
    fn keys_switch_kind_sort_pause_and_show_the_stack() {
        let mut v = view();
        // Heap first, by growth: the growing site above the bigger one.
        let heap = v.rows();
        assert_eq!(heap[0].site.site_id, "grow");
        assert_eq!(v.key(key(KeyCode::Char('s'))), Action::Redraw);
        assert_eq!(v.rows()[0].site.site_id, "cache", "by size");
        // Tab: mmap, goroutines, timers.
        for _ in 0..3 {
            v.key(key(KeyCode::Tab));
        }
        assert_eq!(v.kind, SiteKind::Timer);
        let lines = screen(&v);
        assert!(shows(&lines, "main.timerFlood (main.go:58)"));
        assert!(shows(&lines, " timers 709462 "));
        // Pause: a new snapshot does not change the rows.
        v.key(key(KeyCode::Char('p')));
        v.snapshot(&snapshot(vec![], Some(memory(1, Level::Ok))));
        assert_eq!(v.rows().len(), 1);
        assert!(shows(&screen(&v), "PAUSED"));
        v.key(key(KeyCode::Char('p')));
        assert!(v.rows().is_empty());
        v.key(key(KeyCode::Char('p')));
        // Enter: the whole stack, library frames included.
        v.snapshot(&snapshot(vec![timer_site()], None));
        v.key(key(KeyCode::Char('p')));
        v.key(key(KeyCode::Enter));
        let lines = screen(&v);
        for f in [
            "time.AfterFunc",
            "context.WithTimeout",
            "▶ main.timerFlood",
            "runtime.main",
        ] {
            assert!(shows(&lines, f), "{f} in {lines:#?}");
        }
        v.key(key(KeyCode::Esc));
        assert!(!shows(&screen(&v), "context.WithTimeout (main.go:5)"));
        v.key(key(KeyCode::Char('?')));
        assert!(shows(&screen(&v), "pause the view"));
        v.key(key(KeyCode::Char('x')));
        assert!(!shows(&screen(&v), "pause the view"));
        // q detaches; a second quits at once, as Ctrl-C twice.
        assert_eq!(v.key(key(KeyCode::Char('q'))), Action::Detach);
        assert!(shows(&screen(&v), "detaching"));
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(v.key(ctrl_c), Action::QuitNow);
    }

    #[test]
    fn sparklines_scale_to_their_history() {
        assert_eq!(sparkline(&[]), " ".repeat(HISTORY));
        let s = sparkline(&[0, 1, 4, 8]);
        assert!(s.ends_with(" ▁▄█"), "{s:?}");
        assert_eq!(s.chars().count(), HISTORY);
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
        assert_eq!(fit("abc", 0), "");
    }

    #[test]
    fn what_allocates_is_a_frame_inside_the_culprit() {
        let mut s = site("x", SiteKind::Heap, 1, 1, 0.0);
        s.frames = Arc::from(vec![
            frame("runtime.growslice", 1),
            frame("runtime.(*timers).addHeap", 2),
            frame("main.timerFlood", 3),
        ]);
        assert_eq!(via(&s), "runtime.(*timers).addHeap");
        // No frame of the program's: the culprit is the runtime's own.
        s.frames = Arc::from(vec![
            frame("runtime.makeslice", 1),
            frame("runtime.makeProfStackFP", 2),
        ]);
        assert_eq!(via(&s), "");
    }

    #[test]
    fn an_alert_names_each_culprit_once_and_the_kill_adds_the_timers() {
        let mut v = view();
        let mut a = alert(Level::Warning);
        // Three heap stacks through one line (the context, its timer, the
        // defer), then the timers: four lines would show only the heap.
        let mut heap = Vec::new();
        for (i, inner) in [
            "time.newTimer",
            "context.WithDeadlineCause",
            "runtime.newdefer",
        ]
        .iter()
        .enumerate()
        {
            let mut s = site(&format!("h{i}"), SiteKind::Heap, 1 << 20, 10, 100_000.0);
            s.frames = Arc::from(vec![
                frame("runtime.newobject", 1),
                frame(inner, 2),
                frame("main.timerFlood", 58),
            ]);
            heap.push(s);
        }
        a.top_sites = heap.clone();
        a.top_sites.push(timer_site());
        v.alert(&a);
        let lines = screen(&v);
        let heap_line = line_with(&lines, "heap ×3");
        assert!(heap_line.contains("+293.0 KiB/s"), "{heap_line}");
        assert!(heap_line.contains("main.timerFlood (main.go:58)"));
        assert!(line_with(&lines, "timer        main.timerFlood").contains("+4000.0/s"));
        v.snapshot(&snapshot(
            heap.iter().cloned().chain([timer_site()]).collect(),
            None,
        ));
        // The table tells the three apart by what allocates (past Go's
        // allocation entry).
        assert!(line_with(&screen(&v), "context.WithDeadlineCause").contains("main.timerFlood"));
        // The kill's sites (by bytes) have no timers: the last snapshot's are added.
        v.oom_kill(&OomKill {
            pid: 4242,
            detected_by: "cgroup oom_kill counter".into(),
            anon_rss_bytes: None,
            file_rss_bytes: None,
            shmem_rss_bytes: None,
            total_vm_bytes: None,
            memory: None,
            top_sites: heap,
        });
        let lines = screen(&v);
        assert!(line_with(&lines, "heap ×3").contains("3.0 MiB"));
        assert!(line_with(&lines, "timer        main.timerFlood").contains("709462"));
    }
}

//! Alerts before the OOM kill: a robust growth trend of the target's memory,
//! an estimated time to its limit, and alert levels with hysteresis.
//!
//! - [`memlimit`]: the target's memory and its limit (cgroup v2, v1, system).
//! - [`watch`]: each interval, the memory state, trend and alerts.
//! - [`notify`]: alerts to `--alert-exec` and `--alert-webhook`.

pub mod memlimit;
pub mod notify;
pub mod watch;

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::schema::SiteReport;
pub use crate::schema::{Alert, Level, MemoryStatus, OomKill};

/// Robust growth trend of a memory series.
///
/// The slope is Theil–Sen's (the median of the slopes between all pairs of
/// points), which a GC saw-tooth, a single burst or noisy samples barely move,
/// unlike a least-squares fit. The level the ETA starts from is the recent
/// peak, so a saw-tooth's highs — which are what hits the limit — count.
#[derive(Debug)]
pub struct Trend {
    window: Duration,
    samples: VecDeque<(Instant, f64)>,
}

impl Trend {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// The history the trend is computed over.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn push(&mut self, t: Instant, usage: u64) {
        self.samples.push_back((t, usage as f64));
        while self
            .samples
            .front()
            .is_some_and(|(s, _)| t.duration_since(*s) > self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second, once there are enough samples (five, over at least
    /// a few seconds) to tell a trend from a blip.
    pub fn slope(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        if self.samples.len() < 5 || last.0.duration_since(first.0) < Duration::from_secs(3) {
            return None;
        }
        let t0 = first.0;
        let pts: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|(t, v)| (t.duration_since(t0).as_secs_f64(), *v))
            .collect();
        Some(theil_sen(&pts))
    }

    /// The highest usage of the last quarter of the window.
    pub fn recent_peak(&self) -> Option<f64> {
        let last = self.samples.back()?.0;
        let span = self.window / 4;
        self.samples
            .iter()
            .filter(|(t, _)| last.duration_since(*t) <= span)
            .map(|(_, v)| *v)
            .reduce(f64::max)
    }

    /// Seconds until `limit` at the current trend; None when not growing,
    /// or before the history spans a quarter of the window: a few seconds
    /// of a burst (another process's, at system scope) are no trend to
    /// raise an alert on.
    pub fn eta(&self, limit: u64) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        if last.0.duration_since(first.0) < self.window / 4 {
            return None;
        }
        let slope = self.slope()?;
        if slope <= 0.0 {
            return None;
        }
        let level = self.recent_peak()?;
        Some(((limit as f64 - level) / slope).max(0.0))
    }
}

/// Median of pairwise slopes (lower median: a trend must hold for most pairs).
pub fn theil_sen(pts: &[(f64, f64)]) -> f64 {
    // Bound the O(n²) pair count on long windows by thinning evenly.
    let step = pts.len().div_ceil(200).max(1);
    let pts: Vec<&(f64, f64)> = pts.iter().step_by(step).collect();
    let mut slopes = Vec::with_capacity(pts.len() * pts.len() / 2);
    for i in 0..pts.len() {
        for j in i + 1..pts.len() {
            let dx = pts[j].0 - pts[i].0;
            if dx > 1e-9 {
                slopes.push((pts[j].1 - pts[i].1) / dx);
            }
        }
    }
    if slopes.is_empty() {
        return 0.0;
    }
    slopes.sort_by(f64::total_cmp);
    slopes[(slopes.len() - 1) / 2]
}

/// Thresholds (flags of the command line).
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub warn_eta: Duration,
    pub crit_eta: Duration,
    /// Fractions of the limit.
    pub warn_usage: f64,
    pub crit_usage: f64,
    /// Least time between two alerts of an unchanged level.
    pub reminder: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            warn_eta: Duration::from_secs(300),
            crit_eta: Duration::from_secs(60),
            warn_usage: 0.80,
            crit_usage: 0.95,
            reminder: Duration::from_secs(60),
        }
    }
}

/// Decides when to alert: one alert per level change, a reminder at most
/// every `reminder` while it lasts, and a level drops only after its
/// condition has been clear for `CLEAR_SAMPLES` evaluations with a margin.
pub struct Alerter {
    pub thresholds: Thresholds,
    level: Level,
    last_sent: Option<Instant>,
    clear_streak: u32,
}

const CLEAR_SAMPLES: u32 = 5;
/// Usage must fall this far below a threshold to clear it.
const USAGE_MARGIN: f64 = 0.05;

impl Alerter {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            level: Level::Ok,
            last_sent: None,
            clear_streak: 0,
        }
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// The level the numbers call for, with the reason; `margin` raises the
    /// bar for leaving a level (hysteresis).
    fn raw_level(&self, usage: f64, eta: Option<f64>, margin: f64) -> (Level, String) {
        let th = &self.thresholds;
        let eta_under =
            |d: Duration| eta.is_some_and(|e| e < d.as_secs_f64() * (1.0 + margin * 4.0));
        let pct = |f: f64| format!("{:.0}%", f * 100.0);
        if usage >= th.crit_usage - margin {
            return (
                Level::Critical,
                format!("usage at {} of the limit", pct(usage)),
            );
        }
        if eta_under(th.crit_eta) {
            return (
                Level::Critical,
                format!(
                    "limit reached in ~{:.0} s at the current growth",
                    eta.unwrap_or(0.0)
                ),
            );
        }
        if usage >= th.warn_usage - margin {
            return (
                Level::Warning,
                format!("usage at {} of the limit", pct(usage)),
            );
        }
        if eta_under(th.warn_eta) {
            return (
                Level::Warning,
                format!(
                    "limit reached in ~{:.0} s at the current growth",
                    eta.unwrap_or(0.0)
                ),
            );
        }
        (Level::Ok, "usage back under the thresholds".into())
    }

    /// Evaluates one sample: `Some((level, reason))` when an alert is due.
    pub fn evaluate(
        &mut self,
        now: Instant,
        usage_fraction: Option<f64>,
        eta: Option<f64>,
    ) -> Option<(Level, String)> {
        let usage = usage_fraction.unwrap_or(0.0);
        let (raw, reason) = self.raw_level(usage, eta, 0.0);
        if raw > self.level {
            self.level = raw;
            self.clear_streak = 0;
            self.last_sent = Some(now);
            return Some((raw, reason));
        }
        if raw < self.level {
            // Leave the level only when clearly and lastingly below it.
            let (with_margin, _) = self.raw_level(usage, eta, USAGE_MARGIN);
            if with_margin < self.level {
                self.clear_streak += 1;
            } else {
                self.clear_streak = 0;
            }
            if self.clear_streak >= CLEAR_SAMPLES {
                self.level = with_margin;
                self.clear_streak = 0;
                self.last_sent = Some(now);
                return Some((with_margin, reason));
            }
        } else {
            self.clear_streak = 0;
        }
        if self.level > Level::Ok
            && self
                .last_sent
                .is_none_or(|t| now.duration_since(t) >= self.thresholds.reminder)
        {
            self.last_sent = Some(now);
            let (_, reason) = self.raw_level(usage, eta, 0.0);
            return Some((self.level, format!("still: {reason}")));
        }
        None
    }
}

/// The sites to blame: the fastest growing over the trend window (bytes, then
/// counts for goroutines and timers), then the largest holders.
pub fn culprits(sites: &[SiteReport], n: usize) -> Vec<SiteReport> {
    let mut growing: Vec<&SiteReport> = sites
        .iter()
        .filter(|s| s.growth_bytes_per_s > 0.0)
        .collect();
    growing.sort_by(|a, b| b.growth_bytes_per_s.total_cmp(&a.growth_bytes_per_s));
    let mut out: Vec<SiteReport> = growing.into_iter().take(n).cloned().collect();
    let mut counted: Vec<&SiteReport> = sites
        .iter()
        .filter(|s| s.outstanding_bytes == 0 && s.growth_count_per_s > 0.0)
        .collect();
    counted.sort_by(|a, b| b.growth_count_per_s.total_cmp(&a.growth_count_per_s));
    out.extend(counted.into_iter().take(n / 2 + 1).cloned());
    if out.is_empty() {
        out.extend(
            sites
                .iter()
                .filter(|s| s.outstanding_bytes > 0)
                .take(n)
                .cloned(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(f: impl Fn(f64) -> f64, secs: usize, per_s: usize) -> Trend {
        let t0 = Instant::now();
        let mut tr = Trend::new(Duration::from_secs(60));
        for i in 0..secs * per_s {
            let x = i as f64 / per_s as f64;
            tr.push(t0 + Duration::from_secs_f64(x), f(x).max(0.0) as u64);
        }
        tr
    }

    const MIB: f64 = 1048576.0;

    #[test]
    fn linear_growth_gives_slope_and_eta() {
        let tr = series(|x| 10.0 * MIB + x * MIB, 30, 2);
        let s = tr.slope().unwrap();
        assert!((s - MIB).abs() < 0.01 * MIB, "{s}");
        // At 39.5 MiB, 64 MiB is ~24.5 s away.
        let eta = tr.eta(64 << 20).unwrap();
        assert!((eta - 24.5).abs() < 1.0, "{eta}");
    }

    /// A steep climb seen for less than a quarter of the window gives a
    /// slope but no ETA yet: no alert on a few seconds of a burst.
    #[test]
    fn no_eta_before_a_quarter_of_the_window() {
        let tr = series(|x| 10.0 * MIB + x * 100.0 * MIB, 14, 2);
        assert!(tr.slope().is_some());
        assert_eq!(tr.eta(2048 << 20), None, "14 s of a 60 s window");
        let tr = series(|x| 10.0 * MIB + x * 100.0 * MIB, 16, 2);
        assert!(tr.eta(4096 << 20).is_some(), "16 s");
    }

    #[test]
    fn gc_sawtooth_follows_the_underlying_trend() {
        // A heap that grows 0.5 MiB/s underneath a 20 MiB GC saw-tooth of
        // period 4 s.
        let tr = series(
            |x| 30.0 * MIB + 0.5 * MIB * x + 20.0 * MIB * ((x % 4.0) / 4.0),
            60,
            2,
        );
        let s = tr.slope().unwrap();
        assert!((s - 0.5 * MIB).abs() < 0.15 * MIB, "{s}");
        // The ETA counts from the peaks, which are what hit the limit.
        assert!(tr.recent_peak().unwrap() > 75.0 * MIB);
    }

    #[test]
    fn flat_sawtooth_has_no_eta() {
        let tr = series(|x| 30.0 * MIB + 20.0 * MIB * ((x % 4.0) / 4.0), 60, 2);
        let s = tr.slope().unwrap();
        assert!(s.abs() < 0.05 * MIB, "{s}");
        assert!(tr.eta(64 << 20).is_none_or(|e| e > 600.0));
    }

    #[test]
    fn a_single_step_is_not_a_trend() {
        // A 30 MiB burst at t=20 s, flat before and after.
        let tr = series(|x| if x < 20.0 { 10.0 * MIB } else { 40.0 * MIB }, 60, 2);
        let s = tr.slope().unwrap();
        assert!(s.abs() < 0.01 * MIB, "{s}");
    }

    #[test]
    fn noise_does_not_hide_growth() {
        // Deterministic pseudo-noise of ±4 MiB on 1 MiB/s growth.
        let noise = |x: f64| ((x * 7919.0).sin() * 4.0) * MIB;
        let tr = series(|x| 20.0 * MIB + MIB * x + noise(x), 40, 2);
        let s = tr.slope().unwrap();
        assert!((s - MIB).abs() < 0.2 * MIB, "{s}");
    }

    #[test]
    fn needs_enough_samples() {
        let tr = series(|x| x * MIB, 1, 2);
        assert!(tr.slope().is_none());
    }

    #[test]
    fn levels_escalate_at_once_and_clear_with_hysteresis() {
        let mut a = Alerter::new(Thresholds::default());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(a.evaluate(at(0), Some(0.5), None), None);
        let (l, reason) = a.evaluate(at(1), Some(0.5), Some(200.0)).unwrap();
        assert_eq!(l, Level::Warning);
        assert!(reason.contains("200 s"), "{reason}");
        // Same level: no new alert until the reminder is due.
        assert_eq!(a.evaluate(at(2), Some(0.6), Some(150.0)), None);
        let (l, _) = a.evaluate(at(3), Some(0.96), Some(100.0)).unwrap();
        assert_eq!(l, Level::Critical);
        // Flapping just under 95% does not clear critical.
        for s in 4..20 {
            assert_eq!(a.evaluate(at(s), Some(0.93), None), None, "t={s}");
        }
        // Reminder after 60 s.
        let (l, reason) = a.evaluate(at(64), Some(0.96), None).unwrap();
        assert_eq!(l, Level::Critical);
        assert!(reason.starts_with("still"));
        // Clearly lower for five samples: drops to ok in one step.
        let mut out = None;
        for s in 65..71 {
            if let Some(x) = a.evaluate(at(s), Some(0.3), None) {
                out = Some((s, x));
                break;
            }
        }
        let (s, (l, _)) = out.unwrap();
        assert_eq!(l, Level::Ok);
        assert_eq!(s, 69, "after five clear samples");
        assert_eq!(a.level(), Level::Ok);
    }
}

//! What the probes cost the traced process, measured rather than guessed.
//!
//! Every probe hit is a trap taken on the target's own CPU time, then an
//! eBPF program run. The kernel times the programs when run-time statistics
//! are on (`BPF_ENABLE_STATS`, held by [`crate::kernel::Kernel`]); the trap
//! itself it does not time, so the tracer calibrates it once per run on a
//! function of its own under an empty program ([`calibrate`]). Each interval
//! the hits and program time since the last one, priced so, are set against
//! the target's CPU time in the same interval:
//!
//! - `share`: the part of the target's CPU time spent in probes, which a
//!   CPU-bound service loses in throughput;
//! - `added`: how much more CPU the same work takes, share / (1 - share).

use std::{collections::VecDeque, time::Instant};

use crate::schema::Overhead;

/// What a trap costs on this machine and kernel, an empty program included.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrapCost {
    /// A uprobe hit on an instruction the kernel emulates.
    pub emulated_ns: f64,
    /// A uprobe hit on an instruction it single-steps.
    pub stepped_ns: f64,
    /// A return probe on a function whose first instruction is emulated:
    /// the hit there that arms it, and the return.
    pub return_ns: f64,
}

impl TrapCost {
    /// What a return adds to its entry's hit.
    fn return_part(&self) -> f64 {
        (self.return_ns - self.emulated_ns).max(0.0)
    }
}

/// How a program's runs are priced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// Each run is one hit at an instruction.
    Entry,
    /// Each run is a return, armed by a hit at the function's entry.
    Return,
    /// Runs are entries (one per allocation call) and the returns of the
    /// calls the entry kept.
    Session,
}

/// One program's hits and time, cumulative since load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProgramRuns {
    pub program: tracer_common::Program,
    pub kind: RunKind,
    pub runs: u64,
    pub bpf_ns: u64,
    /// Entry hits of its probes on instructions the kernel emulates.
    pub emulated_hits: u64,
    /// Entry hits of its probes on instructions it single-steps.
    pub stepped_hits: u64,
}

/// One reading: every program's runs, the target's CPU seconds.
#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    runs: Vec<ProgramRuns>,
    cpu_s: f64,
}

/// Readings over a sliding window, turned into an [`Overhead`].
#[derive(Debug)]
pub struct Estimator {
    trap: TrapCost,
    readings: VecDeque<Reading>,
    /// The window: long enough for the CPU clock's 10 ms ticks to average.
    window: std::time::Duration,
}

impl Estimator {
    pub fn new(trap: TrapCost) -> Self {
        Self {
            trap,
            readings: VecDeque::new(),
            window: std::time::Duration::from_secs(10),
        }
    }

    /// The calibrated trap cost.
    pub fn trap_cost(&self) -> TrapCost {
        self.trap
    }

    /// Adds a reading; the estimate over the window once two readings at
    /// least half a second apart exist.
    pub fn update(&mut self, at: Instant, runs: Vec<ProgramRuns>, cpu_s: f64) -> Option<Overhead> {
        self.readings.push_back(Reading { at, runs, cpu_s });
        while self.readings.len() > 2 && at.duration_since(self.readings[1].at) >= self.window {
            self.readings.pop_front();
        }
        let first = self.readings.front()?;
        let secs = at.duration_since(first.at).as_secs_f64();
        if secs < 0.5 {
            return None;
        }
        Some(estimate(self.trap, first, self.readings.back()?, secs))
    }
}

fn estimate(trap: TrapCost, a: &Reading, b: &Reading, secs: f64) -> Overhead {
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64;
    let (mut calls, mut hits, mut trap_ns, mut bpf_ns) = (0.0, 0.0, 0.0, 0.0);
    // What no sampling rate removes: the entry traps, and the programs that
    // run in full whatever the rate (frees, the Go runtime's events).
    let mut floor_ns = 0.0;
    let (mut kept, mut decided) = (0.0, 0.0);
    for now in &b.runs {
        let before = a
            .runs
            .iter()
            .find(|r| r.program == now.program)
            .map_or((0, 0), |r| (r.runs, r.bpf_ns));
        let runs = d(before.0, now.runs);
        let program_ns = d(before.1, now.bpf_ns);
        let (emulated, stepped) = a.runs.iter().find(|r| r.program == now.program).map_or(
            (now.emulated_hits as f64, now.stepped_hits as f64),
            |r| {
                (
                    d(r.emulated_hits, now.emulated_hits),
                    d(r.stepped_hits, now.stepped_hits),
                )
            },
        );
        let entry_traps = emulated * trap.emulated_ns + stepped * trap.stepped_ns;
        bpf_ns += program_ns;
        hits += runs;
        match now.kind {
            RunKind::Entry => {
                calls += runs;
                trap_ns += entry_traps;
                if now
                    .program
                    .kind()
                    .is_some_and(|k| !is_sampled_kind(now.program, k))
                {
                    floor_ns += entry_traps + program_ns;
                } else {
                    floor_ns += entry_traps;
                }
            }
            RunKind::Return => {
                // The return probe shares its entry program's instruction
                // (the plan puts both there): one trap serves both, and the
                // call is counted there.
                trap_ns += runs * trap.return_part();
                floor_ns += runs * trap.return_part();
                kept += runs;
                decided += runs;
            }
            RunKind::Session => {
                let entries = (emulated + stepped).min(runs);
                calls += entries;
                trap_ns += entry_traps + (runs - entries) * trap.return_part();
                floor_ns += entry_traps;
                kept += runs - entries;
                decided += entries;
            }
        }
    }
    let cost_s = (trap_ns + bpf_ns) / 1e9;
    let cpu_s = (b.cpu_s - a.cpu_s).max(0.0);
    // The clock's ticks can put the target's CPU below the probes' own.
    let share = if cpu_s > 0.0 {
        (cost_s / cpu_s).min(1.0)
    } else {
        0.0
    };
    let floor_share = if cpu_s > 0.0 {
        (floor_ns / 1e9 / cpu_s).min(share)
    } else {
        0.0
    };
    Overhead {
        floor_share_pct: floor_share * 100.0,
        // Returns of calls entered before the window can tip it past 100.
        kept_pct: if decided > 0.0 {
            (kept / decided * 100.0).min(100.0)
        } else {
            100.0
        },
        calls_per_s: calls / secs,
        hits_per_s: hits / secs,
        ns_per_call: if calls > 0.0 {
            (trap_ns + bpf_ns) / calls
        } else {
            0.0
        },
        bpf_ns_per_hit: if hits > 0.0 { bpf_ns / hits } else { 0.0 },
        trap_ns: trap.emulated_ns,
        stepped_trap_ns: trap.stepped_ns,
        return_trap_ns: trap.return_ns,
        cores: cost_s / secs,
        target_cores: cpu_s / secs,
        share_pct: share * 100.0,
        // Capped: a share of 1 means the probes take all the target's time.
        added_cpu_pct: (share / (1.0 - share).max(1e-4) * 100.0).min(1e6),
        window_s: secs,
    }
}

/// Whether `program`'s calls are the ones a sampling rate leaves out:
/// allocations (heap and mappings), not frees nor the Go runtime's events.
fn is_sampled_kind(program: tracer_common::Program, kind: tracer_common::Kind) -> bool {
    matches!(kind, tracer_common::Kind::Heap | tracer_common::Kind::Mmap) && !program.frees()
}

/// The target's CPU time so far (user + system, every thread), seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), 12 and 13 here.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// The functions the calibration times, the tracer's own, so that the
/// probes touch nothing but the tracer. The kernel emulates a few
/// instructions at a uprobe (`push %rbp` here) and single-steps the others
/// (`lea` here) out of line; a single step can cost far more (a debug trap,
/// which a hypervisor may intercept: ~35× here), so both are timed.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn tracer_calibration_emulated(x: u64) -> u64 {
    core::arch::naked_asm!(
        "push rbp",
        "mov rbp, rsp",
        "lea rax, [rdi + 1]",
        "pop rbp",
        "ret"
    )
}

/// See [`tracer_calibration_emulated`].
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn tracer_calibration_stepped(x: u64) -> u64 {
    core::arch::naked_asm!("lea rax, [rdi + 1]", "ret")
}

/// A function to time under a probe.
pub type CalibrationPoint = extern "C" fn(u64) -> u64;

/// Where `f` is in the tracer's executable: its path (as mapped) and file
/// offset.
pub fn calibration_point(f: CalibrationPoint) -> Option<(std::path::PathBuf, u64)> {
    let addr = f as *const () as u64;
    let maps = crate::target::Maps::read(std::process::id()).ok()?;
    let m = maps
        .mappings
        .iter()
        .find(|m| m.executable && m.start <= addr && addr < m.end)?;
    Some((m.open_path.clone(), addr - m.start + m.offset))
}

/// Nanoseconds per call of `f`, the best of a few timed loops (the least
/// disturbed by other work on the machine).
pub fn time_calls(f: CalibrationPoint, n: u64) -> f64 {
    let f = std::hint::black_box(f);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let mut x = 0;
            for _ in 0..n {
                x = f(x);
            }
            std::hint::black_box(x);
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    use tracer_common::Program;

    /// A program's runs, of which `emulated` and `stepped` entry hits.
    fn program(
        program: Program,
        kind: RunKind,
        runs: u64,
        bpf_ns: u64,
        (emulated_hits, stepped_hits): (u64, u64),
    ) -> ProgramRuns {
        ProgramRuns {
            program,
            kind,
            runs,
            bpf_ns,
            emulated_hits,
            stepped_hits,
        }
    }

    fn reading(at: Instant, runs: Vec<ProgramRuns>, cpu_s: f64) -> Reading {
        Reading { at, runs, cpu_s }
    }

    #[test]
    fn prices_traps_and_programs_against_the_targets_cpu() {
        let trap = TrapCost {
            emulated_ns: 1000.0,
            stepped_ns: 5000.0,
            return_ns: 2500.0,
        };
        let t0 = Instant::now();
        let a = reading(t0, vec![], 10.0);
        // In 1 s: 100k frees (emulated), 10k Go RET hits (stepped), 50k
        // uretprobe returns, sessions for 100k
        // allocations of which 10k were kept; 0.1 s of program time. The
        // target used 0.9 s of CPU.
        let b = reading(
            t0 + std::time::Duration::from_secs(1),
            vec![
                program(
                    Program::FreeEnter,
                    RunKind::Entry,
                    100_000,
                    40_000_000,
                    (100_000, 0),
                ),
                program(
                    Program::GoNewproc1Ret,
                    RunKind::Entry,
                    10_000,
                    10_000_000,
                    (0, 10_000),
                ),
                program(
                    Program::AllocReturn,
                    RunKind::Return,
                    50_000,
                    30_000_000,
                    (0, 0),
                ),
                program(
                    Program::AllocSession,
                    RunKind::Session,
                    110_000,
                    20_000_000,
                    (100_000, 0),
                ),
            ],
            10.9,
        );
        let o = estimate(trap, &a, &b, 1.0);
        // Traps: 100k × 1 µs + 10k × 5 µs + 50k × 1.5 µs (returns, at
        // their entry program's trap) + 100k × 1 µs + 10k × 1.5 µs = 0.34 s,
        // and 0.1 s in programs.
        let cost = 0.1 + 0.05 + 0.075 + 0.1 + 0.015 + 0.1;
        assert!((o.cores - cost).abs() < 1e-9, "{o:?}");
        assert!((o.share_pct - cost / 0.9 * 100.0).abs() < 1e-6);
        assert!((o.added_cpu_pct - cost / (0.9 - cost) * 100.0).abs() < 1e-6);
        assert_eq!(o.calls_per_s, 210_000.0);
        assert_eq!(o.hits_per_s, 270_000.0);
    }

    #[test]
    fn a_window_slides_and_needs_half_a_second() {
        let trap = TrapCost {
            emulated_ns: 1000.0,
            stepped_ns: 1000.0,
            return_ns: 2000.0,
        };
        let mut e = Estimator::new(trap);
        let t0 = Instant::now();
        let runs = |n: u64| vec![program(Program::FreeEnter, RunKind::Entry, n, 0, (n, 0))];
        assert!(e.update(t0, runs(0), 0.0).is_none());
        for s in 1..=30u64 {
            let at = t0 + std::time::Duration::from_secs(s);
            // 1000 calls/s for 20 s, then 10,000/s.
            let n = if s <= 20 {
                s * 1000
            } else {
                20_000 + (s - 20) * 10_000
            };
            let o = e.update(at, runs(n), s as f64).unwrap();
            if s == 30 {
                assert_eq!(o.calls_per_s, 10_000.0, "{o:?}");
                assert!(o.window_s <= 10.0);
            }
        }
    }

    #[test]
    fn the_calibration_points_are_found_and_decode_as_intended() {
        use iced_x86::{Decoder, DecoderOptions};
        for (f, emulated) in [
            (tracer_calibration_emulated as CalibrationPoint, true),
            (tracer_calibration_stepped as CalibrationPoint, false),
        ] {
            assert_eq!(f(41), 42);
            let (path, offset) = calibration_point(f).unwrap();
            let data = std::fs::read(&path).unwrap();
            let code = &data[offset as usize..][..16];
            let ins = Decoder::with_ip(64, code, 0, DecoderOptions::NONE).decode();
            assert_eq!(
                crate::probes::placement::is_emulated(&ins),
                emulated,
                "{:?}",
                ins.mnemonic()
            );
        }
    }
}

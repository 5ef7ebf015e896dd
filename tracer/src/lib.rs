//! `tracer`: live per-call-site allocation tracing of unmodified processes.
//!
//! The flow is the architecture, one module per stage:
//! [`target`] (resolve the process) → [`probes`] (choose what to hook; Go's
//! in [`go`]) → [`kernel`] (load, attach, read kernel maps) → [`collect`] and
//! [`symbolize`] (snapshots with symbolized stacks and growth) → [`sink`]
//! (terminal, JSON, metrics, exports) and [`alert`] (the memory watch).
//! [`session`] runs the flow for `tracer attach`, `watch` and `run`, with
//! [`process`] for process control; [`schema`] is everything on the wire;
//! [`report`] replays a recorded JSON stream into the same sinks; [`object`]
//! reads ELF files for all of them.

pub mod alert;
pub mod cgroup;
pub mod collect;
pub mod error;
pub mod go;
pub mod kernel;
pub mod object;
pub mod options;
pub mod overhead;
pub mod probes;
pub mod process;
pub mod report;
pub mod schema;
pub mod session;
pub mod sink;
pub mod symbolize;
pub mod target;
pub mod unwind;

pub use error::TracerError;

//! `tracer`: live per-call-site allocation tracing of unmodified processes.
//!
//! The flow is the architecture, one module per stage:
//! [`target`] (resolve the process) → [`probes`] (choose what to hook) →
//! [`kernel`] (load, attach, read kernel maps) → [`collect`] and [`symbolize`]
//! (snapshots with symbolized stacks and growth) → [`sink`] (terminal, JSON).
//! [`session`] runs the flow for `tracer attach` and `tracer run`;
//! [`report`] replays a recorded JSON stream into the same sinks.

pub mod alert;
pub mod collect;
pub mod error;
pub mod go;
pub mod kernel;
pub mod object;
pub mod options;
pub mod probes;
pub mod process;
pub mod report;
pub mod schema;
pub mod session;
pub mod sink;
pub mod symbolize;
pub mod target;

pub use error::TracerError;

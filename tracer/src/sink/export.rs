//! Files written from a snapshot on demand (SIGUSR1) and at the end: the
//! pprof profile, folded stacks and the flame graph.

use std::path::PathBuf;

use crate::{error::TracerError, schema::Snapshot};

/// Where each export goes; None: not wanted.
#[derive(Clone, Debug, Default)]
pub struct Exports {
    /// Gzipped pprof profile of in-use memory (goroutine and timer profiles
    /// next to it).
    pub pprof: Option<PathBuf>,
    /// Folded-stack text.
    pub folded: Option<PathBuf>,
    /// Flame graph SVG.
    pub flamegraph: Option<PathBuf>,
}

impl Exports {
    pub fn is_empty(&self) -> bool {
        self.pprof.is_none() && self.folded.is_none() && self.flamegraph.is_none()
    }

    /// Writes every wanted export of `snap`; returns the files written.
    pub fn write(&self, snap: &Snapshot) -> Result<Vec<PathBuf>, TracerError> {
        let failed = |path: &PathBuf| {
            let path = path.clone();
            move |source| TracerError::Export { path, source }
        };
        let mut written = Vec::new();
        if let Some(path) = &self.pprof {
            written.extend(super::pprof::write(snap, path).map_err(failed(path))?);
        }
        if let Some(path) = &self.folded {
            super::flame::write_folded(snap, path).map_err(failed(path))?;
            written.push(path.clone());
        }
        if let Some(path) = &self.flamegraph
            && super::flame::write_flamegraph(snap, path).map_err(failed(path))?
        {
            written.push(path.clone());
        }
        Ok(written)
    }
}

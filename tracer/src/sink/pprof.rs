//! In-use profiles in pprof's format (gzipped `profile.proto`), readable by
//! `go tool pprof`, Grafana Pyroscope and Parca.
//!
//! Memory sites (heap, mmap, Go's sampled heap) go into one profile with Go's heap
//! sample types (`alloc_objects`, `alloc_space`, `inuse_objects`,
//! `inuse_space`, the default); a `kind` label tells them apart. Goroutines
//! and timers are counts, not bytes: each gets a profile of its own next to
//! it (`NAME.goroutines.pb.gz`, `NAME.timers.pb.gz`).

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    time::UNIX_EPOCH,
};

use flate2::{Compression, write::GzEncoder};
use prost::Message;

use crate::{
    schema::{SiteKind, SiteReport, Snapshot},
    symbolize::Frame,
};

/// The messages of pprof's `profile.proto` (github.com/google/pprof,
/// proto/profile.proto), field numbers as there.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

/// Which sites a profile holds and what it measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileKind {
    /// heap, mmap and Go heap sites, in bytes and objects.
    Memory,
    Goroutines,
    Timers,
}

impl ProfileKind {
    fn holds(self, kind: SiteKind) -> bool {
        match self {
            // Go's sampled heap is "heap" too.
            Self::Memory => matches!(kind, SiteKind::Heap | SiteKind::Mmap),
            Self::Goroutines => kind == SiteKind::Goroutine,
            Self::Timers => kind == SiteKind::Timer,
        }
    }

    /// `(type, unit)` of each sample value.
    fn sample_types(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Memory => &[
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes"),
            ],
            Self::Goroutines => &[("goroutine", "count")],
            Self::Timers => &[("timer", "count")],
        }
    }

    fn values(self, s: &SiteReport) -> Vec<i64> {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        match self {
            Self::Memory => vec![
                i(s.allocs),
                i(s.alloc_bytes),
                i(s.outstanding_count),
                i(s.outstanding_bytes),
            ],
            Self::Goroutines | Self::Timers => vec![i(s.outstanding_count)],
        }
    }

    /// The file this profile goes to, next to the memory profile's `path`.
    pub fn path(self, path: &Path) -> PathBuf {
        let suffix = match self {
            Self::Memory => return path.to_path_buf(),
            Self::Goroutines => "goroutines",
            Self::Timers => "timers",
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = name
            .strip_suffix(".pb.gz")
            .or_else(|| name.strip_suffix(".gz"))
            .unwrap_or(&name);
        path.with_file_name(format!("{stem}.{suffix}.pb.gz"))
    }
}

/// Interns strings, locations and functions while a profile is built.
#[derive(Default)]
struct Builder {
    profile: proto::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String), u64>,
    locations: HashMap<(u64, Vec<(u64, i64)>), u64>,
    mappings: HashMap<String, u64>,
}

impl Builder {
    fn new() -> Self {
        let mut b = Self::default();
        // pprof requires string_table[0] == "".
        b.string("");
        b
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, f: &Frame) -> u64 {
        let key = (f.function.clone(), f.file.clone().unwrap_or_default());
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let name = self.string(&key.0);
        let filename = self.string(&key.1);
        self.profile.function.push(proto::Function {
            id,
            name,
            system_name: name,
            filename,
        });
        self.functions.insert(key, id);
        id
    }

    fn mapping(&mut self, snap: &Snapshot, module: Option<&str>, addr: u64) -> u64 {
        let Some(module) = module else { return 0 };
        // The executable mapping holding the address; the module's first one
        // when the address lies elsewhere (a frame of a since-unmapped
        // library keeps its name).
        let found = snap
            .mappings
            .iter()
            .find(|m| m.path == module && m.start <= addr && addr < m.end)
            .or_else(|| snap.mappings.iter().find(|m| m.path == module));
        let key = match found {
            Some(m) => format!("{}@{:x}", m.path, m.start),
            None => module.to_string(),
        };
        if let Some(&id) = self.mappings.get(&key) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(module);
        let (memory_start, memory_limit, file_offset) =
            found.map_or((0, 0, 0), |m| (m.start, m.end, m.offset));
        self.profile.mapping.push(proto::Mapping {
            id,
            memory_start,
            memory_limit,
            file_offset,
            filename,
            build_id: 0,
            // Already symbolized: readers must not try again.
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mappings.insert(key, id);
        id
    }

    /// Locations of a stack, innermost first. A run of inlined frames and the
    /// frame they were inlined into share one location, whose lines list
    /// the innermost first, as pprof expects.
    fn locations(&mut self, snap: &Snapshot, frames: &[Frame]) -> Vec<u64> {
        let mut ids = Vec::new();
        let mut lines: Vec<(u64, i64)> = Vec::new();
        for f in frames {
            lines.push((self.function(f), i64::from(f.line.unwrap_or(0))));
            if f.inlined {
                continue;
            }
            let key = (f.addr, std::mem::take(&mut lines));
            if let Some(&id) = self.locations.get(&key) {
                ids.push(id);
                continue;
            }
            let id = self.profile.location.len() as u64 + 1;
            let mapping_id = self.mapping(snap, f.module.as_deref(), f.addr);
            self.profile.location.push(proto::Location {
                id,
                mapping_id,
                address: f.addr,
                line: key
                    .1
                    .iter()
                    .map(|&(function_id, line)| proto::Line { function_id, line })
                    .collect(),
            });
            self.locations.insert(key, id);
            ids.push(id);
        }
        ids
    }
}

/// The profile of `kind` for a snapshot, or None when it has no such site.
pub fn profile(snap: &Snapshot, kind: ProfileKind) -> Option<proto::Profile> {
    let sites: Vec<&SiteReport> = snap.sites.iter().filter(|s| kind.holds(s.kind)).collect();
    if sites.is_empty() && kind != ProfileKind::Memory {
        return None;
    }
    let mut b = Builder::new();
    // Readers take the first mapping for the program itself: register them
    // in address order, where the executable (non-PIE or PIE) comes first.
    let mut mappings: Vec<_> = snap.mappings.iter().collect();
    mappings.sort_by_key(|m| m.start);
    for m in mappings {
        b.mapping(snap, Some(&m.path), m.start);
    }
    for (ty, unit) in kind.sample_types() {
        let vt = proto::ValueType {
            r#type: b.string(ty),
            unit: b.string(unit),
        };
        b.profile.sample_type.push(vt);
    }
    b.profile.default_sample_type = b.profile.sample_type.last().map_or(0, |t| t.r#type);
    let comment = format!(
        "tracer {}: in use in pid {}",
        env!("CARGO_PKG_VERSION"),
        snap.pid
    );
    let comment = b.string(&comment);
    b.profile.comment.push(comment);
    // Milliseconds, as in the JSON stream: a profile replayed from a
    // recording is then the very profile written live.
    b.profile.time_nanos = snap.ts.duration_since(UNIX_EPOCH).map_or(0, |d| {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 1_000_000) * 1_000_000
    });
    let kind_key = b.string("kind");
    let start_key = b.string("start_function");
    let site_key = b.string("site");
    for s in sites {
        let location_id = b.locations(snap, &s.frames);
        let mut label = vec![
            proto::Label {
                key: kind_key,
                str: b.string(s.kind.as_str()),
                ..Default::default()
            },
            proto::Label {
                key: site_key,
                str: b.string(&s.site_id),
                ..Default::default()
            },
        ];
        if let Some(start) = &s.start_function {
            label.push(proto::Label {
                key: start_key,
                str: b.string(&start.function),
                ..Default::default()
            });
        }
        b.profile.sample.push(proto::Sample {
            location_id,
            value: kind.values(s),
            label,
        });
    }
    Some(b.profile)
}

/// Writes the memory profile to `path` and, when the target has goroutine or
/// timer sites, their profiles next to it. Each file is replaced atomically
/// (readers never see half a profile). Returns the files written.
pub fn write(snap: &Snapshot, path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for kind in [
        ProfileKind::Memory,
        ProfileKind::Goroutines,
        ProfileKind::Timers,
    ] {
        let Some(p) = profile(snap, kind) else {
            continue;
        };
        let dest = kind.path(path);
        let tmp = dest.with_extension("tmp");
        let mut gz = GzEncoder::new(std::fs::File::create(&tmp)?, Compression::default());
        gz.write_all(&p.encode_to_vec())?;
        gz.finish()?.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        written.push(dest);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, line: u32, addr: u64, inlined: bool) -> Frame {
        Frame {
            function: function.into(),
            file: Some("a.c".into()),
            line: Some(line),
            module: Some("/bin/a".into()),
            addr,
            inlined,
        }
    }

    fn snapshot() -> Snapshot {
        let site = |kind, id: &str, frames: Vec<Frame>, bytes, count| SiteReport {
            site_id: id.into(),
            kind,
            outstanding_bytes: bytes,
            outstanding_count: count,
            allocs: count + 1,
            frees: 1,
            alloc_bytes: bytes + 7,
            growth_bytes_per_s: 0.0,
            growth_count_per_s: 0.0,
            peak: Default::default(),
            states: Default::default(),
            start_function: None,
            sampled: false,
            truncated: false,
            frames: frames.into(),
            process: None,
        };
        Snapshot {
            ts: UNIX_EPOCH,
            pid: 7,
            sites: vec![
                site(
                    SiteKind::Heap,
                    "s1",
                    vec![
                        frame("helper", 3, 0x1010, true),
                        frame("leak", 10, 0x1010, false),
                        frame("main", 20, 0x1100, false),
                    ],
                    1000,
                    10,
                ),
                site(
                    SiteKind::Mmap,
                    "s2",
                    vec![frame("main", 21, 0x1108, false)],
                    4096,
                    1,
                ),
                site(
                    SiteKind::Goroutine,
                    "s3",
                    vec![frame("main", 22, 0x1110, false)],
                    0,
                    5,
                ),
            ],
            lost: Default::default(),
            activity: Default::default(),
            total_outstanding_bytes: 5096,
            memory: None,
            mappings: vec![crate::collect::ModuleMapping {
                path: "/bin/a".into(),
                start: 0x1000,
                end: 0x2000,
                offset: 0,
            }],
            overhead: None,
            previous_images: vec![],
        }
    }

    #[test]
    fn memory_profile_has_heap_sample_types_and_inlined_lines() {
        let p = profile(&snapshot(), ProfileKind::Memory).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<_> = p.sample_type.iter().map(|t| s(t.r#type)).collect();
        assert_eq!(
            types,
            [
                "alloc_objects",
                "alloc_space",
                "inuse_objects",
                "inuse_space"
            ]
        );
        assert_eq!(s(p.default_sample_type), "inuse_space");
        assert_eq!(p.sample.len(), 2, "goroutines are not memory");
        assert_eq!(p.sample[0].value, [11, 1007, 10, 1000]);
        // helper was inlined into leak: one location, two lines, innermost first.
        let loc = &p.location[p.sample[0].location_id[0] as usize - 1];
        let names: Vec<_> = loc
            .line
            .iter()
            .map(|l| s(p.function[l.function_id as usize - 1].name))
            .collect();
        assert_eq!(names, ["helper", "leak"]);
        assert_eq!(p.sample[0].location_id.len(), 2);
        assert_eq!(p.mapping.len(), 1);
        assert_eq!(p.mapping[0].memory_start, 0x1000);
        assert!(p.location.iter().all(|l| l.mapping_id == 1));
    }

    #[test]
    fn counts_get_profiles_of_their_own() {
        let p = profile(&snapshot(), ProfileKind::Goroutines).unwrap();
        assert_eq!(p.sample.len(), 1);
        assert_eq!(p.sample[0].value, [5]);
        assert!(profile(&snapshot(), ProfileKind::Timers).is_none());
        let base = Path::new("/tmp/x/heap.pb.gz");
        assert_eq!(ProfileKind::Memory.path(base), base);
        assert_eq!(
            ProfileKind::Goroutines.path(base),
            Path::new("/tmp/x/heap.goroutines.pb.gz")
        );
        assert_eq!(
            ProfileKind::Timers.path(Path::new("prof")),
            Path::new("prof.timers.pb.gz")
        );
    }

    #[test]
    fn encodes_and_decodes() {
        let p = profile(&snapshot(), ProfileKind::Memory).unwrap();
        let back = proto::Profile::decode(p.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, p);
    }
}

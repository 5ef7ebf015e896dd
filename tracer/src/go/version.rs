//! Which Go release built a binary, and the runtime's struct offsets for it
//! (from DWARF when the binary has it, else the per-release table).

use object::{Object, ObjectSection};
use tracer_common::GoOffsets;

use crate::object::ElfObject;

/// A Go release, from `.go.buildinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// As written by the linker, e.g. `go1.22.10` or `go1.23.4 X:nocoverageredesign`.
    pub raw: String,
}

impl std::fmt::Display for GoVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Parses `go1.22.10`, `go1.23`, `go1.24rc1`, `go1.26.6 X:foo`.
pub fn parse_version(raw: &str) -> Option<GoVersion> {
    let v = raw.split_whitespace().next()?.strip_prefix("go")?;
    let mut nums = v.split(|c: char| !c.is_ascii_digit());
    let major = nums.next()?.parse().ok()?;
    let minor = nums.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let patch = nums.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    Some(GoVersion {
        major,
        minor,
        patch,
        raw: raw.to_string(),
    })
}

/// The Go version of a Go binary: from `.go.buildinfo` (Go 1.18+, inline
/// strings), or, for a binary whose build info was removed, from the
/// `runtime.buildVersion` string of one that has a `.gopclntab`.
pub fn go_version(elf: &ElfObject) -> Option<GoVersion> {
    if let Some((version, _)) = build_info(elf) {
        return parse_version(&version);
    }
    let file = elf.file();
    file.section_by_name(".gopclntab")?;
    let mut found = std::collections::BTreeSet::new();
    for section in file.sections() {
        if section
            .name()
            .is_ok_and(|n| n == ".rodata" || n == ".noptrdata")
            && let Ok(data) = section.data()
        {
            found.extend(version_tokens(data));
        }
    }
    // Only an unambiguous answer: every token agrees.
    (found.len() == 1).then(|| parse_version(found.first()?))?
}

/// `go1.N` / `go1.N.M` tokens standing alone in `data`.
pub(crate) fn version_tokens(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = data[i..].windows(4).position(|w| w == b"go1.") {
        let start = i + at;
        let mut end = start + 4;
        while end < data.len() && (data[end].is_ascii_digit() || data[end] == b'.') {
            end += 1;
        }
        let standalone_before = start == 0 || !data[start - 1].is_ascii_alphanumeric();
        let standalone_after = end == data.len() || !data[end].is_ascii_alphanumeric();
        let token = String::from_utf8_lossy(&data[start..end])
            .trim_end_matches('.')
            .to_string();
        if standalone_before && standalone_after && token.len() > 4 {
            out.push(token);
        }
        i = end.max(start + 1);
    }
    out
}

/// The version and module-info strings of `.go.buildinfo`.
pub fn build_info(elf: &ElfObject) -> Option<(String, String)> {
    let data = elf.section_data(".go.buildinfo")?;
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if data.len() < 32 || &data[..14] != MAGIC || data[15] & 2 == 0 {
        return None;
    }
    let mut at = 32;
    let mut next = || -> Option<String> {
        let (len, n) = read_uvarint(data.get(at..)?)?;
        let s = data.get(at + n..at + n + len as usize)?;
        at += n + len as usize;
        Some(String::from_utf8_lossy(s).into_owned())
    };
    let version = next()?;
    let modinfo = next().unwrap_or_default();
    Some((version, modinfo))
}

/// Whether the binary runs with `asynctimerchan=1` (the pre-1.23 channel
/// timers, held by the runtime until they fire): set by a go.mod older than
/// 1.23 through DefaultGODEBUG, or by a //go:debug directive.
pub fn async_timer_chan(modinfo: &str) -> bool {
    modinfo.lines().any(|l| {
        l.split_once("DefaultGODEBUG=")
            .is_some_and(|(_, v)| v.split(',').any(|kv| kv.trim() == "asynctimerchan=1"))
    })
}

pub(crate) fn read_uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The oldest Go minor release whose runtime layout is known (1.21).
pub const OLDEST_MINOR: u32 = 21;

/// Runtime struct offsets for a Go version, from the table verified on real
/// binaries of each release (1.21–1.27). Returns whether the version is in
/// the table; a newer one gets the newest entry (and the caller warns).
pub fn offsets_for(v: &GoVersion) -> (GoOffsets, bool) {
    let table: &[(u32, u64, u64, u64, u64)] = &[
        // minor, g.goid, g.gopc, g.startpc, timer.period
        (21, 152, 280, 296, 16),
        (22, 152, 280, 296, 16),
        (23, 160, 288, 304, 24),
        (24, 160, 288, 304, 24),
        (25, 152, 280, 296, 32),
        (26, 152, 288, 304, 32),
        (27, 152, 288, 304, 32),
    ];
    let known = v.major == 1 && table.iter().any(|t| t.0 == v.minor);
    let row = table
        .iter()
        .rev()
        .find(|t| v.major > 1 || t.0 <= v.minor)
        .unwrap_or(&table[0]);
    (
        GoOffsets {
            g_goid: row.1,
            g_gopc: row.2,
            g_startpc: row.3,
            timer_period: row.4,
            ..GoOffsets::default()
        },
        known,
    )
}

/// Runtime struct offsets read from the binary's DWARF, which is right for
/// any release (the per-version table is the fallback for stripped binaries).
pub fn offsets_from_dwarf(elf: &ElfObject) -> Option<GoOffsets> {
    dwarf_facts(elf).map(|f| f.offsets)
}

/// What the binary's DWARF says about the runtime's structures.
#[derive(Clone, Copy, Debug)]
pub struct DwarfFacts {
    pub offsets: GoOffsets,
    /// Size of `runtime.memRecordCycle` (32 bytes up to 1.25, 16 since the
    /// byte counts were dropped), needed to read memory-profile records.
    pub mem_record_cycle: Option<u64>,
    /// Offset in `runtime.p` of its timer heap slice: `p.timers` up to
    /// 1.22, `p.timers.heap` since.
    pub timer_heap: Option<u64>,
    /// Offsets of `g.atomicstatus` and `g.waitreason` (what the goroutine
    /// census derives from `goid` in stripped binaries).
    pub g_status: Option<u64>,
    pub g_waitreason: Option<u64>,
}

/// Reads [`DwarfFacts`] in one pass over the DWARF units.
pub fn dwarf_facts(elf: &ElfObject) -> Option<DwarfFacts> {
    use gimli::{AttributeValue, EndianSlice, LittleEndian};
    let file = elf.file();
    let sections =
        gimli::DwarfSections::load(|id| -> Result<std::borrow::Cow<[u8]>, gimli::Error> {
            Ok(file
                .section_by_name(id.name())
                .and_then(|s| crate::object::section_bytes(&s))
                .unwrap_or_default())
        })
        .ok()?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    let mut fields: std::collections::HashMap<(&str, &str), u64> = std::collections::HashMap::new();
    let wanted: &[(&str, &[&str])] = &[
        (
            "runtime.g",
            &["goid", "gopc", "startpc", "atomicstatus", "waitreason"],
        ),
        ("runtime.timer", &["period"]),
        ("runtime.memRecordCycle", &[]),
        ("runtime.p", &["timers"]),
        ("runtime.timers", &["heap"]),
    ];
    let mut sizes: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let mut tree = unit.entries_tree(None).ok()?;
        let root = tree.root().ok()?;
        let mut children = root.children();
        while let Ok(Some(node)) = children.next() {
            let entry = node.entry();
            if entry.tag() != gimli::DW_TAG_structure_type {
                continue;
            }
            let Some(name) = entry
                .attr_value(gimli::DW_AT_name)
                .and_then(|v| dwarf.attr_string(&unit, v).ok())
            else {
                continue;
            };
            let Some((strukt, members)) = wanted.iter().find(|(s, _)| s.as_bytes() == name.slice())
            else {
                continue;
            };
            if let Some(AttributeValue::Udata(size)) = entry.attr_value(gimli::DW_AT_byte_size) {
                sizes.insert(strukt, size);
            }
            let mut members_iter = node.children();
            while let Ok(Some(m)) = members_iter.next() {
                let e = m.entry();
                let Some(mname) = e
                    .attr_value(gimli::DW_AT_name)
                    .and_then(|v| dwarf.attr_string(&unit, v).ok())
                else {
                    continue;
                };
                let Some(field) = members.iter().find(|f| f.as_bytes() == mname.slice()) else {
                    continue;
                };
                if let Some(AttributeValue::Udata(off)) =
                    e.attr_value(gimli::DW_AT_data_member_location)
                {
                    fields.insert((strukt, field), off);
                }
            }
        }
    }
    Some(DwarfFacts {
        offsets: GoOffsets {
            g_goid: *fields.get(&("runtime.g", "goid"))?,
            g_gopc: *fields.get(&("runtime.g", "gopc"))?,
            g_startpc: *fields.get(&("runtime.g", "startpc"))?,
            timer_period: *fields.get(&("runtime.timer", "period"))?,
            ..GoOffsets::default()
        },
        mem_record_cycle: sizes.get("runtime.memRecordCycle").copied(),
        g_status: fields.get(&("runtime.g", "atomicstatus")).copied(),
        g_waitreason: fields.get(&("runtime.g", "waitreason")).copied(),
        timer_heap: fields.get(&("runtime.p", "timers")).map(|t| {
            t + fields
                .get(&("runtime.timers", "heap"))
                .copied()
                .unwrap_or(0)
        }),
    })
}

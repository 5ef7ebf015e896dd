//! A reader of Go's `.gopclntab` (Go 1.20+ layout, magic 0xfffffff1): function
//! names and ranges, file and line of a pc, and inlined calls — what a binary
//! built with `-ldflags=-s -w` still carries when `.symtab` and DWARF are gone.
//!
//! Layout (runtime/symtab.go): a pcHeader, then the function-name table, the
//! compilation-unit file table, the file-name table, the pc-value tables, and
//! the function table of (entry offset, _func offset) pairs. Inlining lives in
//! each function's FUNCDATA_InlTree (relative to `moduledata.gofunc`) indexed
//! by its PCDATA_InlTreeIndex table.

use object::{Object, ObjectSection};

const MAGIC: u32 = 0xffff_fff1;
const PCDATA_INL_TREE_INDEX: usize = 2;
const FUNCDATA_INL_TREE: usize = 3;
/// Size of the fixed part of runtime._func.
const FUNC_HEADER: usize = 44;
/// Size of runtime.inlinedCall.
const INLINED_CALL: usize = 16;

/// A resolved frame: function, file, line; inlined frames first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcFrame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
}

/// The pc-line table of one binary.
pub struct Pclntab {
    /// The table's bytes.
    tab: Vec<u8>,
    nfunc: usize,
    text_start: u64,
    funcname: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    /// `go:func.*` data (inline trees), as (virtual address, bytes).
    gofunc: Option<(u64, Vec<u8>)>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

fn cstr(b: &[u8], off: usize) -> Option<String> {
    let rest = b.get(off..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn uvarint(b: &[u8], pos: &mut usize) -> Option<u32> {
    let mut v: u32 = 0;
    let mut shift = 0;
    loop {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// One function's table entry.
#[derive(Clone, Copy, Debug)]
struct Func {
    /// Offset of the _func in the table.
    at: usize,
    entry: u64,
}

impl Pclntab {
    /// Parses the table of an ELF Go binary (file bytes `data`).
    pub fn parse<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> Option<Self> {
        let section = file.section_by_name(".gopclntab")?;
        let tab = section.data().ok()?.to_vec();
        if u32_at(&tab, 0)? != MAGIC || tab[6] != 1 || tab[7] != 8 {
            return None; // only the 1.20+ layout, x86-64 (quantum 1, 8-byte pointers)
        }
        let field = |i: usize| u64_at(&tab, 8 + 8 * i);
        let nfunc = field(0)? as usize;
        let mut text_start = field(2)?;
        let pclntab_va = section.address();
        let moduledata = find_moduledata(file, pclntab_va, field(3)?);
        if let Some((text, _)) = &moduledata {
            // Go 1.26+ zeroes pcHeader.textStart; moduledata.text is authoritative.
            text_start = *text;
        }
        if text_start == 0 {
            text_start = file.section_by_name(".text")?.address();
        }
        let mut tab = Self {
            nfunc,
            text_start,
            funcname: field(3)? as usize,
            cutab: field(4)? as usize,
            filetab: field(5)? as usize,
            pctab: field(6)? as usize,
            functab: field(7)? as usize,
            tab,
            gofunc: None,
        };
        let candidates = moduledata.map(|(_, c)| c).unwrap_or_default();
        tab.gofunc = candidates.into_iter().find_map(|va| {
            let sec = file
                .sections()
                .find(|s| s.address() <= va && va < s.address() + s.size())?;
            let bytes = sec.data().ok()?;
            let data = bytes.get((va - sec.address()) as usize..)?.to_vec();
            tab.inline_trees_decode(&data).then_some((va, data))
        });
        if tab.gofunc.is_none() {
            log::debug!("no inline trees found in .gopclntab: inlined frames will be missing");
        }
        Some(tab)
    }

    /// Whether `gofunc` makes the first inline trees of the table decode:
    /// every inlined call names a function and points inside its parent.
    fn inline_trees_decode(&self, gofunc: &[u8]) -> bool {
        let mut seen = 0;
        for i in 0..self.nfunc {
            let (Some(f), Some(end)) = (self.func(i), self.end(i)) else {
                return false;
            };
            let Some(off) = self.funcdata(f, FUNCDATA_INL_TREE) else {
                continue;
            };
            let Some(call) = gofunc.get(off as usize..off as usize + INLINED_CALL) else {
                return false;
            };
            let name_ok = u32_at(call, 4)
                .and_then(|n| self.name_at(n))
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| !c.is_control()));
            let parent_ok = u32_at(call, 8).is_some_and(|pc| u64::from(pc) < end - f.entry);
            if !(name_ok && parent_ok) {
                return false;
            }
            seen += 1;
            if seen == 32 {
                break;
            }
        }
        seen > 0
    }
}

impl Pclntab {
    fn func(&self, i: usize) -> Option<Func> {
        let e = self.functab + 8 * i;
        let entryoff = u32_at(&self.tab, e)?;
        let funcoff = u32_at(&self.tab, e + 4)? as usize;
        Some(Func {
            at: self.functab + funcoff,
            entry: self.text_start + u64::from(entryoff),
        })
    }

    /// End of function `i` (the next entry).
    fn end(&self, i: usize) -> Option<u64> {
        let e = self.functab + 8 * (i + 1);
        Some(self.text_start + u64::from(u32_at(&self.tab, e)?))
    }

    fn name_at(&self, nameoff: u32) -> Option<String> {
        cstr(&self.tab, self.funcname + nameoff as usize)
    }

    fn func_name(&self, f: Func) -> Option<String> {
        self.name_at(u32_at(&self.tab, f.at + 4)?)
    }

    /// Every function: (name, entry, end) virtual addresses.
    pub fn functions(&self) -> impl Iterator<Item = (String, u64, u64)> + '_ {
        (0..self.nfunc).filter_map(|i| {
            let f = self.func(i)?;
            Some((self.func_name(f)?, f.entry, self.end(i)?))
        })
    }

    /// The entry and end of the function called `name`.
    pub fn find_function(&self, name: &str) -> Option<(u64, u64)> {
        self.functions()
            .find(|(n, _, _)| n == name)
            .map(|(_, a, b)| (a, b))
    }

    /// Index of the function containing `pc` (binary search on entries).
    fn lookup(&self, pc: u64) -> Option<usize> {
        if self.nfunc == 0 || pc < self.func(0)?.entry || pc >= self.end(self.nfunc - 1)? {
            return None;
        }
        let (mut lo, mut hi) = (0, self.nfunc);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.func(mid)?.entry <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }

    /// Value of the pc-value table at `off` for `pc` in a function at `entry`.
    fn pcvalue(&self, off: u32, entry: u64, pc: u64) -> Option<i32> {
        if off == 0 {
            return None;
        }
        let mut pos = self.pctab + off as usize;
        let mut val: i32 = -1;
        let mut cur = entry;
        let mut first = true;
        loop {
            let uv = uvarint(&self.tab, &mut pos)?;
            if uv == 0 && !first {
                return None;
            }
            first = false;
            let delta = ((uv >> 1) as i32) ^ -((uv & 1) as i32);
            let pcdelta = uvarint(&self.tab, &mut pos)?;
            val = val.wrapping_add(delta);
            cur += u64::from(pcdelta);
            if pc < cur {
                return Some(val);
            }
        }
    }

    fn field(&self, f: Func, i: usize) -> Option<u32> {
        u32_at(&self.tab, f.at + 4 * i)
    }

    /// File and line at `pc` in function `f`.
    fn file_line(&self, f: Func, pc: u64) -> (Option<String>, Option<u32>) {
        let pcfile = self.field(f, 5).and_then(|o| self.pcvalue(o, f.entry, pc));
        let pcln = self.field(f, 6).and_then(|o| self.pcvalue(o, f.entry, pc));
        let cu = self.field(f, 8).unwrap_or(0) as usize;
        let file = pcfile.and_then(|idx| {
            let fileoff = u32_at(&self.tab, self.cutab + 4 * (cu + idx as usize))?;
            if fileoff == u32::MAX {
                return None;
            }
            cstr(&self.tab, self.filetab + fileoff as usize)
        });
        (file, pcln.and_then(|l| u32::try_from(l).ok()))
    }

    fn pcdata(&self, f: Func, table: usize) -> Option<u32> {
        let npcdata = self.field(f, 7)? as usize;
        (table < npcdata).then(|| u32_at(&self.tab, f.at + FUNC_HEADER + 4 * table))?
    }

    fn funcdata(&self, f: Func, slot: usize) -> Option<u32> {
        let npcdata = self.field(f, 7)? as usize;
        let nfuncdata = *self.tab.get(f.at + 43)? as usize;
        if slot >= nfuncdata {
            return None;
        }
        let off = u32_at(&self.tab, f.at + FUNC_HEADER + 4 * npcdata + 4 * slot)?;
        (off != u32::MAX).then_some(off)
    }

    /// Frames at `pc`, innermost (deepest inlined) first.
    pub fn symbolize(&self, pc: u64) -> Vec<PcFrame> {
        let Some(i) = self.lookup(pc) else {
            return Vec::new();
        };
        let Some(f) = self.func(i) else {
            return Vec::new();
        };
        let outer = self.func_name(f).unwrap_or_else(|| "[unknown]".into());
        let mut frames = Vec::new();
        let tree = self.funcdata(f, FUNCDATA_INL_TREE).and_then(|off| {
            let (_, bytes) = self.gofunc.as_ref()?;
            bytes.get(off as usize..)
        });
        let index_table = self.pcdata(f, PCDATA_INL_TREE_INDEX);
        let mut at = pc;
        // Walk out of the inlined calls: each step names the inlined function
        // at the current pc and moves to its call site in the parent.
        for _ in 0..64 {
            let (file, line) = self.file_line(f, at);
            let idx = match (tree, index_table) {
                (Some(_), Some(t)) => self.pcvalue(t, f.entry, at).unwrap_or(-1),
                _ => -1,
            };
            if idx < 0 {
                frames.push(PcFrame {
                    function: outer.clone(),
                    file,
                    line,
                    inlined: false,
                });
                return frames;
            }
            let Some(call) = tree.and_then(|t| t.get(idx as usize * INLINED_CALL..)) else {
                break;
            };
            let name = u32_at(call, 4)
                .and_then(|n| self.name_at(n))
                .unwrap_or_else(|| "[unknown]".into());
            let parent_pc = u32_at(call, 8).unwrap_or(0);
            frames.push(PcFrame {
                function: name,
                file,
                line,
                inlined: true,
            });
            at = f.entry + u64::from(parent_pc);
        }
        frames
    }
}

/// Finds runtime.firstmoduledata: the data word equal to the pcHeader's
/// address, followed by the funcnametab slice pointing into the table.
/// Returns moduledata.text and the candidate values for moduledata.gofunc,
/// whose offset changed across releases (320 up to 1.26, 344 in 1.27, when
/// moduledata also moved to its own `.go.module` section); the caller picks
/// the candidate whose inline trees decode.
fn find_moduledata<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    pclntab_va: u64,
    funcname_off: u64,
) -> Option<(u64, Vec<u64>)> {
    const TEXT: usize = 176;
    const GOFUNC_FROM: usize = 296;
    const GOFUNC_TO: usize = 400;
    let text = file.section_by_name(".text")?;
    let (text_lo, text_hi) = (text.address(), text.address() + text.size());
    for name in [".go.module", ".noptrdata", ".data"] {
        let Some(sec) = file.section_by_name(name) else {
            continue;
        };
        let Ok(bytes) = sec.data() else { continue };
        for at in (0..bytes.len().saturating_sub(8)).step_by(8) {
            if u64_at(bytes, at) != Some(pclntab_va)
                || u64_at(bytes, at + 8) != Some(pclntab_va + funcname_off)
            {
                continue;
            }
            let Some(mtext) = u64_at(bytes, at + TEXT) else {
                continue;
            };
            if !(text_lo..text_hi).contains(&mtext) {
                continue;
            }
            let candidates = (GOFUNC_FROM..GOFUNC_TO)
                .step_by(8)
                .filter_map(|off| u64_at(bytes, at + off))
                .filter(|&v| v != 0)
                .collect();
            return Some((mtext, candidates));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        let b = [0x96, 0x01, 0x05];
        let mut pos = 0;
        assert_eq!(uvarint(&b, &mut pos), Some(150));
        assert_eq!(uvarint(&b, &mut pos), Some(5));
        assert_eq!(uvarint(&b, &mut pos), None);
    }
}

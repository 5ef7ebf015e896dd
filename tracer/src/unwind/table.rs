//! One object's unwind table: its call-frame information (`.eh_frame`, else
//! `.debug_frame`) reduced by gimli to the rows the kernel's walker reads.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use object::{Object, ObjectSection};
use tracer_common::unwind::{UnwindRow, cfa, rbp};

use crate::object::ElfObject;

/// What a table was built from, and what it could not express.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub fdes: usize,
    /// FDEs gimli could not parse or evaluate (skipped: their pcs have no rule).
    pub bad_fdes: usize,
    /// Rows whose rule the kernel's walker does not implement.
    pub unsupported_rows: usize,
}

/// The rows of `obj`, sorted by pc and with gaps between functions marked;
/// empty when it has no call-frame information (or none the walker can use).
pub fn rows_of(obj: &ElfObject) -> (Vec<UnwindRow>, TableStats) {
    let file = obj.file();
    let mut stats = TableStats::default();
    let mut fdes = Vec::new();
    if let Some(section) = file.section_by_name(".eh_frame")
        && let Ok(data) = section.data()
        && !data.is_empty()
    {
        let mut eh = EhFrame::new(data, LittleEndian);
        eh.set_address_size(8);
        let mut bases = BaseAddresses::default().set_eh_frame(section.address());
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        collect(&eh, &bases, &mut fdes, &mut stats);
    }
    if fdes.is_empty()
        && let Some(data) = obj.section_uncompressed(".debug_frame")
        && !data.is_empty()
    {
        let mut df = DebugFrame::new(&data, LittleEndian);
        df.set_address_size(8);
        collect(&df, &BaseAddresses::default(), &mut fdes, &mut stats);
    }
    let rows = merge(fdes);
    stats.unsupported_rows = rows
        .iter()
        .filter(|r| r.cfa_kind == cfa::UNSUPPORTED)
        .count();
    (rows, stats)
}

/// One FDE's range and rows.
struct Fde {
    start: u64,
    end: u64,
    rows: Vec<UnwindRow>,
}

fn collect<'a, S: UnwindSection<EndianSlice<'a, LittleEndian>>>(
    section: &S,
    bases: &BaseAddresses,
    out: &mut Vec<Fde>,
    stats: &mut TableStats,
) {
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    loop {
        let entry = match entries.next() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            // A broken entry leaves the rest unreachable (lengths chain them).
            Err(_) => {
                stats.bad_fdes += 1;
                break;
            }
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            stats.bad_fdes += 1;
            continue;
        };
        stats.fdes += 1;
        let (start, end) = (fde.initial_address(), fde.end_address());
        if end <= start || end > u64::from(u32::MAX) {
            continue;
        }
        let signal = fde.is_signal_trampoline();
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
            stats.bad_fdes += 1;
            continue;
        };
        let mut rows = Vec::new();
        loop {
            match table.next_row() {
                Ok(Some(row)) => {
                    let mut r = reduce(section, row);
                    if signal {
                        r.cfa_kind = cfa::SIGNAL;
                    }
                    r.pc = row.start_address() as u32;
                    rows.push(r);
                }
                Ok(None) => break,
                Err(_) => {
                    stats.bad_fdes += 1;
                    break;
                }
            }
        }
        out.push(Fde { start, end, rows });
    }
}

/// The walker's rule for one CFI row.
fn reduce<'a, S: UnwindSection<EndianSlice<'a, LittleEndian>>>(
    section: &S,
    row: &gimli::UnwindTableRow<usize>,
) -> UnwindRow {
    let mut r = UnwindRow::default();
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            r.cfa_kind = cfa::END;
            return r;
        }
        // The return address is at CFA-8 on x86-64; anything else is a rule
        // the walker cannot follow.
        None | Some(RegisterRule::Offset(-8)) => {}
        Some(_) => {
            r.cfa_kind = cfa::UNSUPPORTED;
            return r;
        }
    }
    match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = i32::try_from(offset) else {
                r.cfa_kind = cfa::UNSUPPORTED;
                return r;
            };
            r.cfa_offset = offset;
            r.cfa_kind = if register == X86_64::RSP {
                cfa::RSP
            } else if register == X86_64::RBP {
                cfa::RBP
            } else {
                cfa::UNSUPPORTED
            };
        }
        CfaRule::Expression(ref e) => match e.get(section).ok().and_then(|e| plt(e.0.slice())) {
            Some((offset, threshold)) => {
                r.cfa_kind = cfa::PLT;
                r.cfa_offset = offset;
                r.rbp_offset = threshold;
                return r;
            }
            None => {
                r.cfa_kind = cfa::UNSUPPORTED;
                return r;
            }
        },
    }
    match row.register(X86_64::RBP) {
        None | Some(RegisterRule::Undefined) | Some(RegisterRule::SameValue) => {}
        Some(RegisterRule::Offset(off)) => match i32::try_from(off) {
            Ok(off) => {
                r.rbp_kind = rbp::AT_CFA;
                r.rbp_offset = off;
            }
            Err(_) => r.rbp_kind = rbp::UNKNOWN,
        },
        Some(_) => r.rbp_kind = rbp::UNKNOWN,
    }
    r
}

/// The CFA expression of a lazy-binding PLT entry (what GNU ld emits for
/// `.plt`): `rsp + off + ((rip & 15) >= k) << 3`. Returns (off, k).
fn plt(expr: &[u8]) -> Option<(i32, i32)> {
    const BREG7: u8 = 0x77;
    const BREG16: u8 = 0x80;
    const LIT0: u8 = 0x30;
    const LIT15: u8 = 0x3f;
    const AND: u8 = 0x1a;
    const GE: u8 = 0x2a;
    const LIT3: u8 = 0x33;
    const SHL: u8 = 0x24;
    const PLUS: u8 = 0x22;
    match *expr {
        [BREG7, off, BREG16, 0, LIT15, AND, k, GE, LIT3, SHL, PLUS]
            if off < 0x40 && (LIT0..=LIT15).contains(&k) =>
        {
            Some((i32::from(off), i32::from(k - LIT0)))
        }
        _ => None,
    }
}

/// Sorts the FDEs' rows, marks where a function ends without another
/// starting, and drops rows that repeat the rule before them.
fn merge(mut fdes: Vec<Fde>) -> Vec<UnwindRow> {
    fdes.sort_by_key(|f| f.start);
    let mut rows: Vec<UnwindRow> = Vec::new();
    for (i, f) in fdes.iter().enumerate() {
        // Overlapping FDEs (rare, broken) lose to the earlier one.
        let from = rows.last().map_or(0, |r| u64::from(r.pc));
        for r in &f.rows {
            if u64::from(r.pc) < from && !rows.is_empty() {
                continue;
            }
            if let Some(last) = rows.last_mut()
                && last.pc == r.pc
            {
                *last = *r;
                continue;
            }
            rows.push(*r);
        }
        let next_start = fdes.get(i + 1).map(|n| n.start);
        if next_start != Some(f.end) {
            rows.push(UnwindRow {
                pc: f.end as u32,
                ..UnwindRow::default()
            });
        }
    }
    rows.dedup_by(|b, a| same_rule(a, b));
    rows
}

fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    (a.cfa_kind, a.rbp_kind, a.cfa_offset, a.rbp_offset)
        == (b.cfa_kind, b.rbp_kind, b.cfa_offset, b.rbp_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plt_expression_is_recognised() {
        let e = [0x77, 8, 0x80, 0, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22];
        assert_eq!(plt(&e), Some((8, 11)));
        assert_eq!(plt(&e[..10]), None);
    }

    #[test]
    fn merge_marks_gaps_and_drops_repeats() {
        let row = |pc, kind, off| UnwindRow {
            pc,
            cfa_kind: kind,
            cfa_offset: off,
            ..UnwindRow::default()
        };
        let fdes = vec![
            Fde {
                start: 0x200,
                end: 0x210,
                rows: vec![row(0x200, cfa::RSP, 8)],
            },
            Fde {
                start: 0x100,
                end: 0x200,
                rows: vec![
                    row(0x100, cfa::RSP, 8),
                    row(0x101, cfa::RSP, 16),
                    row(0x1f0, cfa::RSP, 8),
                ],
            },
        ];
        let rows = merge(fdes);
        let got: Vec<(u32, u8, i32)> = rows
            .iter()
            .map(|r| (r.pc, r.cfa_kind, r.cfa_offset))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x100, cfa::RSP, 8),
                (0x101, cfa::RSP, 16),
                (0x1f0, cfa::RSP, 8),
                (0x210, cfa::NONE, 0),
            ]
        );
    }
}

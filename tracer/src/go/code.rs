//! Go functions in the binary: finding them (`.symtab` or `.gopclntab`) and
//! decoding their code to place probes (RETs, past the prologue) and to see
//! through generated wrappers.
//!
//! Rules: never a uretprobe in Go code — return values are read by plain
//! uprobes on every RET instruction, found by decoding the function; "entry"
//! probes go on the first `push rbp` after the stack-growth prologue, which
//! runs once per call (the prologue re-runs after morestack) while the
//! argument registers are still intact.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl};

use crate::object::ElfObject;

/// A function of the binary: virtual address, size, and its bytes' file offset.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Looks up a function: in `.symtab` (kept unless built with `-ldflags=-s`),
/// else in `.gopclntab` (always there).
pub fn function(
    elf: &ElfObject,
    pclntab: Option<&super::pclntab::Pclntab>,
    name: &str,
) -> Option<Function> {
    let (addr, size) = match elf.function(name) {
        Some(sym) => (sym.addr, sym.size),
        None => {
            let (entry, end) = pclntab?.find_function(name)?;
            (entry, end - entry)
        }
    };
    let file_offset = elf.segments().vaddr_to_offset(addr)?;
    Some(Function {
        name: name.to_string(),
        addr,
        size,
        file_offset,
    })
}

/// Virtual addresses of every RET instruction in `code` (which starts at `addr`).
pub fn ret_sites(code: &[u8], addr: u64) -> Vec<u64> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for ins in &mut dec {
        if ins.is_invalid() {
            break;
        }
        if ins.flow_control() == FlowControl::Return {
            out.push(ins.ip());
        }
    }
    out
}

/// Virtual address of the first `push rbp` in `code`: past the stack-growth
/// check that morestack re-runs. `None` if the function has none early on.
pub fn after_prologue(code: &[u8], addr: u64) -> Option<u64> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    for ins in dec.iter().take(16) {
        if ins.code() == Code::Push_r64 && ins.op0_register() == iced_x86::Register::RBP {
            return Some(ins.ip());
        }
        if ins.is_invalid() || ins.flow_control() == FlowControl::Return {
            return None;
        }
    }
    None
}

/// Targets of the direct CALL instructions in `code` (which starts at `addr`).
pub fn call_targets(code: &[u8], addr: u64) -> Vec<u64> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for ins in dec.iter() {
        if ins.is_invalid() {
            break;
        }
        if ins.flow_control() == FlowControl::Call && ins.is_call_near() {
            out.push(ins.near_branch_target());
        }
        if ins.flow_control() == FlowControl::Return {
            break;
        }
    }
    out
}

/// Whether `name` is the wrapper Go ≥ 1.22 generates for `go f(args)`.
pub fn is_go_wrapper(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .is_some_and(|last| last.starts_with("gowrap"))
}

/// Bytes of a function from the file image.
pub fn code<'d>(elf: &'d ElfObject, f: &Function) -> Option<&'d [u8]> {
    elf.read_at_offset(f.file_offset, f.size)
}

/// The global slice whose header function `name` loads: the first address it
/// reads RIP-relative together with the qword after it (the slice's pointer
/// and length), as `runtime.forEachG` does `allgs` and `runtime.preemptall`
/// does `allp`. How stripped binaries' runtime globals are found.
pub fn slice_loaded_by(
    elf: &ElfObject,
    pclntab: Option<&super::pclntab::Pclntab>,
    name: &str,
) -> Option<u64> {
    use iced_x86::{Code, Decoder, DecoderOptions, OpKind, Register};
    let f = function(elf, pclntab, name)?;
    let code = elf.read_at_offset(f.file_offset, f.size.min(512))?;
    let loads: Vec<u64> = Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE)
        .iter()
        .filter(|i| {
            i.code() == Code::Mov_r64_rm64
                && i.op1_kind() == OpKind::Memory
                && i.memory_base() == Register::RIP
        })
        .map(|i| i.ip_rel_memory_address())
        .collect();
    loads.iter().copied().find(|a| loads.contains(&(a + 8)))
}

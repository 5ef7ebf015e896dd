//! Where exactly to put an entry uprobe so it costs least.
//!
//! The kernel emulates a few instructions at a uprobe (push of a register,
//! nops, relative jumps and calls, conditional jumps); any other instruction
//! is single-stepped out of line, which costs several times more per hit
//! (measured on glibc's free: ≈5 µs at `test %rdi,%rdi`, ≈1.4 µs at the
//! emulated instruction after it). So the probe moves from a function's first
//! instruction to the first emulated one, passing only instructions proven
//! harmless by decoding: no memory write, no write to a register holding one
//! of the function's arguments or to the stack pointer, no control flow, no
//! system call. The arguments and the stack pointer (which matches entries
//! to returns) are then exactly as at the entry, and every call still passes
//! the probe. (jemalloc's `free` loads a global into %rdx first: free takes
//! one argument, so its probe moves on; single-stepped, each free cost
//! ~18 µs on this VM, whose hypervisor intercepts the debug trap.)

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, Register,
};

/// Instructions looked at past the entry.
const LOOKAHEAD: usize = 12;

/// Whether the x86 uprobe code emulates `ins` instead of single-stepping it.
pub fn is_emulated(ins: &Instruction) -> bool {
    match ins.mnemonic() {
        Mnemonic::Push => ins.op0_kind() == iced_x86::OpKind::Register,
        Mnemonic::Nop => true,
        Mnemonic::Jmp | Mnemonic::Call => ins.is_jmp_short_or_near() || ins.is_call_near(),
        _ => ins.is_jcc_short_or_near(),
    }
}

const ARG_REGS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// Whether running `ins` before the probe changes nothing the probe reads
/// of a function taking `args` arguments.
fn is_harmless(ins: &Instruction, args: usize, info: &mut InstructionInfoFactory) -> bool {
    if ins.flow_control() != FlowControl::Next
        || matches!(
            ins.mnemonic(),
            Mnemonic::Syscall | Mnemonic::Sysenter | Mnemonic::Int
        )
        || ins.code() == Code::INVALID
    {
        return false;
    }
    let used = info.info(ins);
    if used.used_memory().iter().any(|m| {
        !matches!(
            m.access(),
            OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
        )
    }) {
        return false;
    }
    !used.used_registers().iter().any(|r| {
        let writes = matches!(
            r.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        );
        let reg = r.register().full_register();
        writes && (reg == Register::RSP || ARG_REGS[..args.min(ARG_REGS.len())].contains(&reg))
    })
}

/// Offset (from `code`'s start) of the cheapest equivalent probe point of a
/// function taking `args` arguments, or 0.
pub fn entry_offset(code: &[u8], args: usize) -> u64 {
    let mut dec = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    for ins in dec.iter().take(LOOKAHEAD) {
        if is_emulated(&ins) {
            return ins.ip();
        }
        if !is_harmless(&ins, args, &mut info) {
            return 0;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_moves_past_its_test() {
        // test %rdi,%rdi; je +0xbf; push %rbp
        let free = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55];
        assert_eq!(entry_offset(&free, 1), 3, "the je is emulated");
    }

    #[test]
    fn already_emulated_entries_stay() {
        // push %r12 (malloc)
        assert_eq!(entry_offset(&[0x41, 0x54, 0x55], 1), 0);
    }

    #[test]
    fn past_a_compare_to_a_push() {
        // cmpb $0,0x141b46(%rip); push %r12 (posix_memalign)
        let code = [0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54];
        assert_eq!(entry_offset(&code, 3), 7);
    }

    #[test]
    fn never_past_argument_writes_stack_changes_or_syscalls() {
        // mov %rsi,%rdi (writes an argument); push %rbp
        assert_eq!(entry_offset(&[0x48, 0x89, 0xf7, 0x55], 1), 0);
        // sub $0x10,%rsp; push %rbp
        assert_eq!(entry_offset(&[0x48, 0x83, 0xec, 0x10, 0x55], 6), 0);
        // mov $0xb,%eax; syscall (munmap)
        assert_eq!(entry_offset(&[0xb8, 0x0b, 0, 0, 0, 0x0f, 0x05], 2), 0);
        // mov %rdi,(%rax) (a store); push %rbp
        assert_eq!(entry_offset(&[0x48, 0x89, 0x38, 0x55], 6), 0);
    }

    #[test]
    fn register_writes_outside_the_arguments_are_fine() {
        // mov %ecx,%r10d; test $0xfff,%r9d; jne +0x14 (mmap)
        let mmap = [
            0x41, 0x89, 0xca, 0x41, 0xf7, 0xc1, 0xff, 0x0f, 0, 0, 0x75, 0x14,
        ];
        assert_eq!(entry_offset(&mmap, 6), 10);
    }

    #[test]
    fn only_the_functions_own_argument_registers_count() {
        // mov %rdi,%rax; mov 0xa530e(%rip),%rdx; push %rbp (jemalloc's free)
        let free = [
            0x48, 0x89, 0xf8, 0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, 0x55,
        ];
        assert_eq!(entry_offset(&free, 1), 10, "free reads %rdi only");
        assert_eq!(
            entry_offset(&free, 3),
            0,
            "a third argument would be in %rdx"
        );
        // The whole of it: the first emulated instruction is the tenth,
        // a jne past two loads and some register arithmetic.
        let free = [
            0x48, 0x89, 0xf8, // mov %rdi,%rax
            0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, // mov 0xa530e(%rip),%rdx
            0x48, 0x89, 0xf9, // mov %rdi,%rcx
            0x48, 0xc1, 0xe8, 0x1a, // shr $0x1a,%rax
            0x48, 0x81, 0xe1, 0x00, 0x00, 0x00, 0xc0, // and $-0x40000000,%rcx
            0x25, 0xf0, 0x00, 0x00, 0x00, // and $0xf0,%eax
            0x64, 0x48, 0x03, 0x04, 0x25, 0x00, 0x00, 0x00, 0x00, // add %fs:0x0,%rax
            0x48, 0x01, 0xd0, // add %rdx,%rax
            0x48, 0x3b, 0x88, 0xb0, 0x01, 0x00, 0x00, // cmp 0x1b0(%rax),%rcx
            0x0f, 0x85, 0x8a, 0x00, 0x00, 0x00, // jne
        ];
        assert_eq!(entry_offset(&free, 1), 0x30);
    }
}

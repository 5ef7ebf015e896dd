//! The .gopclntab reader checked against independent sources on real
//! binaries of each Go release: function ranges against .symtab, and
//! function/line (inlined frames included) against DWARF via blazesym.

use object::{Object, ObjectSymbol, SymbolKind};
use tracer::{go::pclntab::Pclntab, object::ElfObject, symbolize::Symbolizer, target::Maps};
use tracer_tests::fixture;

#[test]
fn pclntab_agrees_with_symtab_and_dwarf() {
    for version in tracer_tests::GO_RELEASES {
        let path = fixture(&format!("leaky-go{version}"));
        let elf = ElfObject::open(&path).unwrap();
        assert!(elf.is_go());
        let file = elf.file();
        let tab = Pclntab::parse(&file).expect("a Go 1.20+ pclntab");
        // Every function symbol's address is a pclntab function entry.
        let mut checked = 0;
        for sym in file.symbols().filter(|s| s.kind() == SymbolKind::Text) {
            let name = sym.name().unwrap();
            if !(name.starts_with("main.") || name.starts_with("runtime.newproc1")) {
                continue;
            }
            let (entry, end) = tab
                .find_function(name)
                .unwrap_or_else(|| panic!("go{version}: {name} not in pclntab"));
            assert_eq!(entry, sym.address(), "go{version} {name}");
            assert!(end > entry);
            checked += 1;
        }
        assert!(checked >= 8, "go{version}: checked {checked} functions");
        // Struct offsets: DWARF and the per-release table agree.
        let dwarf = tracer::go::offsets_from_dwarf(&elf).expect("offsets in DWARF");
        let version_info = tracer::go::go_version(&elf).unwrap();
        let (table, known) = tracer::go::offsets_for(&version_info);
        assert!(known, "go{version}");
        assert_eq!(dwarf, table, "go{version}: DWARF vs table");
        // The timer heap's place in runtime.p, from code as in a stripped
        // binary, against DWARF.
        let facts = tracer::go::dwarf_facts(&elf).unwrap();
        let from_code = tracer::go::TimerHeapLayout::find(
            &elf,
            Some(&tab),
            version_info.minor,
            table.timer_period,
            None,
        )
        .unwrap_or_else(|| panic!("go{version}: timer heaps not found from code"));
        assert_eq!(
            Some(from_code.heap),
            facts.timer_heap,
            "go{version}: timer heap offset, code vs DWARF"
        );
        // The goroutine census's g fields, derived from the table's goid.
        let census = tracer::go::CensusLayout::find(&elf, Some(&tab), &table)
            .unwrap_or_else(|| panic!("go{version}: goroutine list not found"));
        assert_eq!(
            (Some(census.status), Some(census.waitreason)),
            (facts.g_status, facts.g_waitreason),
            "go{version}: g.atomicstatus, g.waitreason"
        );
        assert!(
            census.wait_reasons.iter().any(|r| r == "chan receive"),
            "go{version}: wait reason names {:?}",
            census.wait_reasons
        );
        // runtime.MemProfileRate found from code alone, as in a stripped binary.
        let rate = file
            .symbols()
            .find(|s| s.name() == Ok("runtime.MemProfileRate"))
            .unwrap()
            .address();
        assert_eq!(
            tracer::go::find_mem_profile_rate(&elf, &tab),
            Some(rate),
            "go{version}"
        );

        // Compare innermost frames (function, line) at many pcs of main.*
        // with what DWARF says.
        let maps = Maps::parse(
            format!(
                "00400000-7fffffff r-xp 00000000 00:00 0 {}\n",
                std::fs::canonicalize(&path).unwrap().display()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut dwarf = Symbolizer::new(maps);
        let mut compared = 0;
        for (name, entry, end) in tab.functions().filter(|(n, _, _)| n.starts_with("main.")) {
            for pc in (entry..end).step_by(3) {
                let ours = tab.symbolize(pc);
                // Symbolizer works on return addresses (pc - 1): pass pc + 1.
                let theirs = dwarf.symbolize_stack(&[pc + 1]);
                let ours: Vec<(String, Option<u32>)> =
                    ours.iter().map(|f| (f.function.clone(), f.line)).collect();
                let theirs: Vec<(String, Option<u32>)> = theirs
                    .iter()
                    .map(|f| (f.function.clone(), f.line))
                    .collect();
                // Alignment padding after a function's code has no line in
                // either table (the symbolizer names it module+0xoffset).
                let module = path.file_name().unwrap().to_string_lossy();
                if theirs[0].0.starts_with(&format!("{module}+0x")) {
                    continue;
                }
                // The whole chain of inlined frames must agree; the outermost
                // is the function itself.
                assert_eq!(ours, theirs, "go{version} {name} pc {pc:#x}");
                assert_eq!(ours.last().unwrap().0, name, "go{version} pc {pc:#x}");
                compared += 1;
            }
        }
        assert!(compared > 100, "go{version}: compared {compared} pcs");
    }
}

//! Introspection requests on a VM. The guest kernel is attached once (symbols, BTF,
//! ORC: static for the VM's life) and kept; after that each request pauses the guest
//! only for the reads it needs, and says how long. Patch code is kernel code to every
//! view: stacks name new functions with their patch, `sym` finds them, `disasm` of a
//! redirected function says where its site jumps.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use introspection::disasm::{self, MAX_BYTES};
use introspection::modules::{ModuleError, ModuleList, ModuleState, ModuleSymbol, ModuleSymbols};
use introspection::tasks::Task;
use introspection::tasks::TaskReader;
use introspection::{Kernel, PausedGuest};

use crate::proto::{
    DisasmResult, KernelResult, ModuleSymbolLine, ModulesResult, PatchSymbol, PauseCost, Redirect,
    ShadowResult, StackResult, SymQuery, SymResult, TasksResult,
};
use crate::session::Session;

impl Session {
    /// The attached kernel, attaching first if needed. The guest pauses only for its
    /// registers (a bare pause); the kernel's tables are read while it runs, because
    /// nothing in them changes once it has booted.
    fn attached(&mut self, reattach: bool) -> Result<(Arc<Kernel>, bool, PauseCost)> {
        if let (Some(k), false) = (&self.kernel, reattach) {
            return Ok((k.clone(), false, PauseCost::default()));
        }
        let regs = self.vm.regs()?;
        let kernel = self
            .vm
            .running_ram(|ram| Kernel::attach_static(ram, &regs.vcpus));
        let kernel = Arc::new(kernel.map_err(|e| anyhow!("cannot read the guest kernel: {e}"))?);
        release_free_heap();
        self.kernel = Some(kernel.clone());
        Ok((kernel, true, regs.pause))
    }

    /// The attached kernel (attaching first if needed).
    pub(crate) fn kernel_attached(&mut self) -> Result<Arc<Kernel>> {
        Ok(self.attached(false)?.0)
    }

    pub fn kernel_info(&mut self, reattach: bool) -> Result<KernelResult> {
        let (k, attached_now, pause) = self.attached(reattach)?;
        Ok(KernelResult {
            attached_now,
            stats: k.stats.clone(),
            pause,
        })
    }

    /// Symbol lookups: the kernel's own need no pause once attached (kallsyms is
    /// static, and so is what lpvmm loaded); modules come and go, so their symbols are
    /// read in a pause, when the query can concern them. `module:name` looks in one
    /// module only (`vmlinux:name` in the kernel's own table).
    pub fn sym(&mut self, query: SymQuery) -> Result<SymResult> {
        let (k, _, _) = self.attached(false)?;
        let mut r = SymResult {
            symbols: Vec::new(),
            located: None,
            patch: Vec::new(),
            module_symbols: Vec::new(),
            module: None,
        };
        match query {
            SymQuery::Name { name } => self.sym_named(&k, &name, &mut r)?,
            SymQuery::Addr { addr } => self.sym_at(&k, addr, &mut r)?,
            SymQuery::All => {
                r.symbols = k.symbols.symbols().collect();
                r.module_symbols = module_lines(&self.module_symbols(&k, None)?, |_| true);
            }
        }
        Ok(r)
    }

    /// `NAME`, `MODULE:NAME` or either with `,POS` (the POS-th of that name, counted in
    /// vmlinux or within the module, as a patch's sympos counts).
    fn sym_named(&mut self, k: &Kernel, query: &str, r: &mut SymResult) -> Result<()> {
        let (module, spec) = match query.split_once(':') {
            Some((m, n)) => (Some(m), n),
            None => (None, query),
        };
        let (name, pos) = match spec.split_once(',') {
            Some((n, p)) => (
                n,
                Some(p.trim().parse::<u32>().map_err(|_| {
                    anyhow::anyhow!("'{query}': the position after ',' must be a number from 1")
                })?),
            ),
            None => (spec, None),
        };
        if module.is_none_or(|m| m == "vmlinux") {
            r.symbols = match pos {
                Some(p) => k.symbols.resolve(name, Some(p)).into_iter().collect(),
                None => k.symbols.named(name),
            };
            r.patch = self.patch_symbols(|f| f.new_name == name);
        }
        if module != Some("vmlinux") {
            let tables = self.module_symbols(k, module)?;
            if let (Some(m), true) = (module, tables.is_empty()) {
                bail!("no module named '{m}' is loaded in the guest");
            }
            let chosen: Vec<(String, u64)> = tables
                .iter()
                .filter_map(|t| {
                    let p = pos?;
                    Some((t.module.clone(), t.resolve(name, Some(p)).ok()?.addr))
                })
                .collect();
            r.module_symbols = module_lines(&tables, |(m, s)| {
                s.name == name
                    && (pos.is_none() || chosen.iter().any(|(cm, a)| cm == m && *a == s.addr))
            });
        }
        if r.symbols.is_empty() && r.patch.is_empty() && r.module_symbols.is_empty() {
            bail!("no kernel symbol named '{query}' (and no loaded patch or module defines one)");
        }
        Ok(())
    }

    fn sym_at(&mut self, k: &Kernel, addr: u64, r: &mut SymResult) -> Result<()> {
        r.patch = self.patch_symbols(|f| addr >= f.new_addr && addr < f.new_addr + f.new_size);
        if !r.patch.is_empty() {
            return Ok(());
        }
        if !k.is_kernel_text(addr) {
            let (found, _) = self.vm.paused(|g| {
                let mem = k.memory(g);
                let list = ModuleList::read(&mem, k)?;
                let Some(m) = list.containing(addr) else {
                    return Ok::<_, ModuleError>(None);
                };
                Ok(Some((m.name.clone(), m.symbols(&mem, k)?.locate(addr))))
            })?;
            if let Some((module, located)) = found? {
                r.located = Some(
                    located
                        .ok_or_else(|| anyhow!("{addr:#x} is below every symbol of {module}"))?,
                );
                r.module = Some(module);
                return Ok(());
            }
        }
        r.located = Some(
            k.symbols
                .locate(addr)
                .ok_or_else(|| anyhow!("{addr:#x} is below every kernel symbol"))?,
        );
        Ok(())
    }

    /// The symbols of every formed module (of the one called `only`, if given), read in
    /// one pause.
    fn module_symbols(&mut self, k: &Kernel, only: Option<&str>) -> Result<Vec<ModuleSymbols>> {
        let (tables, _) = self.vm.paused(|g| {
            let mem = k.memory(g);
            let list = ModuleList::read(&mem, k)?;
            list.modules
                .iter()
                .filter(|m| m.state != ModuleState::Unformed)
                .filter(|m| only.is_none_or(|o| m.name == o))
                .map(|m| m.symbols(&mem, k))
                .collect::<Result<Vec<_>, ModuleError>>()
        })?;
        Ok(tables?)
    }

    /// The guest's modules, as /proc/modules lists them (unformed ones left out).
    pub fn modules(&mut self) -> Result<ModulesResult> {
        let (k, _, _) = self.attached(false)?;
        let (list, pause) = self.vm.paused(|g| ModuleList::read(&k.memory(g), &k))?;
        let modules = list?
            .modules
            .into_iter()
            .filter(|m| m.state != ModuleState::Unformed)
            .collect();
        Ok(ModulesResult { modules, pause })
    }

    /// The shadow variables in the guest's table, read in a pause (patches change it).
    pub fn shadow(&mut self) -> Result<ShadowResult> {
        let (k, _, _) = self.attached(false)?;
        let Some(table) = self.engine.shadow_table() else {
            return Ok(ShadowResult {
                table: None,
                count: 0,
                groups: Vec::new(),
                vars: Vec::new(),
                pause: PauseCost::default(),
            });
        };
        let (read, pause) = self
            .vm
            .paused(|g| patcher::shadow::ShadowTable::read(&k.memory(g), table))?;
        let read = read?;
        Ok(ShadowResult {
            table: Some(table),
            count: read.count,
            groups: read.groups(&self.engine.shadow_ties()),
            vars: read.vars,
            pause,
        })
    }

    fn patch_symbols(&self, want: impl Fn(&patcher::PatchedFunc) -> bool) -> Vec<PatchSymbol> {
        self.engine
            .patches()
            .iter()
            .flat_map(|p| {
                p.funcs().filter(|f| want(f)).map(|f| PatchSymbol {
                    patch: p.name.clone(),
                    name: f.new_name.clone(),
                    addr: f.new_addr,
                    size: f.new_size,
                    replaces: f.old.to_string(),
                })
            })
            .collect()
    }

    pub fn tasks(&mut self) -> Result<TasksResult> {
        let (k, _, _) = self.attached(false)?;
        let (list, pause) = self.vm.paused(|g| TaskReader::new(&k, g).list())?;
        Ok(TasksResult {
            list: list.map_err(|e| anyhow!("reading the guest's tasks: {e}"))?,
            pause,
        })
    }

    /// Stack of the task with `pid`, of every idle task for pid 0, of all tasks for None.
    pub fn stack(&mut self, pid: Option<i32>) -> Result<StackResult> {
        let (k, _, _) = self.attached(false)?;
        let Session { vm, engine, .. } = self;
        let (traces, pause) = vm.paused(|g| {
            let list = TaskReader::new(&k, g).list()?;
            let tasks: Vec<&Task> = list
                .tasks
                .iter()
                .filter(|t| pid.is_none_or(|p| t.pid == p))
                .collect();
            Ok::<_, introspection::tasks::TaskError>(engine.unwind(g, &k, &tasks))
        })?;
        let traces = traces.map_err(|e| anyhow!("reading the guest's tasks: {e}"))?;
        if let (Some(p), true) = (pid, traces.is_empty()) {
            bail!("no task with pid {p} in the guest");
        }
        Ok(StackResult { traces, pause })
    }

    pub fn disasm(&mut self, symbol: &str, sympos: Option<u32>) -> Result<DisasmResult> {
        let (k, _, _) = self.attached(false)?;
        if let Some((module, name)) = symbol.split_once(':').filter(|(m, _)| *m != "vmlinux") {
            return self.disasm_in_module(&k, module, name, sympos);
        }
        let symbol = symbol.strip_prefix("vmlinux:").unwrap_or(symbol);
        let sym = k.symbols.resolve(symbol, sympos)?;
        let size = k
            .symbols
            .size_at(sym.addr)
            .ok_or_else(|| anyhow!("cannot tell the size of '{symbol}'"))?;
        if size > MAX_BYTES {
            bail!("'{symbol}' is {size} bytes; disasm shows at most {MAX_BYTES}");
        }
        let (code, pause) = self.vm.paused(|g| {
            k.memory(g as &dyn PausedGuest)
                .read_vec(sym.addr, size as usize)
        })?;
        let code = code.map_err(|e| anyhow!("reading '{symbol}': {e}"))?;
        Ok(DisasmResult {
            redirect: self.redirect_of(sym.addr),
            symbol: sym.name,
            addr: sym.addr,
            size,
            lines: disasm::disassemble(&code, sym.addr, &k.symbols),
            pause,
        })
    }

    /// `disasm MODULE:NAME[,SYMPOS]`: the module's function, found in its own symbols
    /// (SYMPOS counts within the module, from 1), read in the same pause.
    fn disasm_in_module(
        &mut self,
        k: &Kernel,
        module: &str,
        name: &str,
        sympos: Option<u32>,
    ) -> Result<DisasmResult> {
        let (found, pause) = self.vm.paused(|g| -> Result<(u64, Vec<u8>)> {
            let mem = k.memory(g as &dyn PausedGuest);
            let list = ModuleList::read(&mem, k)?;
            let m = list
                .named(module)
                .ok_or_else(|| anyhow!("no module named '{module}' is loaded in the guest"))?;
            let symbols = m.symbols(&mem, k)?;
            let sym = symbols
                .resolve(name, sympos)
                .map_err(|e| anyhow!("module {module}: {e}"))?;
            let size = symbols
                .locate(sym.addr)
                .and_then(|l| l.size)
                .ok_or_else(|| anyhow!("cannot tell the size of '{module}:{name}'"))?;
            if size > MAX_BYTES {
                bail!("'{module}:{name}' is {size} bytes; disasm shows at most {MAX_BYTES}");
            }
            Ok((sym.addr, mem.read_vec(sym.addr, size as usize)?))
        })?;
        let (addr, code) = found?;
        Ok(DisasmResult {
            redirect: self.redirect_of(addr),
            symbol: format!("{name} [{module}]"),
            addr,
            size: code.len() as u64,
            lines: disasm::disassemble(&code, addr, &k.symbols),
            pause,
        })
    }

    /// Where the site of a redirected kernel function jumps, in words.
    fn redirect_of(&self, func: u64) -> Option<Redirect> {
        let s = self.engine.funcs().find(|s| s.addr == func)?;
        let target = s.jump_target()?;
        let to = if let Some(f) = self.engine.trampoline_at(target) {
            format!("lpvmm trampoline for {f} (a transition is in progress: each task goes to its own version)")
        } else if let Some((p, f)) = self.engine.function_at(target) {
            format!("{} [{}]", f.new_name, p.name)
        } else {
            format!("{target:#x}")
        };
        Some(Redirect {
            site: s.site,
            target,
            to,
            versions: self
                .engine
                .function_versions()
                .into_iter()
                .filter(|v| v.addr == func)
                .flat_map(|v| v.versions)
                .map(|v| {
                    let how = if v.visible {
                        "visible".to_string()
                    } else {
                        format!("{:?}", v.state).to_lowercase()
                    };
                    format!("{} [{}] ({how})", v.function, v.patch)
                })
                .collect(),
        })
    }
}

/// Attach's temporaries (the BTF blob, kallsyms' decoding buffers, ORC as read) are
/// freed by the time it returns, but the allocator keeps their pages: give them back, so
/// that the VMM's resident memory is what it holds (docs/benchmarks.md, `bench memory`).
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it reads and
    // writes no memory the program holds, and any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The lines /proc/kallsyms has for these modules' symbols that `keep` keeps (named
/// ones only, as /proc/kallsyms shows), in its order.
fn module_lines(
    tables: &[ModuleSymbols],
    keep: impl Fn((&str, &ModuleSymbol)) -> bool,
) -> Vec<ModuleSymbolLine> {
    tables
        .iter()
        .flat_map(|t| t.symbols.iter().map(move |s| (t.module.as_str(), s)))
        .filter(|(_, s)| !s.name.is_empty())
        .filter(|&x| keep(x))
        .map(|(m, s)| ModuleSymbolLine {
            module: m.to_string(),
            addr: s.addr,
            kind: s.proc_kind(),
            name: s.name.clone(),
        })
        .collect()
}

//! Introspection requests on a VM. The guest kernel is attached once (symbols, BTF,
//! ORC: static for the VM's life) and kept; after that each request pauses the guest
//! only for the reads it needs, and says how long.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use introspection::disasm::{self, MAX_BYTES};
use introspection::stack::Unwinder;
use introspection::tasks::TaskReader;
use introspection::{Kernel, PausedGuest};

use crate::control::proto::{
    DisasmResult, KernelResult, PauseCost, StackResult, SymQuery, SymResult, TasksResult,
};
use crate::paused::PausedVm;
use crate::vm::Vm;

impl Vm {
    /// Run `f` on the paused guest (pausing a running VM just for it) and measure the
    /// pause as the guest sees it: from the pause request to the end of the resume.
    pub(crate) fn inspect_paused<R>(
        &mut self,
        f: impl FnOnce(&mut PausedVm) -> R,
    ) -> Result<(R, PauseCost)> {
        let t0 = Instant::now();
        let (out, paused_for_read) = self.paused_for_read(f)?;
        let paused_us = if paused_for_read {
            t0.elapsed().as_micros() as u64
        } else {
            0
        };
        Ok((
            out,
            PauseCost {
                paused_for_read,
                paused_us,
            },
        ))
    }

    /// The attached kernel, attaching first if needed.
    fn attached(&mut self, reattach: bool) -> Result<(Arc<Kernel>, bool, PauseCost)> {
        if let (Some(k), false) = (&self.kernel, reattach) {
            return Ok((k.clone(), false, PauseCost::default()));
        }
        let (kernel, cost) = self.inspect_paused(|g| Kernel::attach(g))?;
        let kernel = Arc::new(kernel.map_err(|e| anyhow!("cannot read the guest kernel: {e}"))?);
        self.kernel = Some(kernel.clone());
        Ok((kernel, true, cost))
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

    /// Symbol lookups need no pause once attached: kallsyms is static.
    pub fn sym(&mut self, query: SymQuery) -> Result<SymResult> {
        let (k, _, _) = self.attached(false)?;
        let s = &k.symbols;
        Ok(match query {
            SymQuery::Name { name } => {
                let symbols: Vec<_> = s.named(&name).into_iter().cloned().collect();
                if symbols.is_empty() {
                    bail!("no kernel symbol named '{name}'");
                }
                SymResult {
                    symbols,
                    located: None,
                }
            }
            SymQuery::Addr { addr } => SymResult {
                symbols: Vec::new(),
                located: Some(
                    s.locate(addr)
                        .ok_or_else(|| anyhow!("{addr:#x} is below every kernel symbol"))?,
                ),
            },
            SymQuery::All => SymResult {
                symbols: s.symbols().to_vec(),
                located: None,
            },
        })
    }

    pub fn tasks(&mut self) -> Result<TasksResult> {
        let (k, _, _) = self.attached(false)?;
        let (list, pause) = self.inspect_paused(|g| TaskReader::new(&k, g).list())?;
        Ok(TasksResult {
            list: list.map_err(|e| anyhow!("reading the guest's tasks: {e}"))?,
            pause,
        })
    }

    /// Stack of the task with `pid`, of every idle task for pid 0, of all tasks for None.
    pub fn stack(&mut self, pid: Option<i32>) -> Result<StackResult> {
        let (k, _, _) = self.attached(false)?;
        let (traces, pause) = self.inspect_paused(|g| {
            let reader = TaskReader::new(&k, g);
            let list = reader.list()?;
            let unwinder = Unwinder::new(&reader, &[]);
            Ok::<_, introspection::tasks::TaskError>(
                list.tasks
                    .iter()
                    .filter(|t| pid.is_none_or(|p| t.pid == p))
                    .map(|t| unwinder.trace(t))
                    .collect::<Vec<_>>(),
            )
        })?;
        let traces = traces.map_err(|e| anyhow!("reading the guest's tasks: {e}"))?;
        if let (Some(p), true) = (pid, traces.is_empty()) {
            bail!("no task with pid {p} in the guest");
        }
        Ok(StackResult { traces, pause })
    }

    pub fn disasm(&mut self, symbol: &str, sympos: Option<u32>) -> Result<DisasmResult> {
        let (k, _, _) = self.attached(false)?;
        let sym = k.symbols.resolve(symbol, sympos)?.clone();
        let size = k
            .symbols
            .size_at(sym.addr)
            .ok_or_else(|| anyhow!("cannot tell the size of '{symbol}'"))?;
        if size > MAX_BYTES {
            bail!("'{symbol}' is {size} bytes; disasm shows at most {MAX_BYTES}");
        }
        let (code, pause) = self.inspect_paused(|g| {
            k.memory(g as &dyn PausedGuest)
                .read_vec(sym.addr, size as usize)
        })?;
        let code = code.map_err(|e| anyhow!("reading '{symbol}': {e}"))?;
        Ok(DisasmResult {
            symbol: sym.name,
            addr: sym.addr,
            size,
            lines: disasm::disassemble(&code, sym.addr, &k.symbols),
            pause,
        })
    }
}

//! The only writer of function sites and of the guest's ftrace record flags: each site
//! checked to hold what lpvmm last wrote, the ftrace records that cross the NOP planned
//! around it, then written (through the engine's journal, as every write is).

use std::collections::BTreeMap;

use introspection::kernel::Kernel;
use introspection::PausedGuest;

use crate::engine::Engine;
use crate::funcs::ftrace::{self, FlagWrite, SiteMove};
use crate::funcs::{FuncChange, FuncStack};
use crate::{GuestWriter, KpError};

impl Engine {
    /// A kernel function's site record, created at its first redirection.
    pub(crate) fn ensure_stack(&mut self, func: u64) -> Result<(), KpError> {
        if self.funcs.contains_key(&func) {
            return Ok(());
        }
        let f = crate::funcs::named(&self.patches, func)
            .ok_or_else(|| KpError::State(format!("no loaded patch names {func:#x}")))?;
        self.funcs.insert(func, FuncStack::of(f));
        Ok(())
    }

    /// Site records of functions whose site is the original again.
    pub(crate) fn drop_unused_stacks(&mut self) {
        self.funcs.retain(|_, s| s.live != s.original);
    }

    /// Every site still holds what lpvmm last wrote there (nothing else changed it), and
    /// the guest's ftrace lets go of or takes back the sites that cross the NOP: the
    /// record writes to make with the sites (see [`crate::funcs::ftrace`]).
    pub(crate) fn check_sites(
        &self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        writes: &[(u64, [u8; 5])],
    ) -> Result<Vec<FlagWrite>, KpError> {
        check_modules_loaded(&self.funcs, guest, kernel, writes)?;
        for (func, _) in writes {
            let s = &self.funcs[func];
            let mut now = [0u8; 5];
            guest
                .read_phys(s.site_pa, &mut now)
                .map_err(|e| KpError::guest(format!("reading the site of {}", s.name), e))?;
            if now != s.live {
                // The guest's ftrace may have taken a site lpvmm had left as the NOP.
                return Err(match crate::funcs::site::inspect(&s.name, s.site, &now) {
                    Err(why) if now[0] == crate::funcs::site::CALL_REL32 => why,
                    _ => KpError::Site(format!(
                        "{} at {:#x} was changed by something other than lpvmm",
                        s.name, s.site
                    )),
                });
            }
        }
        let moves: Vec<(&FuncStack, SiteMove)> = writes
            .iter()
            .filter_map(|(func, bytes)| {
                let s = &self.funcs[func];
                SiteMove::of(s, bytes).map(|m| (s, m))
            })
            .collect();
        ftrace::plan(kernel, guest, &moves)
    }

    /// The sites, with the ftrace record writes [`Engine::check_sites`] planned for them:
    /// records hidden before their site leaves the NOP, given back after it returns.
    pub(crate) fn write_sites(
        &mut self,
        guest: &mut dyn GuestWriter,
        writes: &[(u64, [u8; 5])],
        flags: Vec<FlagWrite>,
    ) -> Result<(), KpError> {
        let (releases, claims): (Vec<_>, Vec<_>) = flags.into_iter().partition(|f| f.release);
        self.write_flags(guest, claims)?;
        for (func, bytes) in writes {
            let s = self.funcs.get_mut(func).ok_or_else(|| no_stack(*func))?;
            if s.live != *bytes {
                guest
                    .write_phys(s.site_pa, bytes)
                    .map_err(|e| KpError::guest(format!("writing the site of {}", s.name), e))?;
                s.live = *bytes;
            }
        }
        self.write_flags(guest, releases)
    }

    pub(crate) fn write_flags(
        &mut self,
        guest: &mut dyn GuestWriter,
        flags: Vec<FlagWrite>,
    ) -> Result<(), KpError> {
        for f in flags {
            let s = self
                .funcs
                .get_mut(&f.func)
                .ok_or_else(|| no_stack(f.func))?;
            guest
                .write_phys(f.flags_pa, &f.flags.to_le_bytes())
                .map_err(|e| KpError::guest(format!("the ftrace record of {}", s.name), e))?;
            s.ftrace_hidden = f.hidden;
        }
        Ok(())
    }
}

/// Every module whose function sites are to be written is still loaded, with the
/// function in its text: a site in a module the guest unloaded is freed memory, never
/// to be written. (lpvmm does not yet follow a module's unload, DESIGN.md §11: until it
/// does, such a patch stays as it is and says why.)
fn check_modules_loaded(
    funcs: &BTreeMap<u64, FuncStack>,
    guest: &dyn PausedGuest,
    kernel: &Kernel,
    writes: &[(u64, [u8; 5])],
) -> Result<(), KpError> {
    let in_modules: Vec<&FuncStack> = writes
        .iter()
        .filter_map(|(func, _)| funcs.get(func))
        .filter(|s| s.module.is_some())
        .collect();
    if in_modules.is_empty() {
        return Ok(());
    }
    let mem = kernel.memory(guest);
    let list = introspection::modules::ModuleList::read(&mem, kernel)
        .map_err(|e| KpError::GuestState(e.to_string()))?;
    for s in in_modules {
        let name = s.module.as_deref().unwrap_or_default();
        let here = list.named(name).is_some_and(|m| {
            m.state != introspection::modules::ModuleState::Unformed && m.text.contains(s.addr)
        });
        if !here {
            return Err(KpError::GuestState(format!(
                "module {name} was unloaded while {} was patched: its site is gone, and \
                 lpvmm writes nothing there",
                s.name
            )));
        }
    }
    Ok(())
}

/// What each function's site holds while its tasks move: a jump to its trampoline, or
/// (immediate functions) the version they move to.
pub(crate) fn site_writes(
    funcs: &BTreeMap<u64, FuncStack>,
    changes: &[FuncChange],
) -> Result<Vec<(u64, [u8; 5])>, KpError> {
    changes
        .iter()
        .map(|c| {
            let s = &funcs[&c.func];
            Ok((
                c.func,
                match c.trampoline {
                    Some(tr) => crate::funcs::site::jump(s.site, tr)?,
                    None => s.site_bytes(&c.to)?,
                },
            ))
        })
        .collect()
}

/// A site write for a function the engine keeps no version stack of: a bug of the
/// engine's, refused as an error rather than a panic in the pause.
fn no_stack(func: u64) -> KpError {
    KpError::State(format!("no version stack for the function at {func:#x}"))
}

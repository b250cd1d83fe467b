//! Patches that outlive a boot. A guest that reboots in its VM (vstate/vm.rs,
//! `Vm::reboot`) comes back with its own kernel's code and none of lpvmm's: the
//! patches given with `lpvmm run --patch FILE` and those that were loaded when it
//! rebooted are applied again, in that order, once the new kernel is up.
//!
//! "Up" is the kernel's own word: `system_state` is `SYSTEM_RUNNING`, which the kernel
//! sets right before it starts its first user program (`kernel_init`, after it freed
//! its init memory). From then on each patch is loaded and enabled as `lpvmm patch`
//! would (per-task consistency, no timeout), one transition at a time; everything the
//! guest runs from its first program on can meet the patched code once its transition
//! has moved it (docs/running-vms.md, "Reboot").

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use introspection::memory::KernelMemory;

use super::patching::TransitionArgs;
use super::Session;
use crate::proto::{BootView, PatchStateView};

/// `SYSTEM_RUNNING` in `enum system_states` (include/linux/kernel.h: BOOTING,
/// SCHEDULING, FREEING_INITMEM, RUNNING, ...), the same in 6.1 and 6.12.
const SYSTEM_RUNNING: u32 = 3;
/// How often a booting guest is looked at until its kernel is up.
const BOOT_POLL: Duration = Duration::from_millis(200);

/// Why a patch is applied at a boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `lpvmm run --patch FILE`: at every boot.
    CommandLine(PathBuf),
    /// Loaded through the control socket before reboot N.
    LoadedBefore { reboot: u64 },
}

/// A patch to apply: its file's bytes, its parameters, whether to enable it.
#[derive(Clone, Debug)]
pub struct BootPatch {
    pub bytes: Vec<u8>,
    pub params: Vec<String>,
    pub enable: bool,
    pub origin: Origin,
}

/// A patch loaded at this boot, as it was given (for the next boot).
#[derive(Clone, Debug)]
struct Loaded {
    name: String,
    bytes: Vec<u8>,
    params: Vec<String>,
    from_command_line: bool,
}

#[derive(Default)]
pub struct BootPatches {
    /// `--patch` files, read when lpvmm started.
    command_line: Vec<BootPatch>,
    /// Every patch loaded at this boot, in load order.
    loaded: Vec<Loaded>,
    /// Still to apply at this boot, in order.
    pending: VecDeque<BootPatch>,
    /// The patch being applied now, until its load returns.
    applying: Option<Origin>,
    /// Per patch name: how it came to be loaded at this boot.
    notes: Vec<(String, String)>,
    /// What applying them did, oldest first (failures included).
    log: Vec<String>,
    next_look: Option<Instant>,
}

impl BootPatches {
    /// `files`: `--patch` files, read now (a missing one is an error before boot).
    pub fn from_files(files: &[PathBuf]) -> Result<BootPatches> {
        let mut command_line = Vec::new();
        for path in files {
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("--patch {}: {e}", path.display()))?;
            command_line.push(BootPatch {
                bytes,
                params: Vec::new(),
                enable: true,
                origin: Origin::CommandLine(path.clone()),
            });
        }
        Ok(BootPatches {
            pending: command_line.iter().cloned().collect(),
            command_line,
            ..Default::default()
        })
    }

    /// A patch was loaded (by a client or at boot): remember it as it was given.
    pub fn loaded(&mut self, name: &str, bytes: Vec<u8>, params: &[String]) {
        let from_command_line = matches!(self.applying, Some(Origin::CommandLine(_)));
        self.loaded.retain(|l| l.name != name);
        self.loaded.push(Loaded {
            name: name.to_string(),
            bytes,
            params: params.to_vec(),
            from_command_line,
        });
    }

    pub fn unloaded(&mut self, name: &str) {
        self.loaded.retain(|l| l.name != name);
    }

    /// The guest rebooted (its `reboot`-th reboot): what to apply at the new boot. The
    /// `--patch` files first, then each patch loaded now that did not come from one,
    /// enabled if it was enabled (or enabling).
    pub fn rebooted(&mut self, reboot: u64, states: &[(String, PatchStateView)]) {
        let mut pending: VecDeque<BootPatch> = self.command_line.iter().cloned().collect();
        for (name, state) in states {
            let Some(l) = self.loaded.iter().find(|l| &l.name == name) else {
                continue;
            };
            if l.from_command_line {
                continue;
            }
            pending.push_back(BootPatch {
                bytes: l.bytes.clone(),
                params: l.params.clone(),
                enable: matches!(state, PatchStateView::Enabled | PatchStateView::Enabling),
                origin: Origin::LoadedBefore { reboot },
            });
        }
        *self = BootPatches {
            command_line: std::mem::take(&mut self.command_line),
            pending,
            log: std::mem::take(&mut self.log),
            ..Default::default()
        };
    }

    pub fn view(&self, boots: u64) -> BootView {
        BootView {
            reboots: boots,
            pending: self.pending.len(),
            log: self.log.clone(),
        }
    }

    /// How the patch `name` came to be loaded at this boot, if at boot.
    pub fn note(&self, name: &str) -> Option<String> {
        self.notes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, note)| note.clone())
    }
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::CommandLine(p) => format!("applied at boot (--patch {})", p.display()),
            Origin::LoadedBefore { reboot } => format!("applied again after reboot {reboot}"),
        }
    }
}

impl Session {
    /// Apply the next patch due at this boot, if the kernel is up and no transition
    /// runs. Called by the patch driver; returns when to look again (`None`: nothing
    /// left to apply).
    pub fn apply_boot_patches(&mut self) -> Option<Instant> {
        if self.boot.pending.is_empty() {
            return None;
        }
        let now = Instant::now();
        if self.engine.due().is_some() {
            // A transition runs (its ticks wake the driver): look again after a poll.
            return Some(now + BOOT_POLL);
        }
        if let Some(t) = self.boot.next_look.filter(|&t| t > now) {
            return Some(t);
        }
        if !self.kernel_is_up() {
            self.boot.next_look = Some(now + BOOT_POLL);
            return self.boot.next_look;
        }
        let next = self.boot.pending.pop_front()?;
        self.apply_one(next);
        Some(Instant::now())
    }

    fn apply_one(&mut self, p: BootPatch) {
        let boot = self.vm.boots();
        self.boot.applying = Some(p.origin.clone());
        let args = TransitionArgs {
            consistency: patcher::Consistency::PerTask,
            timeout_ms: None,
        };
        let loaded = self.patch_load_bytes(p.bytes, &p.params, p.enable, args);
        self.boot.applying = None;
        let line = match loaded {
            Ok(r) => {
                let note = p.origin.describe();
                let line = format!("boot {boot}: {} {note}", r.name);
                self.boot.notes.push((r.name, note));
                line
            }
            Err(e) => format!("boot {boot}: cannot apply {}: {e:#}", p.origin.describe()),
        };
        eprintln!("\r\nlpvmm: {line}");
        self.boot.log.push(line);
    }

    /// Whether the guest's kernel has reached `SYSTEM_RUNNING`. An attach made before
    /// that is dropped: the kernel still changes what attach reads (its init memory).
    fn kernel_is_up(&mut self) -> bool {
        let Ok(kernel) = self.kernel_attached() else {
            return false;
        };
        let state = kernel.symbols.addr("system_state").and_then(|va| {
            self.vm
                .running_ram(|ram| KernelMemory::new(ram, kernel.root).u32(va).ok())
        });
        if state == Some(SYSTEM_RUNNING) {
            return true;
        }
        self.kernel = None;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_command_line(path: &str) -> BootPatches {
        let p = BootPatch {
            bytes: path.as_bytes().to_vec(),
            params: Vec::new(),
            enable: true,
            origin: Origin::CommandLine(path.into()),
        };
        BootPatches {
            pending: [p.clone()].into(),
            command_line: vec![p],
            ..Default::default()
        }
    }

    /// What the boot applies, as (bytes, enable, origin).
    fn due(b: &BootPatches) -> Vec<(String, bool, Origin)> {
        b.pending
            .iter()
            .map(|p| {
                (
                    String::from_utf8_lossy(&p.bytes).into_owned(),
                    p.enable,
                    p.origin.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn after_a_reboot_the_command_line_patches_come_first_then_those_loaded_as_they_were() {
        let mut b = from_command_line("/p/fix.kp");
        // The boot applies fix.kp, then clients load two more and disable one.
        let first = b.pending.pop_front().unwrap();
        b.applying = Some(first.origin.clone());
        b.loaded("fix", first.bytes, &[]);
        b.applying = None;
        b.loaded("a", b"a.kp".to_vec(), &["x=1".into()]);
        b.loaded("b", b"b.kp".to_vec(), &[]);
        b.loaded("gone", b"gone.kp".to_vec(), &[]);
        b.unloaded("gone");
        let states = [
            ("fix".to_string(), PatchStateView::Enabled),
            ("a".to_string(), PatchStateView::Disabled),
            ("b".to_string(), PatchStateView::Enabling),
        ];
        b.rebooted(1, &states);
        let after = LoadedBefore { reboot: 1 };
        use Origin::LoadedBefore;
        assert_eq!(
            due(&b),
            [
                (
                    "/p/fix.kp".into(),
                    true,
                    Origin::CommandLine("/p/fix.kp".into())
                ),
                ("a.kp".into(), false, after.clone()),
                ("b.kp".into(), true, after),
            ]
        );
        assert_eq!(b.pending[1].params, ["x=1"]);
        assert_eq!(b.view(1).pending, 3);
    }

    #[test]
    fn a_second_reboot_applies_again_what_the_first_applied() {
        let mut b = from_command_line("/p/fix.kp");
        b.pending.clear();
        b.loaded("a", b"a.kp".to_vec(), &[]);
        b.rebooted(1, &[("a".into(), PatchStateView::Enabled)]);
        let a = b.pending.pop_back().unwrap();
        b.applying = Some(a.origin.clone());
        b.loaded("a", a.bytes, &[]);
        b.notes.push(("a".into(), a.origin.describe()));
        b.applying = None;
        assert_eq!(b.note("a").as_deref(), Some("applied again after reboot 1"));
        b.rebooted(2, &[("a".into(), PatchStateView::Enabled)]);
        assert_eq!(
            due(&b).last().map(|d| d.2.clone()),
            Some(Origin::LoadedBefore { reboot: 2 })
        );
        assert_eq!(b.note("a"), None, "notes are per boot");
    }

    #[test]
    fn a_missing_patch_file_is_an_error_before_boot() {
        let e = BootPatches::from_files(&["/nonexistent/fix.kp".into()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--patch /nonexistent/fix.kp"), "{e}");
    }
}

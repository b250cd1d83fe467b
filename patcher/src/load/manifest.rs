//! The manifest of a `.kp` patch: NUL-separated `key=value` strings in the object's
//! `.lpvmm.manifest` section, written by the macros of `lpvmm/patch.h`.

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// Manifest format this lpvmm reads (`lpvmm=1`).
pub const FORMAT_VERSION: u32 = 1;
const MAX_NAME: usize = 64;
/// More entries than a patch has; a bound on hostile input.
const MAX_ENTRIES: usize = 4096;

/// The longest module name the kernel keeps (`MODULE_NAME_LEN` less its NUL).
const MAX_MODULE_NAME: usize = 55;

/// A kernel symbol named the way livepatch does: `name`, or the `pos`-th of that name in
/// kallsyms order, in vmlinux or in the module `object` (where `pos` counts within that
/// module, as livepatch's sympos counts within its object).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSymbol {
    /// The module the symbol is in; `None` for vmlinux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    pub name: String,
    pub pos: Option<u32>,
}

/// A module name as the kernel spells it (`struct module`'s `name`: `_`, never `-`).
pub fn valid_module_name(s: &str) -> bool {
    s.len() <= MAX_MODULE_NAME && is_c_identifier(s)
}

impl KernelSymbol {
    /// `[MODULE:]NAME[,POS]`.
    fn parse(s: &str) -> Result<KernelSymbol, String> {
        let (object, s) = match s.split_once(':') {
            Some((m, rest)) => {
                let m = m.trim();
                if !valid_module_name(m) {
                    return Err(format!(
                        "'{m:.80}' is not a module name (the kernel's spelling: letters, \
                         digits and '_', at most {MAX_MODULE_NAME})"
                    ));
                }
                (Some(m.to_string()), rest)
            }
            None => (None, s),
        };
        let (name, pos) = match s.split_once(',') {
            Some((n, p)) => {
                let pos: u32 = p
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| format!("'{s}': position must be a number from 1"))?;
                (n.trim(), Some(pos))
            }
            None => (s.trim(), None),
        };
        if !is_c_identifier(name) && !name.contains('.') {
            return Err(format!("'{name}' is not a symbol name"));
        }
        Ok(KernelSymbol {
            object,
            name: name.to_string(),
            pos,
        })
    }
}

impl std::fmt::Display for KernelSymbol {
    /// `[module:]name[,pos]`, as `lpvmm sym` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(m) = &self.object {
            write!(f, "{m}:")?;
        }
        match self.pos {
            Some(p) => write!(f, "{},{p}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// One function replacement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    /// The kernel function replaced.
    pub old: KernelSymbol,
    /// The new function, a symbol defined in the patch object.
    pub new: String,
    /// Flips at once even in a per-task transition (`LPVMM_REPLACE_IMMEDIATE`).
    #[serde(default)]
    pub immediate: bool,
}

/// An undefined symbol of the object bound to a particular kernel symbol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolBinding {
    pub local: String,
    pub kernel: KernelSymbol,
}

/// A system state a patch establishes (the kernel livepatch's `klp_state`): an id the
/// patch authors agree on, and the version of that state this patch handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemState {
    pub id: u64,
    pub version: u32,
}

/// When a callback runs (the kernel livepatch's `klp_callbacks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackKind {
    /// Before the patch's enable transition starts; a non-zero return refuses the enable.
    PrePatch,
    /// Once the enable transition has completed.
    PostPatch,
    /// Before the disable transition starts.
    PreUnpatch,
    /// Once the disable transition has completed (and after an enable that did not).
    PostUnpatch,
    /// A state's (`LPVMM_STATE_SETUP`): before the enable of the first enabled patch
    /// that holds the state; a non-zero return refuses the enable.
    StateSetup,
    /// Once that enable completed.
    StateEnable,
    /// Before the disable of the last enabled patch that holds the state.
    StateDisable,
    /// Once that disable completed (and after an enable that ran the setup but did not
    /// complete).
    StateRelease,
    /// After a state's release: frees the shadow variables tied to it (`LPVMM_SHADOW`,
    /// a function lpvmm/shadow.h defines; one per variable id).
    ShadowFree,
    /// A kernel livepatch module's exit function (`module_exit`), run once its disable
    /// completed, last: where the kernel would run it at rmmod (see [`crate::klp`]).
    ModuleExit,
}

impl CallbackKind {
    /// The objects' four, then the states' four.
    pub const ALL: [CallbackKind; 8] = [
        CallbackKind::PrePatch,
        CallbackKind::PostPatch,
        CallbackKind::PreUnpatch,
        CallbackKind::PostUnpatch,
        CallbackKind::StateSetup,
        CallbackKind::StateEnable,
        CallbackKind::StateDisable,
        CallbackKind::StateRelease,
    ];

    /// Its manifest word: `pre_patch`, `post_patch`, `pre_unpatch`, `post_unpatch`.
    pub fn word(self) -> &'static str {
        match self {
            CallbackKind::PrePatch => "pre_patch",
            CallbackKind::PostPatch => "post_patch",
            CallbackKind::PreUnpatch => "pre_unpatch",
            CallbackKind::PostUnpatch => "post_unpatch",
            CallbackKind::StateSetup => "state_setup",
            CallbackKind::StateEnable => "state_enable",
            CallbackKind::StateDisable => "state_disable",
            CallbackKind::StateRelease => "state_release",
            CallbackKind::ShadowFree => "shadow_free",
            CallbackKind::ModuleExit => "module_exit",
        }
    }
}

/// A callback of one object of the patch: `func`, a function of the patch, called as
/// `int func(struct module *mod)` (`mod` NULL for vmlinux) in a guest kworker; or of one
/// of its states (`state`), called as `int func(unsigned long id)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    /// The module; `None` for vmlinux (and for a state's).
    pub object: Option<String>,
    pub kind: CallbackKind,
    pub func: String,
    /// For a state's callback: the state's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub replacements: Vec<Replacement>,
    pub bindings: Vec<SymbolBinding>,
    pub depends: Vec<String>,
    /// A cumulative patch (`LPVMM_ATOMIC_REPLACE`): once enabled it is the whole truth,
    /// and every function an older patch changed that it does not name runs the
    /// original again.
    pub atomic_replace: bool,
    /// States it establishes (`LPVMM_STATE`), each id once.
    pub states: Vec<SystemState>,
    /// Its callbacks (`LPVMM_PRE_PATCH` and the others), each kind once per object.
    #[serde(default)]
    pub callbacks: Vec<Callback>,
    /// Shadow variables tied to a state (`LPVMM_SHADOW`), each id once.
    #[serde(default)]
    pub shadows: Vec<ShadowTie>,
}

/// Shadow variable `id` lives as long as state `state`: lpvmm runs the patch's `free`
/// (which frees every variable `id`) once the state ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowTie {
    pub id: u64,
    pub state: u64,
}

fn is_c_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// A patch name: what `lpvmm patch list` shows and `disable NAME` takes.
pub fn valid_patch_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `ID:VERSION`, both decimal.
fn parse_state(v: &str) -> Result<SystemState, &'static str> {
    let (id, version) = v.split_once(':').ok_or("want ID:VERSION")?;
    Ok(SystemState {
        id: id.trim().parse().map_err(|_| "the id is not a number")?,
        version: version
            .trim()
            .parse()
            .map_err(|_| "the version is not a number")?,
    })
}

impl Manifest {
    pub fn parse(section: &[u8]) -> Result<Manifest, ParseError> {
        let bad = |m: String| ParseError::Manifest(m);
        let mut m = Manifest::default();
        let mut version = None;
        let entries: Vec<&[u8]> = section
            .split(|&b| b == 0)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.len() > MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        for raw in entries {
            let entry =
                std::str::from_utf8(raw).map_err(|_| bad("an entry is not UTF-8".into()))?;
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| bad(format!("entry without '=': {entry:.80}")))?;
            if let Some(v) = m.take_entry(key, value)? {
                version = Some(v);
            }
        }
        if version.is_none() {
            return Err(bad(
                "no 'lpvmm=' version entry (declare the patch with LPVMM_PATCH)".into(),
            ));
        }
        if m.name.is_empty() {
            return Err(bad("no name (declare the patch with LPVMM_PATCH)".into()));
        }
        if m.replacements.is_empty() {
            return Err(bad("replaces no function (add LPVMM_REPLACE)".into()));
        }
        for t in &m.shadows {
            if !m.states.iter().any(|st| st.id == t.state) {
                return Err(bad(format!(
                    "shadow variable {} is tied to state {}, which the patch does not \
                     declare (LPVMM_STATE)",
                    t.id, t.state
                )));
            }
        }
        for c in &m.callbacks {
            if let Some(id) = c.state {
                if !m.states.iter().any(|st| st.id == id) {
                    return Err(bad(format!(
                        "a {} callback for state {id}, which the patch does not declare \
                         (LPVMM_STATE)",
                        c.kind.word()
                    )));
                }
                continue;
            }
            let patched = m.replacements.iter().any(|r| r.old.object == c.object);
            if !patched {
                return Err(bad(format!(
                    "a {} callback for {}, of which the patch replaces no function",
                    c.kind.word(),
                    c.object.as_deref().unwrap_or("vmlinux")
                )));
            }
        }
        Ok(m)
    }

    /// The modules whose functions it replaces or that have callbacks, each once, in
    /// the order it names them (its objects besides vmlinux; a kernel livepatch module
    /// may give an object callbacks and no function).
    pub fn modules(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let replaced = self.replacements.iter().map(|r| r.old.object.as_deref());
        let called = self.callbacks.iter().map(|c| c.object.as_deref());
        for m in replaced.chain(called).flatten() {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    /// One `key=value` entry; the format version when it is the `lpvmm=` entry.
    fn take_entry(&mut self, key: &str, value: &str) -> Result<Option<u32>, ParseError> {
        let bad = |m: String| ParseError::Manifest(m);
        match key {
            "lpvmm" => {
                let v: u32 = value
                    .parse()
                    .map_err(|_| bad(format!("bad format version '{value:.20}'")))?;
                if v != FORMAT_VERSION {
                    return Err(bad(format!(
                        "format version {v}; this lpvmm reads version {FORMAT_VERSION}"
                    )));
                }
                return Ok(Some(v));
            }
            "name" => {
                if !self.name.is_empty() {
                    return Err(bad("more than one name".into()));
                }
                if !valid_patch_name(value) {
                    return Err(bad(format!(
                        "name '{value:.80}': use 1 to {MAX_NAME} letters, digits, '_', '-' or '.'"
                    )));
                }
                self.name = value.to_string();
            }
            "replace" | "replace_immediate" => {
                self.add_replacement(value, key == "replace_immediate")?
            }
            "symbol" => self.add_binding(value)?,
            "callback" => self.add_callback(value)?,
            "state_callback" => self.add_state_callback(value)?,
            "shadow" => self.add_shadow(value)?,
            "depends" => {
                if !valid_patch_name(value) {
                    return Err(bad(format!("depends: '{value:.80}' is not a patch name")));
                }
                self.depends.push(value.to_string());
            }
            "state" => {
                let st = parse_state(value).map_err(|e| bad(format!("state={value:.40}: {e}")))?;
                if self.states.iter().any(|s| s.id == st.id) {
                    return Err(bad(format!("state {} is declared twice", st.id)));
                }
                self.states.push(st);
            }
            "flags" => match value {
                "replace" => self.atomic_replace = true,
                other => return Err(bad(format!("unknown flag '{other:.40}'"))),
            },
            other => return Err(bad(format!("unknown key '{other:.40}'"))),
        }
        Ok(None)
    }

    /// `replace[_immediate]=[MODULE:]OLD[,POS]:NEW`.
    fn add_replacement(&mut self, value: &str, immediate: bool) -> Result<(), ParseError> {
        let bad = |m: String| ParseError::Manifest(m);
        let (old, new) = value
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("replace={value:.80}: want [MODULE:]OLD:NEW")))?;
        let old = KernelSymbol::parse(old).map_err(|e| bad(format!("replace: {e}")))?;
        if !is_c_identifier(new) {
            return Err(bad(format!("replace: '{new:.80}' is not a function name")));
        }
        if self.replacements.iter().any(|r| r.old == old) {
            return Err(bad(format!("{old} is replaced twice")));
        }
        self.replacements.push(Replacement {
            old,
            new: new.to_string(),
            immediate,
        });
        Ok(())
    }

    /// `callback=[MODULE:]KIND:FUNC`.
    fn add_callback(&mut self, value: &str) -> Result<(), ParseError> {
        let bad = |m: String| ParseError::Manifest(format!("callback={value:.80}: {m}"));
        let parts: Vec<&str> = value.split(':').collect();
        let (object, kind, func) = match parts[..] {
            [k, f] => (None, k, f),
            [m, k, f] if valid_module_name(m) => (Some(m.to_string()), k, f),
            [m, _, _] => return Err(bad(format!("'{m:.60}' is not a module name"))),
            _ => return Err(bad("want [MODULE:]KIND:FUNCTION".into())),
        };
        let kind = CallbackKind::ALL[..4]
            .iter()
            .copied()
            .find(|c| c.word() == kind)
            .ok_or_else(|| {
                bad(format!(
                    "'{kind:.40}' is not pre_patch, post_patch, pre_unpatch or post_unpatch"
                ))
            })?;
        if !is_c_identifier(func) {
            return Err(bad(format!("'{func:.60}' is not a function name")));
        }
        self.push_callback(Callback {
            object,
            kind,
            func: func.to_string(),
            state: None,
        })
        .map_err(bad)
    }

    /// `state_callback=ID:KIND:FUNC`, KIND one of setup, enable, disable, release.
    fn add_state_callback(&mut self, value: &str) -> Result<(), ParseError> {
        let bad = |m: String| ParseError::Manifest(format!("state_callback={value:.80}: {m}"));
        let [id, kind, func] = value.split(':').collect::<Vec<_>>()[..] else {
            return Err(bad("want ID:KIND:FUNCTION".into()));
        };
        let id: u64 = id
            .parse()
            .map_err(|_| bad("the id is not a number".into()))?;
        let kind = CallbackKind::ALL[4..]
            .iter()
            .copied()
            .find(|c| c.word() == format!("state_{kind}"))
            .ok_or_else(|| {
                bad(format!(
                    "'{kind:.40}' is not setup, enable, disable or release"
                ))
            })?;
        if !is_c_identifier(func) {
            return Err(bad(format!("'{func:.60}' is not a function name")));
        }
        self.push_callback(Callback {
            object: None,
            kind,
            func: func.to_string(),
            state: Some(id),
        })
        .map_err(bad)
    }

    /// `shadow=ID:STATE:FUNC`: variable ID tied to state STATE, freed by FUNC.
    fn add_shadow(&mut self, value: &str) -> Result<(), ParseError> {
        let bad = |m: String| ParseError::Manifest(format!("shadow={value:.80}: {m}"));
        let [id, state, func] = value.split(':').collect::<Vec<_>>()[..] else {
            return Err(bad("want ID:STATE:FUNCTION".into()));
        };
        let number = |v: &str, what: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("the {what} is not a number")))
        };
        let (id, state) = (number(id, "id")?, number(state, "state")?);
        if !is_c_identifier(func) {
            return Err(bad(format!("'{func:.60}' is not a function name")));
        }
        if self.shadows.iter().any(|t| t.id == id) {
            return Err(bad(format!("shadow variable {id} is tied twice")));
        }
        self.shadows.push(ShadowTie { id, state });
        self.callbacks.push(Callback {
            object: None,
            kind: CallbackKind::ShadowFree,
            func: func.to_string(),
            state: Some(state),
        });
        Ok(())
    }

    /// Add `cb`, refused if its object or state already has a callback of its kind.
    fn push_callback(&mut self, cb: Callback) -> Result<(), String> {
        let twin = self
            .callbacks
            .iter()
            .any(|c| (&c.object, c.state, c.kind) == (&cb.object, cb.state, cb.kind));
        if twin {
            let of = match (cb.state, &cb.object) {
                (Some(id), _) => format!("state {id}"),
                (None, o) => o.as_deref().unwrap_or("vmlinux").to_string(),
            };
            return Err(format!("a second {} callback for {of}", cb.kind.word()));
        }
        self.callbacks.push(cb);
        Ok(())
    }

    /// `symbol=LOCAL:[MODULE:]KERNEL,POS`.
    fn add_binding(&mut self, value: &str) -> Result<(), ParseError> {
        let bad = |m: String| ParseError::Manifest(m);
        let (local, kernel) = value
            .split_once(':')
            .ok_or_else(|| bad(format!("symbol={value:.80}: want LOCAL:KERNEL,POS")))?;
        if !is_c_identifier(local) {
            return Err(bad(format!("symbol: '{local:.80}' is not a name")));
        }
        let kernel = KernelSymbol::parse(kernel).map_err(|e| bad(format!("symbol: {e}")))?;
        self.bindings.push(SymbolBinding {
            local: local.to_string(),
            kernel,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(entries: &[&str]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.bytes().chain([0])).collect()
    }

    #[test]
    fn parses_shadow_ties_as_state_callbacks() {
        let m = Manifest::parse(&raw(&[
            "lpvmm=1",
            "name=x",
            "replace=a:b",
            "state=9:1",
            "shadow=1:9:free_1",
            "shadow=2:9:free_2",
        ]))
        .unwrap();
        assert_eq!(
            m.shadows,
            [ShadowTie { id: 1, state: 9 }, ShadowTie { id: 2, state: 9 }]
        );
        let frees: Vec<_> = m
            .callbacks
            .iter()
            .map(|c| (c.kind, c.state, c.func.as_str()))
            .collect();
        assert_eq!(
            frees,
            [
                (CallbackKind::ShadowFree, Some(9), "free_1"),
                (CallbackKind::ShadowFree, Some(9), "free_2")
            ]
        );
    }

    #[test]
    fn parses_every_key() {
        let m = Manifest::parse(&raw(&[
            "lpvmm=1",
            "name=fix-1.2",
            "replace=cmdline_proc_show:new_show",
            "replace=helper,2:new_helper",
            "symbol=local_fn:static_fn,3",
            "depends=base",
            "replace_immediate=meminfo_proc_show:new_meminfo",
            "state=7:2",
            "flags=replace",
        ]))
        .unwrap();
        assert_eq!(m.states, [SystemState { id: 7, version: 2 }]);
        assert!(m.atomic_replace);
        assert!(!m.replacements[0].immediate && m.replacements[2].immediate);
        assert_eq!(m.name, "fix-1.2");
        assert_eq!(m.replacements[1].old.pos, Some(2));
        assert_eq!(m.replacements[1].old.to_string(), "helper,2");
        assert_eq!(m.bindings[0].kernel.name, "static_fn");
        assert_eq!(m.depends, ["base"]);
    }

    #[test]
    fn names_module_objects() {
        let m = Manifest::parse(&raw(&[
            "lpvmm=1",
            "name=tunfix",
            "replace=tun:tun_chr_show_fdinfo:new_fdinfo",
            "replace_immediate=tun:tun_get_socket,2:new_get",
            "replace=cmdline_proc_show:new_show",
            "symbol=flags_name:tun:tun_flags,1",
        ]))
        .unwrap();
        let old = &m.replacements[0].old;
        assert_eq!(old.object.as_deref(), Some("tun"));
        assert_eq!(old.name, "tun_chr_show_fdinfo");
        assert_eq!(old.to_string(), "tun:tun_chr_show_fdinfo");
        assert_eq!(m.replacements[1].old.to_string(), "tun:tun_get_socket,2");
        assert!(m.replacements[1].immediate);
        assert_eq!(m.replacements[2].old.object, None);
        assert_eq!(m.bindings[0].kernel.to_string(), "tun:tun_flags,1");
        assert_eq!(m.modules(), ["tun"]);
        // The same name in two objects is two functions.
        let two = ["lpvmm=1", "name=x", "replace=a:b", "replace=tun:a:c"];
        assert_eq!(Manifest::parse(&raw(&two)).unwrap().replacements.len(), 2);
        for (bad, want) in [
            ("replace=virtio-net:f:g", "not a module name"),
            ("replace=:f:g", "not a module name"),
            ("replace=tun:1f:g", "not a symbol name"),
        ] {
            let e = Manifest::parse(&raw(&["lpvmm=1", "name=x", bad]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn callbacks_per_object() {
        let m = Manifest::parse(&raw(&[
            "lpvmm=1",
            "name=cb",
            "replace=a:b",
            "replace=tun:c:d",
            "callback=pre_patch:pre",
            "callback=tun:post_unpatch:tun_post",
        ]))
        .unwrap();
        assert_eq!(
            m.callbacks,
            [
                Callback {
                    object: None,
                    kind: CallbackKind::PrePatch,
                    func: "pre".into(),
                    state: None,
                },
                Callback {
                    object: Some("tun".into()),
                    kind: CallbackKind::PostUnpatch,
                    func: "tun_post".into(),
                    state: None,
                }
            ]
        );
        for (bad, want) in [
            ("callback=pre_patch", "want [MODULE:]KIND:FUNCTION"),
            ("callback=before:f", "is not pre_patch"),
            ("callback=virtio-net:pre_patch:f", "not a module name"),
            (
                "callback=dummy:pre_patch:f",
                "of which the patch replaces no function",
            ),
        ] {
            let e = Manifest::parse(&raw(&["lpvmm=1", "name=x", "replace=a:b", bad]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let twice = [
            "lpvmm=1",
            "name=x",
            "replace=a:b",
            "callback=pre_patch:f",
            "callback=pre_patch:g",
        ];
        let e = Manifest::parse(&raw(&twice)).unwrap_err().to_string();
        assert!(e.contains("a second pre_patch callback for vmlinux"), "{e}");
    }

    #[test]
    fn refuses_bad_manifests_with_reasons() {
        for (entries, want) in [
            (vec!["name=x", "replace=a:b"], "version"),
            (vec!["lpvmm=2", "name=x", "replace=a:b"], "format version 2"),
            (vec!["lpvmm=1", "replace=a:b"], "no name"),
            (vec!["lpvmm=1", "name=x"], "replaces no function"),
            (vec!["lpvmm=1", "name=bad name", "replace=a:b"], "name"),
            (vec!["lpvmm=1", "name=x", "replace=a"], "OLD:NEW"),
            (vec!["lpvmm=1", "name=x", "replace=a,0:b"], "position"),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "replace=a:c"],
                "twice",
            ),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "color=red"],
                "unknown key",
            ),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "state=1"],
                "ID:VERSION",
            ),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "state=1:-1"],
                "version is not",
            ),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "state=1:1", "state=1:2"],
                "declared twice",
            ),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "shadow=1:9:f"],
                "shadow variable 1 is tied to state 9, which the patch does not declare",
            ),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "shadow=1:9"],
                "ID:STATE:FUNCTION",
            ),
            (
                vec!["lpvmm=1", "name=x", "replace=a:b", "shadow=x:9:f"],
                "id is not a number",
            ),
            (
                vec![
                    "lpvmm=1",
                    "name=x",
                    "replace=a:b",
                    "state=9:1",
                    "shadow=1:9:f",
                    "shadow=1:9:g",
                ],
                "tied twice",
            ),
        ] {
            let e = Manifest::parse(&raw(&entries)).unwrap_err().to_string();
            assert!(e.contains(want), "{entries:?}: {e}");
        }
        assert!(Manifest::parse(&[0xff, 0xfe, b'=', 0]).is_err());
    }
}

//! A livepatch module's static description, read from its ELF without running it: the
//! `struct klp_patch` (the one whose `mod` is the module's own `__this_module`), its
//! objects, their functions (`old_name`, `new_func`, `old_sympos`) and callbacks, its
//! states and `replace`; and its module parameters (`__param`), which lpvmm sets in the
//! module's data before anything of it runs, as insmod would. Offsets are the guest
//! kernel's ([`KlpLayout`], from its BTF); every pointer is read through the
//! relocation that fills it, so nothing depends on where the module would have lain.

use introspection::layout::KlpLayout;

use crate::load::manifest::{
    Callback, CallbackKind, KernelSymbol, Manifest, Replacement, SystemState,
};
use crate::load::object::{Function, Place, RelocTarget, Section, SectionKind};
use crate::ParseError;

/// At most this many objects, functions per object, states (a bound on hostile input).
const MAX_ENTRIES: usize = 4096;

/// What a pointer field holds: a place in the module, a kernel symbol, or nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ptr {
    Null,
    Local(Place),
    Kernel(String),
}

fn bad(m: String) -> ParseError {
    ParseError::Manifest(format!("livepatch module: {m}"))
}

/// The pointer stored at `at` (8 bytes), read through its relocation.
fn pointer(sections: &[Section], at: Place) -> Result<Ptr, ParseError> {
    let s = sections
        .get(at.section)
        .ok_or_else(|| bad("a pointer outside the module".into()))?;
    let r = s.relocs.iter().find(|r| r.offset == at.offset);
    let Some(r) = r else {
        let raw = u64_at(sections, at)?;
        return match raw {
            0 => Ok(Ptr::Null),
            _ => Err(bad(format!(
                "{}+{:#x} holds a pointer no relocation fills",
                s.name, at.offset
            ))),
        };
    };
    Ok(match &r.target {
        RelocTarget::Section(i) => Ptr::Local(Place {
            section: *i,
            offset: r.addend as u64,
        }),
        RelocTarget::Defined {
            section, offset, ..
        } => Ptr::Local(Place {
            section: *section,
            offset: offset.wrapping_add(r.addend as u64),
        }),
        RelocTarget::Kernel(n) => Ptr::Kernel(n.clone()),
    })
}

fn bytes_at(sections: &[Section], at: Place, len: u64) -> Result<&[u8], ParseError> {
    let s = sections
        .get(at.section)
        .ok_or_else(|| bad("a field outside the module".into()))?;
    if s.kind == SectionKind::Bss {
        return Ok(&[0; 8][..len as usize]);
    }
    let end = at
        .offset
        .checked_add(len)
        .filter(|&e| e <= s.bytes.len() as u64);
    end.map(|e| &s.bytes[at.offset as usize..e as usize])
        .ok_or_else(|| bad(format!("a field past the end of {}", s.name)))
}

fn u64_at(sections: &[Section], at: Place) -> Result<u64, ParseError> {
    let b = bytes_at(sections, at, 8)?;
    Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

fn u32_at(sections: &[Section], at: Place) -> Result<u32, ParseError> {
    let b = bytes_at(sections, at, 4)?;
    Ok(u32::from_le_bytes(b.try_into().unwrap_or_default()))
}

fn plus(at: Place, off: u64) -> Place {
    Place {
        section: at.section,
        offset: at.offset.wrapping_add(off),
    }
}

/// The C string a pointer field points to.
fn string(sections: &[Section], at: Place, what: &str) -> Result<Option<String>, ParseError> {
    match pointer(sections, at)? {
        Ptr::Null => Ok(None),
        Ptr::Kernel(n) => Err(bad(format!(
            "{what} points to kernel symbol {n}, not a string"
        ))),
        Ptr::Local(p) => {
            let s = &sections[p.section];
            let tail = s
                .bytes
                .get(p.offset as usize..)
                .ok_or_else(|| bad(format!("{what} points past {}", s.name)))?;
            let len = tail
                .iter()
                .position(|&b| b == 0)
                .filter(|&l| l <= 512)
                .ok_or_else(|| bad(format!("{what} is not a string")))?;
            Ok(Some(String::from_utf8_lossy(&tail[..len]).into_owned()))
        }
    }
}

/// The function a pointer field points to, by name.
fn function(
    sections: &[Section],
    functions: &[Function],
    at: Place,
    what: &str,
) -> Result<Option<String>, ParseError> {
    match pointer(sections, at)? {
        Ptr::Null => Ok(None),
        Ptr::Kernel(n) => Err(bad(format!(
            "{what} is the kernel's {n}: a livepatch's functions are its own"
        ))),
        Ptr::Local(p) => functions
            .iter()
            .find(|f| f.section == p.section && f.offset == p.offset)
            .map(|f| Some(f.name.clone()))
            .ok_or_else(|| bad(format!("{what} points into the module, not at a function"))),
    }
}

/// The module's `struct klp_patch`: the data whose `mod` field points at its
/// `__this_module` and whose `objs` points at data.
fn find_patch(
    sections: &[Section],
    klp: &KlpLayout,
    this_module: usize,
) -> Result<Place, ParseError> {
    let mut found = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        if s.kind != SectionKind::Data || s.kind.executable() {
            continue;
        }
        for r in &s.relocs {
            let to_this = match &r.target {
                RelocTarget::Section(t) | RelocTarget::Defined { section: t, .. } => {
                    *t == this_module
                }
                RelocTarget::Kernel(n) => n == "__this_module",
            };
            let Some(start) = r.offset.checked_sub(klp.patch_mod) else {
                continue;
            };
            let at = Place {
                section: i,
                offset: start,
            };
            let objs = pointer(sections, plus(at, klp.patch_objs));
            let objs_in_data =
                matches!(objs, Ok(Ptr::Local(p)) if !sections[p.section].kind.executable());
            if to_this && objs_in_data {
                found.push(at);
            }
        }
    }
    match found[..] {
        [one] => Ok(one),
        [] => Err(bad(
            "no struct klp_patch (a static klp_patch whose .mod is THIS_MODULE) in its data".into(),
        )),
        _ => Err(bad(format!(
            "{} structs look like its klp_patch",
            found.len()
        ))),
    }
}

/// Where each object's `struct klp_object` is, for its callbacks' argument.
pub type ObjectPlaces = Vec<(Option<String>, Place)>;

/// The manifest a livepatch module's `klp_patch` amounts to, named `name`, and where
/// each of its objects lies.
pub fn describe(
    sections: &[Section],
    functions: &[Function],
    klp: &KlpLayout,
    this_module: usize,
    name: &str,
) -> Result<(Manifest, ObjectPlaces), ParseError> {
    let patch = find_patch(sections, klp, this_module)?;
    let mut m = Manifest {
        name: name.to_string(),
        atomic_replace: bytes_at(sections, plus(patch, klp.patch_replace), 1)?[0] != 0,
        ..Manifest::default()
    };
    let mut places = Vec::new();
    let Ptr::Local(objs) = pointer(sections, plus(patch, klp.patch_objs))? else {
        return Err(bad("klp_patch.objs is not the module's own array".into()));
    };
    for i in 0..MAX_ENTRIES as u64 {
        let at = plus(objs, i * klp.object_size);
        let object = string(sections, plus(at, klp.object_name), "klp_object.name")?;
        let funcs = pointer(sections, plus(at, klp.object_funcs))?;
        if object.is_none() && funcs == Ptr::Null {
            break;
        }
        let Ptr::Local(funcs) = funcs else {
            return Err(bad(format!(
                "object {}: no funcs",
                object.as_deref().unwrap_or("vmlinux")
            )));
        };
        read_funcs(sections, functions, klp, funcs, &object, &mut m)?;
        read_callbacks(sections, functions, klp, at, &object, &mut m)?;
        places.push((object, at));
    }
    m.states = read_states(sections, klp, patch)?;
    // module_exit's alias: the kernel runs it at rmmod, lpvmm after the last disable.
    if functions.iter().any(|f| f.name == "cleanup_module") {
        m.callbacks.push(Callback {
            object: None,
            kind: CallbackKind::ModuleExit,
            func: "cleanup_module".into(),
            state: None,
        });
    }
    Ok((m, places))
}

fn read_funcs(
    sections: &[Section],
    functions: &[Function],
    klp: &KlpLayout,
    funcs: Place,
    object: &Option<String>,
    m: &mut Manifest,
) -> Result<(), ParseError> {
    for i in 0..MAX_ENTRIES as u64 {
        let at = plus(funcs, i * klp.func_size);
        let old = string(sections, plus(at, klp.func_old_name), "klp_func.old_name")?;
        let new = function(
            sections,
            functions,
            plus(at, klp.func_new_func),
            "klp_func.new_func",
        )?;
        let (old, new) = match (old, new) {
            (None, None) => return Ok(()),
            (Some(o), Some(n)) => (o, n),
            _ => return Err(bad("a klp_func without old_name or new_func".into())),
        };
        let sympos = u64_at(sections, plus(at, klp.func_old_sympos))?;
        m.replacements.push(Replacement {
            old: KernelSymbol {
                object: object.clone(),
                name: old,
                pos: u32::try_from(sympos).ok().filter(|&p| p > 0),
            },
            new,
            immediate: false,
        });
    }
    Err(bad(format!(
        "more than {MAX_ENTRIES} functions in one object"
    )))
}

fn read_callbacks(
    sections: &[Section],
    functions: &[Function],
    klp: &KlpLayout,
    at: Place,
    object: &Option<String>,
    m: &mut Manifest,
) -> Result<(), ParseError> {
    for (kind, off) in CallbackKind::ALL[..4].iter().zip(klp.object_callbacks) {
        let what = format!("klp_object.callbacks.{}", kind.word());
        if let Some(func) = function(sections, functions, plus(at, off), &what)? {
            m.callbacks.push(Callback {
                object: object.clone(),
                kind: *kind,
                func,
                state: None,
            });
        }
    }
    Ok(())
}

fn read_states(
    sections: &[Section],
    klp: &KlpLayout,
    patch: Place,
) -> Result<Vec<SystemState>, ParseError> {
    let Ptr::Local(states) = pointer(sections, plus(patch, klp.patch_states))? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for i in 0..MAX_ENTRIES as u64 {
        let at = plus(states, i * klp.state_size);
        let id = u64_at(sections, plus(at, klp.state_id))?;
        if id == 0 {
            return Ok(out);
        }
        let version = u32_at(sections, plus(at, klp.state_version))?;
        out.push(SystemState { id, version });
    }
    Err(bad(format!("more than {MAX_ENTRIES} states")))
}

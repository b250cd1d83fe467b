//! The differ: which functions of an object a source change changed, and what a patch
//! carrying them needs. Both objects are built by the release's own kbuild and
//! compiler with a section per function and per variable, so the "before" object is
//! the running kernel's code, and a function whose bytes or relocations differ is one
//! the change reached: edited in the source, or inlining something that was, or a
//! clone gcc made of either (`.isra`, `.constprop`, `.part`), or the `.cold` part of one.
//!
//! References are compared by what they reach, not by number: a static `count.12` is
//! `count` on both sides, a string is its text, so renumbering and moved strings do not
//! make a function differ.
//!
//! The plan keeps each changed or new function (with its `.cold` part) and what only
//! the patch may have (strings, constants, new variables, the kernel's "once" flags);
//! every other reference is to the running kernel's symbol of the same name (the
//! "before" name: `foo.isra.0` as kallsyms has it), so the new code uses the kernel's
//! own variables.

use std::collections::{BTreeMap, BTreeSet};

use super::objfile::{ObjFile, Place, Reloc, SymKind};
use super::DiffBuildError;

/// Why a function is in the patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Its code differs from the running kernel's.
    Changed,
    /// Its code differs, and the diff changes its source.
    SourceChanged,
    /// Its code differs, and it inlines these functions, whose source the diff changes.
    Inlines(Vec<String>),
    /// The running kernel has no such function.
    New,
    /// It uses `0`, which changed but has no entry the kernel can redirect (a `.cold`
    /// part, or a function built without an fentry call).
    Uses(String),
    /// It is the `.cold` part of `0`.
    ColdPartOf(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Changed => {
                f.write_str("its code differs from the release's (its own source is unchanged)")
            }
            Reason::SourceChanged => f.write_str("the diff changes its source"),
            Reason::Inlines(x) => write!(
                f,
                "it inlines {}, whose source the diff changes",
                x.join(" and ")
            ),
            Reason::New => f.write_str("new: the release has no function of that name"),
            Reason::Uses(x) => write!(f, "uses {x}, which changed and cannot be redirected itself"),
            Reason::ColdPartOf(p) => write!(f, "the .cold part of {p}, moved with it"),
        }
    }
}

/// A function the patch carries.
#[derive(Debug, Clone)]
pub struct Carried {
    /// Its symbol in the "after" object.
    pub symbol: usize,
    pub name: String,
    /// The kernel function it replaces (the "before" name), if it replaces one.
    pub replaces: Option<String>,
    pub reason: Reason,
}

/// What the patch object is made of.
#[derive(Debug, Default)]
pub struct Plan {
    pub carried: Vec<Carried>,
    /// Sections of the "after" object copied whole.
    pub sections: BTreeSet<usize>,
    /// Tables (`__ex_table`, `__bug_table`, `.altinstructions`): the section, its
    /// entry size and the entries kept (those about carried code).
    pub tables: Vec<TableCut>,
    /// A symbol of "after" that the patch refers to in the kernel: the kernel's name.
    pub external: BTreeMap<usize, String>,
}

#[derive(Debug, Clone)]
pub struct TableCut {
    pub section: usize,
    pub entry_size: u64,
    pub entries: Vec<u64>,
}

/// Statics that each place in the code has for itself and that are never the running
/// kernel's (klp-diff's list): a fresh copy in the patch is what a fresh build would have.
const NEVER_CORRELATED: &[&str] = &[
    "__already_done",
    "__warned",
    "__func__",
    "__FUNCTION__",
    "__key",
    "_rs",
    "descriptor",
    "CSWTCH",
    "__print_once",
    "__UNIQUE_ID_",
    "__compound_literal",
];

/// Tables whose entries describe code: the section, the relocations per entry.
const TABLES: &[(&str, usize)] = &[
    ("__ex_table", 2),
    ("__bug_table", 2),
    (".altinstructions", 2),
    (".discard.reachable", 1),
    (".discard.unreachable", 1),
    (".discard.retpoline_safe", 1),
    (".discard.instr_begin", 1),
    (".discard.instr_end", 1),
    (".discard.intra_function_calls", 1),
    (".discard.annotate_insn", 1),
    (".discard.func_stack_frame_non_standard", 1),
];

/// Tables a patch cannot carry: an entry about a carried function refuses the build.
const REFUSED_TABLES: &[(&str, &str)] = &[
    (
        "__jump_table",
        "a static branch the kernel would have to patch in the patch's code",
    ),
    (
        ".parainstructions",
        "a paravirt call site the kernel would have to patch",
    ),
];
// Not refused: `.static_call_sites` (objtool's list of calls to static call trampolines).
// Carried code keeps calling the kernel's `__SCT__*` trampoline, which the kernel keeps
// pointing at the current target; objtool lists the calls again in the patch object,
// and the loader ignores that list (kp-format.md).

/// `foo.isra.0` → `foo.isra`, `count.12` → `count`, `__UNIQUE_ID_ddebug123` →
/// `__UNIQUE_ID_ddebug`: a name without the numbers gcc and the preprocessor hand out.
pub fn base_name(name: &str) -> String {
    let mut parts = name.split('.');
    let first = parts.next().unwrap_or("");
    let first = if first.starts_with("__UNIQUE_ID_") {
        first.trim_end_matches(|c: char| c.is_ascii_digit())
    } else {
        first
    };
    std::iter::once(first)
        .chain(parts.filter(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())))
        .collect::<Vec<_>>()
        .join(".")
}

fn never_correlated(name: &str) -> bool {
    let b = base_name(name);
    NEVER_CORRELATED.iter().any(|p| b.starts_with(p)) || name.starts_with(".L")
}

/// What a reference reaches, comparable across the two objects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reached {
    /// A named symbol (without its numbers) and the offset from it.
    Symbol(String, i64),
    /// A string, by its text, and the offset from its start.
    Str(Vec<u8>, i64),
    /// Unnamed data (a constant pool, a table): the section's name and bytes, and the place.
    Anon(String, Vec<u8>, i64),
}

fn reached(o: &ObjFile, r: &Reloc) -> Reached {
    let s = &o.symbols[r.symbol];
    let Some(p) = o.target(r) else {
        return Reached::Symbol(base_name(&s.name), r.addend);
    };
    if s.kind != SymKind::Section {
        return Reached::Symbol(base_name(&s.name), r.addend);
    }
    if o.is_strings(p.section) {
        let b = &o.sections[p.section].bytes;
        let at = (p.offset as usize).min(b.len());
        let start = b[..at].iter().rposition(|&c| c == 0).map_or(0, |i| i + 1);
        let end = b[at..]
            .iter()
            .position(|&c| c == 0)
            .map_or(b.len(), |i| at + i);
        return Reached::Str(
            b[start..end].to_vec(),
            r.addend + s.value as i64 - start as i64,
        );
    }
    match o.symbol_at(p) {
        Some(i) => Reached::Symbol(
            base_name(&o.symbols[i].name),
            r.addend + s.value as i64 - o.symbols[i].value as i64,
        ),
        None => Reached::Anon(
            base_name(&o.sections[p.section].name),
            o.sections[p.section].bytes.clone(),
            r.addend,
        ),
    }
}

/// Whether symbol `a` of `after` has the same bytes and the same references as `b` of
/// `before`.
fn same(after: &ObjFile, a: usize, before: &ObjFile, b: usize) -> bool {
    let (sa, sb) = (&after.symbols[a], &before.symbols[b]);
    let (Some(xa), Some(xb)) = (sa.section, sb.section) else {
        return false;
    };
    if sa.size != sb.size || after.sections[xa].nobits != before.sections[xb].nobits {
        return false;
    }
    let bytes = |o: &ObjFile, x: usize, v: u64, n: u64| -> Vec<u8> {
        o.sections[x]
            .bytes
            .get(v as usize..(v + n) as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    };
    if bytes(after, xa, sa.value, sa.size) != bytes(before, xb, sb.value, sb.size) {
        return false;
    }
    let ra: Vec<_> = after.relocs_in(xa, sa.value, sa.size.max(1)).collect();
    let rb: Vec<_> = before.relocs_in(xb, sb.value, sb.size.max(1)).collect();
    ra.len() == rb.len()
        && ra.iter().zip(&rb).all(|(x, y)| {
            x.offset - sa.value == y.offset - sb.value
                && x.r_type == y.r_type
                && reached(after, x) == reached(before, y)
        })
}

/// The twin in `before` of each function and variable of `after`: the one of the same
/// name, numbers aside; for a name several have (a static of that name in several
/// functions), the one the twin of a function using it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Twin {
    Is(usize),
    None,
    /// Several of the release's statics have this name; none is known to be it.
    Ambiguous,
}

pub struct Correlation {
    pub twins: BTreeMap<usize, Twin>,
}

fn named(o: &ObjFile) -> impl Iterator<Item = usize> + '_ {
    o.symbols.iter().enumerate().filter_map(|(i, s)| {
        (s.section.is_some()
            && matches!(s.kind, SymKind::Func | SymKind::Object)
            && !s.name.is_empty())
        .then_some(i)
    })
}

pub fn correlate(after: &ObjFile, before: &ObjFile) -> Correlation {
    let mut exact: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut by_base: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for i in named(before) {
        exact.entry(&before.symbols[i].name).or_default().push(i);
        by_base
            .entry(base_name(&before.symbols[i].name))
            .or_default()
            .push(i);
    }
    let mut twins = BTreeMap::new();
    let mut pending = Vec::new();
    for a in named(after) {
        let s = &after.symbols[a];
        let base = base_name(&s.name);
        // A numbered name (`count.3`) is matched without its number, which a change may
        // shift: the same number can be another function's static on the other side.
        let candidates = if base == s.name {
            exact.get(s.name.as_str())
        } else {
            by_base.get(&base)
        };
        let twin = match candidates.map(Vec::as_slice) {
            Some([one]) => Twin::Is(*one),
            None | Some([]) => Twin::None,
            Some(_) => {
                pending.push(a);
                Twin::Ambiguous
            }
        };
        twins.insert(a, twin);
    }
    for a in pending {
        let twin = twin_through_users(after, before, &twins, a);
        twins.insert(a, twin);
    }
    Correlation { twins }
}

/// For a static several functions have (`count` in two of them): the one the twin of a
/// function using it uses; none (a new static) when no function using it had one, or
/// every such function is new; ambiguous otherwise.
fn twin_through_users(
    after: &ObjFile,
    before: &ObjFile,
    twins: &BTreeMap<usize, Twin>,
    a: usize,
) -> Twin {
    let base = base_name(&after.symbols[a].name);
    let mut ambiguous = false;
    for user in users_of(after, a) {
        let Some(Twin::Is(bu)) = twins.get(&user).copied() else {
            continue;
        };
        let t = &before.symbols[bu];
        let Some(sec) = t.section else { continue };
        let found: BTreeSet<usize> = before
            .relocs_in(sec, t.value, t.size.max(1))
            .filter_map(|r| {
                let i = match before.symbols[r.symbol].kind {
                    SymKind::Section => before.symbol_at(before.target(r)?)?,
                    _ => r.symbol,
                };
                (base_name(&before.symbols[i].name) == base).then_some(i)
            })
            .collect();
        match found.len() {
            0 => {}
            1 => return Twin::Is(found.into_iter().next().expect("one")),
            _ => ambiguous = true,
        }
    }
    if ambiguous {
        Twin::Ambiguous
    } else {
        Twin::None
    }
}

/// The functions of `after` that differ from their twins or have none.
fn differing(after: &ObjFile, before: &ObjFile, c: &Correlation) -> Vec<(usize, Reason)> {
    let mut out = Vec::new();
    for (&a, twin) in &c.twins {
        let s = &after.symbols[a];
        if s.kind != SymKind::Func || !s.section.is_some_and(|x| after.is_text(x)) {
            continue;
        }
        match *twin {
            Twin::Is(b) if same(after, a, before, b) => {}
            Twin::Is(_) | Twin::Ambiguous => out.push((a, Reason::Changed)),
            Twin::None => out.push((a, Reason::New)),
        }
    }
    out
}

/// Whether a function starts with an fentry call (within its first 16 bytes, after an
/// `endbr64`): what the kernel redirects.
fn has_fentry(o: &ObjFile, f: usize) -> bool {
    let s = &o.symbols[f];
    s.section.is_some_and(|x| {
        o.relocs_in(x, s.value, 16)
            .any(|r| o.symbols[r.symbol].name == "__fentry__")
    })
}

/// The functions of `o` that refer to function `f`.
fn users_of(o: &ObjFile, f: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, s) in o.symbols.iter().enumerate() {
        let (SymKind::Func, Some(x)) = (s.kind, s.section) else {
            continue;
        };
        if i != f
            && o.relocs_in(x, s.value, s.size.max(1))
                .any(|r| r.symbol == f || o.target(r).and_then(|p| o.symbol_at(p)) == Some(f))
        {
            out.push(i);
        }
    }
    out
}

/// The functions the patch carries, each once, with why: the differing ones, the users
/// of a differing one that has no entry to redirect, and the `.cold` part of each.
pub fn carried(
    after: &ObjFile,
    before: &ObjFile,
    c: &Correlation,
) -> Result<Vec<Carried>, DiffBuildError> {
    // First in, first out: a function's own change is its reason before a use is.
    let mut todo: std::collections::VecDeque<(usize, Reason)> = differing(after, before, c).into();
    let mut done: BTreeMap<usize, Carried> = BTreeMap::new();
    while let Some((f, reason)) = todo.pop_front() {
        if done.contains_key(&f) {
            continue;
        }
        let name = after.symbols[f].name.clone();
        let reason = match cold_parent(&name) {
            Some(parent) => Reason::ColdPartOf(parent),
            None => reason,
        };
        check_section(after, f)?;
        let redirectable = has_fentry(after, f) && !name.contains(".cold");
        let replaces = match (c.twins.get(&f), redirectable) {
            (Some(Twin::Is(b)), true) => Some(before.symbols[*b].name.clone()),
            (Some(Twin::Ambiguous), true) => {
                return Err(DiffBuildError::Refused(format!(
                    "{name} changed, and the release has several functions of that name: \
                     lpvmm cannot tell which one it is"
                )))
            }
            _ => None,
        };
        if replaces.is_none() && reason != Reason::New && !matches!(reason, Reason::ColdPartOf(_)) {
            let users = users_of(after, f);
            if users.is_empty() {
                return Err(DiffBuildError::Refused(format!(
                    "{name} changed but has no fentry call, so the kernel cannot redirect \
                     it, and no function of the file uses it"
                )));
            }
            todo.extend(users.into_iter().map(|u| (u, Reason::Uses(name.clone()))));
        }
        let cold = format!("{name}.cold");
        for (i, s) in after.symbols.iter().enumerate() {
            if s.kind == SymKind::Func && base_name(&s.name) == base_name(&cold) {
                todo.push_back((i, Reason::ColdPartOf(name.clone())));
            }
        }
        done.insert(
            f,
            Carried {
                symbol: f,
                name,
                replaces,
                reason,
            },
        );
    }
    Ok(done.into_values().collect())
}

/// `foo` of `foo.cold` (and of `foo.isra.0.cold`, `foo.cold.12`).
fn cold_parent(name: &str) -> Option<String> {
    let at = name.find(".cold")?;
    Some(name[..at].to_string())
}

/// Refuse a function in init or exit code: it ran at boot (or runs at unload) from
/// memory the kernel frees or never patches.
fn check_section(o: &ObjFile, f: usize) -> Result<(), DiffBuildError> {
    let s = &o.symbols[f];
    let sec = &o.sections[s.section.unwrap_or(0)].name;
    if sec.starts_with(".init") || sec.starts_with(".exit") || sec.starts_with(".head") {
        return Err(DiffBuildError::Refused(format!(
            "{} changed, and it is init or exit code (section {sec}): it runs once, at \
             boot or load, or at unload; a live patch cannot change it",
            s.name
        )));
    }
    Ok(())
}

/// Refuse a variable the running kernel has whose initial value the change changed: a
/// live patch cannot give the running kernel's copy its new value.
pub fn check_data(
    after: &ObjFile,
    before: &ObjFile,
    c: &Correlation,
) -> Result<(), DiffBuildError> {
    for (&a, twin) in &c.twins {
        let s = &after.symbols[a];
        let Twin::Is(b) = *twin else { continue };
        if s.kind != SymKind::Object || never_correlated(&s.name) {
            continue;
        }
        if !same(after, a, before, b) {
            let sec = &after.sections[s.section.unwrap_or(0)].name;
            return Err(DiffBuildError::Refused(format!(
                "the change gives {} (in {sec}) another initial value or size: a live patch \
                 changes functions, not the running kernel's data",
                s.name
            )));
        }
    }
    Ok(())
}

/// The plan: the carried functions' sections, then everything they reach that the
/// patch must have itself, and the table entries about them, until nothing is added.
pub fn plan(
    after: &ObjFile,
    before: &ObjFile,
    c: &Correlation,
    carried: Vec<Carried>,
) -> Result<Plan, DiffBuildError> {
    let mut p = Plan {
        sections: carried
            .iter()
            .filter_map(|f| after.symbols[f.symbol].section)
            .collect(),
        carried,
        ..Plan::default()
    };
    loop {
        let before_len = p.sections.len();
        for x in p.sections.clone() {
            for r in &after.sections[x].relocs {
                reach(after, before, c, r, &mut p)?;
            }
        }
        p.tables = cut_tables(after, &p.sections)?;
        for t in p.tables.clone() {
            for r in table_relocs(after, &t) {
                reach(after, before, c, r, &mut p)?;
            }
        }
        if p.tables
            .iter()
            .any(|t| after.sections[t.section].name == ".altinstructions")
        {
            for (i, s) in after.sections.iter().enumerate() {
                if s.name.starts_with(".altinstr_replacement") || s.name == ".altinstr_aux" {
                    p.sections.insert(i);
                }
            }
        }
        if p.sections.len() == before_len {
            return Ok(p);
        }
    }
}

/// Decide one reference of kept code: into a kept section (nothing to do), to a
/// section the patch must copy, or to the running kernel's symbol.
fn reach(
    after: &ObjFile,
    before: &ObjFile,
    c: &Correlation,
    r: &Reloc,
    p: &mut Plan,
) -> Result<(), DiffBuildError> {
    let s = &after.symbols[r.symbol];
    let Some(place) = after.target(r) else {
        return Ok(()); // undefined: the kernel's, by its name
    };
    if p.sections.contains(&place.section) {
        return Ok(());
    }
    let Some(sym) = (match s.kind {
        SymKind::Section => after.symbol_at(place),
        _ => Some(r.symbol),
    }) else {
        // Unnamed data (strings, constants): the patch's own copy.
        if !after.is_text(place.section) {
            p.sections.insert(place.section);
            return Ok(());
        }
        return Err(unnamed_code(after, place));
    };
    let name = &after.symbols[sym].name;
    if never_correlated(name) && !after.is_text(place.section) {
        p.sections.insert(place.section);
        return Ok(());
    }
    match c.twins.get(&sym).copied().unwrap_or(Twin::None) {
        Twin::Is(b) => {
            p.external.insert(sym, before.symbols[b].name.clone());
        }
        Twin::None => {
            // New in the change: the patch's own (a new function is carried too).
            p.sections.insert(place.section);
            if after.symbols[sym].kind == SymKind::Func
                && !p.carried.iter().any(|f| f.symbol == sym)
            {
                p.carried.push(Carried {
                    symbol: sym,
                    name: name.clone(),
                    replaces: None,
                    reason: Reason::New,
                });
            }
        }
        Twin::Ambiguous => {
            return Err(DiffBuildError::Refused(format!(
                "the patch uses {name}, and the release has several of that name: lpvmm \
                 cannot tell which one is this file's"
            )))
        }
    }
    Ok(())
}

fn unnamed_code(o: &ObjFile, p: Place) -> DiffBuildError {
    DiffBuildError::Refused(format!(
        "the patch jumps into {}+{:#x}, code of no function",
        o.sections[p.section].name, p.offset
    ))
}

/// The entries of each table that are about kept code, and a refusal for a table a
/// patch cannot carry.
fn cut_tables(o: &ObjFile, kept: &BTreeSet<usize>) -> Result<Vec<TableCut>, DiffBuildError> {
    let mut out = Vec::new();
    for (i, s) in o.sections.iter().enumerate() {
        let about_kept = |r: &Reloc| {
            o.target(r)
                .is_some_and(|p| kept.contains(&p.section) && o.is_text(p.section))
        };
        if let Some((_, why)) = REFUSED_TABLES.iter().find(|(n, _)| *n == s.name) {
            if let Some(r) = s.relocs.iter().find(|r| about_kept(r)) {
                let f = o
                    .target(r)
                    .and_then(|p| o.symbol_at(p))
                    .map(|f| o.symbols[f].name.clone());
                return Err(DiffBuildError::Refused(format!(
                    "{} has {why} ({} entry)",
                    f.unwrap_or_else(|| "the patch".into()),
                    s.name
                )));
            }
            continue;
        }
        let Some(&(_, per_entry)) = TABLES.iter().find(|(n, _)| *n == s.name) else {
            continue;
        };
        let Some(entry_size) = entry_size(s, per_entry) else {
            return Err(DiffBuildError::Object(format!(
                "{}: cannot tell its entry size ({} bytes, {} relocations)",
                s.name,
                s.size,
                s.relocs.len()
            )));
        };
        let entries: Vec<u64> = s
            .relocs
            .iter()
            .filter(|r| r.offset.is_multiple_of(entry_size) && about_kept(r))
            .map(|r| r.offset / entry_size)
            .collect();
        if !entries.is_empty() {
            out.push(TableCut {
                section: i,
                entry_size,
                entries,
            });
        }
    }
    Ok(out)
}

/// A table's entry size: the distance between the first relocations of two entries
/// (`per_entry` relocations each), or the whole table for one entry.
fn entry_size(s: &super::objfile::Section, per_entry: usize) -> Option<u64> {
    let n = s.relocs.len();
    if n == 0 || !n.is_multiple_of(per_entry) {
        return None;
    }
    let size = if n == per_entry {
        s.size
    } else {
        s.relocs[per_entry].offset - s.relocs[0].offset
    };
    (size > 0 && s.size.is_multiple_of(size) && s.size / size == (n / per_entry) as u64)
        .then_some(size)
}

/// The relocations of a table's kept entries.
pub fn table_relocs<'o>(o: &'o ObjFile, t: &'o TableCut) -> impl Iterator<Item = &'o Reloc> {
    o.sections[t.section]
        .relocs
        .iter()
        .filter(move |r| t.entries.contains(&(r.offset / t.entry_size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_the_numbers_gcc_and_the_preprocessor_give_them() {
        assert_eq!(base_name("foo.isra.0"), "foo.isra");
        assert_eq!(base_name("foo.constprop.0.isra.0"), "foo.constprop.isra");
        assert_eq!(base_name("count.12"), "count");
        assert_eq!(base_name("__UNIQUE_ID_ddebug123"), "__UNIQUE_ID_ddebug");
        assert_eq!(base_name("cmdline_proc_show"), "cmdline_proc_show");
        assert_eq!(base_name("x86_64_start"), "x86_64_start");
        assert!(never_correlated("__already_done.3"));
        assert!(never_correlated("__func__.0"));
        assert!(!never_correlated("count.3"));
    }
}

//! The data layouts and prototypes a diff must not change, read from the debug info of
//! the objects built before and after (Debian builds its kernels with DWARF): a struct or
//! union whose size or member offsets the change moves would have the new code read the
//! running kernel's objects, laid out the old way, at the wrong places; a global
//! function whose parameters or return type change would be called by the rest of the
//! kernel (other objects, which the patch does not carry) the old way.

use std::collections::{BTreeMap, BTreeSet};

use object::{Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget};

use super::DiffBuildError;

/// A struct's or union's layout: its size and each member's name and byte offset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Layout {
    pub size: u64,
    pub members: Vec<(String, u64)>,
}

/// Refuse a change that lays out any named struct or union the two objects share
/// differently.
pub fn check(before: &Debug, after: &Debug, path: &str) -> Result<(), DiffBuildError> {
    let (b, a) = (layouts(before)?, layouts(after)?);
    for (name, now) in &a {
        let Some(was) = b.get(name) else { continue };
        if was != now {
            return Err(DiffBuildError::Refused(format!(
                "{path}: the change lays out {name} differently ({}): the running kernel's \
                 objects keep the old layout, and a live patch cannot change data layouts",
                difference(was, now)
            )));
        }
    }
    Ok(())
}

/// Refuse a change to the prototype of a function other objects can call (a global
/// one the file defines).
pub fn check_prototypes(before: &Debug, after: &Debug, path: &str) -> Result<(), DiffBuildError> {
    let (b, a) = (prototypes(before)?, prototypes(after)?);
    for (name, now) in &a {
        match b.get(name) {
            Some(was) if was != now => {
                return Err(DiffBuildError::Refused(format!(
                    "{path}: the change makes global function {name} `{now}`, it was `{was}`: \
                     its callers in the rest of the kernel would call it the old way"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every global function the object defines: name → `return(parameter, ...)`, types as
/// the debug info names them.
pub fn prototypes(debug: &Debug) -> Result<BTreeMap<String, String>, DiffBuildError> {
    let mut out = BTreeMap::new();
    debug.each_unit(|dwarf, unit| {
        let mut cursor = unit.entries();
        while let Some((_, e)) = cursor.next_dfs()? {
            let global = matches!(
                e.attr_value(gimli::DW_AT_external)?,
                Some(gimli::AttributeValue::Flag(true))
            );
            let declaration = e.attr_value(gimli::DW_AT_declaration)?.is_some();
            if e.tag() != gimli::DW_TAG_subprogram || !global || declaration {
                continue;
            }
            if let Some(name) = attr_string(dwarf, unit, e, gimli::DW_AT_name)? {
                let proto = prototype(dwarf, unit, e.offset())?;
                out.entry(name).or_insert(proto);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// `return(parameter, ...)` of the subprogram at `at`.
fn prototype(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    at: gimli::UnitOffset,
) -> Result<String, gimli::Error> {
    let mut tree = unit.entries_tree(Some(at))?;
    let root = tree.root()?;
    let ret = type_name(dwarf, unit, root.entry(), 0)?;
    let mut params = Vec::new();
    let mut children = root.children();
    while let Some(child) = children.next()? {
        match child.entry().tag() {
            gimli::DW_TAG_formal_parameter => {
                params.push(type_name(dwarf, unit, child.entry(), 0)?)
            }
            gimli::DW_TAG_unspecified_parameters => params.push("...".into()),
            _ => {}
        }
    }
    Ok(format!("{ret}({})", params.join(", ")))
}

/// The name of the type an entry's `DW_AT_type` points at (`void` without one).
fn type_name(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    e: &gimli::DebuggingInformationEntry<'_, '_, Reader<'_>>,
    depth: u32,
) -> Result<String, gimli::Error> {
    let Some(gimli::AttributeValue::UnitRef(off)) = e.attr_value(gimli::DW_AT_type)? else {
        return Ok("void".into());
    };
    let t = unit.entry(off)?;
    let name = attr_string(dwarf, unit, &t, gimli::DW_AT_name)?;
    if depth > 8 {
        return Ok("...".into());
    }
    let inner = |d| type_name(dwarf, unit, &t, d);
    Ok(match t.tag() {
        gimli::DW_TAG_pointer_type => format!("{}*", inner(depth + 1)?),
        gimli::DW_TAG_const_type => format!("const {}", inner(depth + 1)?),
        gimli::DW_TAG_volatile_type => format!("volatile {}", inner(depth + 1)?),
        gimli::DW_TAG_array_type => format!("{}[]", inner(depth + 1)?),
        gimli::DW_TAG_structure_type => format!("struct {}", name.unwrap_or_default()),
        gimli::DW_TAG_union_type => format!("union {}", name.unwrap_or_default()),
        gimli::DW_TAG_enumeration_type => format!("enum {}", name.unwrap_or_default()),
        gimli::DW_TAG_subroutine_type => "fn".into(),
        _ => name.unwrap_or_else(|| "?".into()),
    })
}

/// One line on how two sets of layouts of a name differ: its size, else the first
/// member that moved, else one that came or went.
fn difference(was: &BTreeSet<Layout>, now: &BTreeSet<Layout>) -> String {
    let (Some(w), Some(n)) = (was.iter().next(), now.iter().next()) else {
        return "a layout added or removed".into();
    };
    if w.size != n.size {
        return format!("size {} → {} bytes", w.size, n.size);
    }
    let offset = |l: &Layout, m: &str| l.members.iter().find(|(x, _)| x == m).map(|(_, o)| *o);
    for (m, off) in &w.members {
        match offset(n, m) {
            Some(o) if o != *off => return format!("member {m} at {off} → {o}"),
            None => return format!("member {m} removed"),
            _ => {}
        }
    }
    match n.members.iter().find(|(m, _)| offset(w, m).is_none()) {
        Some((m, o)) => format!("new member {m} at {o}"),
        None => "members changed".into(),
    }
}

/// Every named struct and union the object's debug info defines: `struct foo` → its
/// layouts (a set: the same tag may be defined in several scopes).
pub fn layouts(debug: &Debug) -> Result<BTreeMap<String, BTreeSet<Layout>>, DiffBuildError> {
    let mut out: BTreeMap<String, BTreeSet<Layout>> = BTreeMap::new();
    debug.each_unit(|dwarf, unit| collect(dwarf, unit, &mut out))?;
    Ok(out)
}

/// An object's debug info, its relocations applied, read once for every check of it.
pub struct Debug {
    sections: gimli::DwarfSections<Vec<u8>>,
}

impl Debug {
    pub fn load(bytes: &[u8]) -> Result<Debug, DiffBuildError> {
        let file = object::File::parse(bytes).map_err(|e| bad(e.to_string()))?;
        let sections = gimli::DwarfSections::load(|id| -> Result<Vec<u8>, gimli::Error> {
            Ok(relocated(&file, id.name()))
        })
        .map_err(|e| bad(e.to_string()))?;
        Ok(Debug { sections })
    }

    /// Run `f` over each unit.
    pub(super) fn each_unit(
        &self,
        mut f: impl FnMut(
            &gimli::Dwarf<Reader<'_>>,
            &gimli::Unit<Reader<'_>>,
        ) -> Result<(), gimli::Error>,
    ) -> Result<(), DiffBuildError> {
        let dwarf = self
            .sections
            .borrow(|s| gimli::EndianSlice::new(s, gimli::LittleEndian));
        let mut units = dwarf.units();
        let mut walk = || -> Result<(), gimli::Error> {
            while let Some(header) = units.next()? {
                f(&dwarf, &dwarf.unit(header)?)?;
            }
            Ok(())
        };
        walk().map_err(|e| bad(e.to_string()))
    }
}

fn bad(e: String) -> DiffBuildError {
    DiffBuildError::Object(format!("reading debug info: {e}"))
}

pub(super) type Reader<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

/// The named structs and unions of one unit, depth-first: a struct is open from its
/// entry until the walk climbs back to its depth; its members are its direct children.
fn collect(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    out: &mut BTreeMap<String, BTreeSet<Layout>>,
) -> Result<(), gimli::Error> {
    let mut cursor = unit.entries();
    let mut depth: isize = 0;
    let mut open: Vec<(isize, String, Layout)> = Vec::new();
    while let Some((delta, e)) = cursor.next_dfs()? {
        depth += delta;
        while open.last().is_some_and(|(d, ..)| *d >= depth) {
            let (_, name, layout) = open.pop().expect("checked");
            out.entry(name).or_default().insert(layout);
        }
        let kind = match e.tag() {
            gimli::DW_TAG_structure_type => "struct",
            gimli::DW_TAG_union_type => "union",
            gimli::DW_TAG_member => {
                if let Some((d, _, layout)) = open.last_mut() {
                    if *d == depth - 1 {
                        let name = attr_string(dwarf, unit, e, gimli::DW_AT_name)?;
                        layout
                            .members
                            .push((name.unwrap_or_default(), member_offset(e)?));
                    }
                }
                continue;
            }
            _ => continue,
        };
        let name = attr_string(dwarf, unit, e, gimli::DW_AT_name)?;
        let size = e
            .attr_value(gimli::DW_AT_byte_size)?
            .and_then(|v| v.udata_value());
        if let (Some(name), Some(size)) = (name, size) {
            let layout = Layout {
                size,
                members: Vec::new(),
            };
            open.push((depth, format!("{kind} {name}"), layout));
        }
    }
    for (_, name, layout) in open {
        out.entry(name).or_default().insert(layout);
    }
    Ok(())
}

/// A member's offset in bytes (or in bits, for a bit field given so).
fn member_offset(
    e: &gimli::DebuggingInformationEntry<'_, '_, Reader<'_>>,
) -> Result<u64, gimli::Error> {
    let bytes = e
        .attr_value(gimli::DW_AT_data_member_location)?
        .and_then(|v| v.udata_value());
    let bits = e
        .attr_value(gimli::DW_AT_data_bit_offset)?
        .and_then(|v| v.udata_value());
    Ok(bytes.or(bits).unwrap_or(0))
}

pub(super) fn attr_string(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    e: &gimli::DebuggingInformationEntry<'_, '_, Reader<'_>>,
    at: gimli::DwAt,
) -> Result<Option<String>, gimli::Error> {
    match e.attr_value(at)? {
        Some(v) => Ok(Some(
            dwarf.attr_string(unit, v)?.to_string_lossy().into_owned(),
        )),
        None => Ok(None),
    }
}

/// A debug section's bytes with its relocations applied (in an object file they are
/// still relocations: string and unit offsets live in the addends).
fn relocated(file: &object::File<'_>, name: &str) -> Vec<u8> {
    let Some(s) = file.section_by_name(name) else {
        return Vec::new();
    };
    let mut data = s.data().map(<[u8]>::to_vec).unwrap_or_default();
    for (offset, r) in s.relocations() {
        let (RelocationTarget::Symbol(sym), RelocationFlags::Elf { r_type }) =
            (r.target(), r.flags())
        else {
            continue;
        };
        let base = file.symbol_by_index(sym).map(|s| s.address()).unwrap_or(0);
        let value = (base as i64).wrapping_add(r.addend()) as u64;
        let at = offset as usize;
        match r_type {
            1 if at + 8 <= data.len() => data[at..at + 8].copy_from_slice(&value.to_le_bytes()),
            10 | 11 if at + 4 <= data.len() => {
                data[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes())
            }
            _ => {}
        }
    }
    data
}

//! Why each function is in a diff-built patch, for the report `kp inspect` shows: the
//! diff touched its source, or it inlines a function whose source the diff touched (the
//! "before" object's debug info names what each function inlines), or neither: its code
//! changed all the same (a constant, a layout of code the compiler chose anew).

use std::collections::{BTreeMap, BTreeSet};

use super::layout::{attr_string, Debug, Reader};
use super::unidiff::{FileDiff, Line};
use super::DiffBuildError;

/// A function as the debug info has it: where it starts in which file, and what it
/// inlines.
#[derive(Debug, Default, Clone)]
pub struct Function {
    pub file: String,
    pub line: u64,
    pub inlines: BTreeSet<String>,
}

/// The old-file line numbers a diff changes (removed lines; where only lines are
/// added, the line they are added before).
pub fn changed_lines(diff: &FileDiff) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for h in &diff.hunks {
        let mut line = h.old_start.max(1) as u64;
        for l in &h.lines {
            match l {
                Line::Context(_) => line += 1,
                Line::Removed(_) => {
                    out.insert(line);
                    line += 1;
                }
                Line::Added(_) => {
                    out.insert(line);
                }
            }
        }
    }
    out
}

/// The functions defined in `path` whose lines include a changed one: each function
/// reaches from its first line to the next function's.
pub fn touched(
    functions: &BTreeMap<String, Function>,
    path: &str,
    lines: &BTreeSet<u64>,
) -> BTreeSet<String> {
    let base = path.rsplit('/').next().unwrap_or(path);
    let mut starts: Vec<(u64, &str)> = functions
        .iter()
        .filter(|(_, f)| f.file.rsplit('/').next() == Some(base))
        .map(|(n, f)| (f.line, n.as_str()))
        .collect();
    starts.sort();
    let mut out = BTreeSet::new();
    for &l in lines {
        if let Some((_, name)) = starts.iter().rev().find(|(start, _)| *start <= l) {
            out.insert(name.to_string());
        }
    }
    out
}

/// Every function the object's debug info defines, by name.
pub fn functions(debug: &Debug) -> Result<BTreeMap<String, Function>, DiffBuildError> {
    let mut out = BTreeMap::new();
    debug.each_unit(|dwarf, unit| collect(dwarf, unit, &mut out))?;
    Ok(out)
}

/// The subprograms of one unit, each with the inlined calls below it.
fn collect(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    out: &mut BTreeMap<String, Function>,
) -> Result<(), gimli::Error> {
    let mut cursor = unit.entries();
    let mut depth: isize = 0;
    let mut open: Option<(isize, String)> = None;
    while let Some((delta, e)) = cursor.next_dfs()? {
        depth += delta;
        if open.as_ref().is_some_and(|(d, _)| *d >= depth) {
            open = None;
        }
        match e.tag() {
            gimli::DW_TAG_subprogram if open.is_none() => {
                let Some(name) = name_of(dwarf, unit, e)? else {
                    continue;
                };
                let f = out.entry(name.clone()).or_default();
                if let Some(line) = e
                    .attr_value(gimli::DW_AT_decl_line)?
                    .and_then(|v| v.udata_value())
                {
                    f.line = line;
                    f.file = decl_file(dwarf, unit, e)?.unwrap_or_default();
                }
                open = Some((depth, name));
            }
            gimli::DW_TAG_inlined_subroutine => {
                if let (Some((_, outer)), Some(inner)) = (&open, name_of(dwarf, unit, e)?) {
                    out.entry(outer.clone()).or_default().inlines.insert(inner);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A DIE's name, or its abstract origin's (an out-of-line or inlined instance).
fn name_of(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    e: &gimli::DebuggingInformationEntry<'_, '_, Reader<'_>>,
) -> Result<Option<String>, gimli::Error> {
    if let Some(n) = attr_string(dwarf, unit, e, gimli::DW_AT_name)? {
        return Ok(Some(n));
    }
    for at in [gimli::DW_AT_abstract_origin, gimli::DW_AT_specification] {
        if let Some(gimli::AttributeValue::UnitRef(off)) = e.attr_value(at)? {
            let origin = unit.entry(off)?;
            if let Some(n) = attr_string(dwarf, unit, &origin, gimli::DW_AT_name)? {
                return Ok(Some(n));
            }
        }
    }
    Ok(None)
}

/// The file a DIE's `DW_AT_decl_file` names, from the unit's line program.
fn decl_file(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    e: &gimli::DebuggingInformationEntry<'_, '_, Reader<'_>>,
) -> Result<Option<String>, gimli::Error> {
    let index = match e.attr_value(gimli::DW_AT_decl_file)? {
        Some(gimli::AttributeValue::FileIndex(i)) => Some(i),
        Some(v) => v.udata_value(),
        None => None,
    };
    let (Some(index), Some(program)) = (index, unit.line_program.as_ref()) else {
        return Ok(None);
    };
    let Some(file) = program.header().file(index) else {
        return Ok(None);
    };
    let name = dwarf.attr_string(unit, file.path_name())?;
    Ok(Some(name.to_string_lossy().into_owned()))
}

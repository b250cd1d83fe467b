//! A livepatch module's parameters (`module_param`, the `__param` section), given on
//! lpvmm's command line as on insmod's (`pre_patch_ret=-19`): each value is written into
//! the module's own variable before the module is linked, so its code never sees
//! another. Numbers and booleans are supported (the kinds samples and selftests use);
//! a string parameter, which the kernel would allocate, is refused, as is a name the
//! module does not declare.

use std::collections::HashMap;

use introspection::layout::KlpLayout;
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolSection};

use crate::load::object::{Place, Section, SectionKind};
use crate::ParseError;

/// At most this many parameters (a bound on hostile input).
const MAX_PARAMS: u64 = 4096;

/// How a parameter's value is stored (the kernel's `param_ops_*` it uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Int { bytes: usize, signed: bool },
    Bool,
}

impl Kind {
    fn of_ops(ops: &str) -> Option<Kind> {
        Some(match ops {
            "param_ops_byte" => Kind::Int {
                bytes: 1,
                signed: false,
            },
            "param_ops_short" => Kind::Int {
                bytes: 2,
                signed: true,
            },
            "param_ops_ushort" => Kind::Int {
                bytes: 2,
                signed: false,
            },
            "param_ops_int" => Kind::Int {
                bytes: 4,
                signed: true,
            },
            "param_ops_uint" | "param_ops_hexint" => Kind::Int {
                bytes: 4,
                signed: false,
            },
            "param_ops_long" => Kind::Int {
                bytes: 8,
                signed: true,
            },
            "param_ops_ulong" => Kind::Int {
                bytes: 8,
                signed: false,
            },
            "param_ops_bool" | "param_ops_bool_enable_only" => Kind::Bool,
            _ => return None,
        })
    }

    /// `value` as the variable's bytes.
    fn encode(self, value: &str) -> Option<Vec<u8>> {
        match self {
            Kind::Bool => match value {
                "1" | "y" | "Y" | "true" | "on" => Some(vec![1]),
                "0" | "n" | "N" | "false" | "off" => Some(vec![0]),
                _ => None,
            },
            Kind::Int { bytes, signed } => {
                let v: i128 = match value.strip_prefix("0x") {
                    Some(hex) => i128::from_str_radix(hex, 16).ok()?,
                    None => value.parse().ok()?,
                };
                let bits = 8 * bytes as u32;
                let (lo, hi) = match signed {
                    true => (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1),
                    false => (0, (1i128 << bits) - 1),
                };
                (lo..=hi)
                    .contains(&v)
                    .then(|| (v as u128).to_le_bytes()[..bytes].to_vec())
            }
        }
    }
}

/// One `struct kernel_param`: its name, how its value is stored, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    kind: Option<Kind>,
    ops: String,
    var: Option<Place>,
}

fn bad(m: String) -> ParseError {
    ParseError::Manifest(format!("module parameter: {m}"))
}

/// The module's parameters, from `__param` and its relocations.
pub fn read(
    file: &object::File,
    index_of: &HashMap<object::SectionIndex, usize>,
    sections: &[Section],
    klp: &KlpLayout,
) -> Result<Vec<Param>, ParseError> {
    let Some(sec) = file.section_by_name("__param") else {
        return Ok(Vec::new());
    };
    let n = sec.size() / klp.param_size.max(1);
    if n > MAX_PARAMS {
        return Err(bad(format!("{n} entries in __param; at most {MAX_PARAMS}")));
    }
    let mut fields: HashMap<u64, (String, u64, Option<Place>)> = HashMap::new();
    for (offset, r) in sec.relocations() {
        let RelocationTarget::Symbol(si) = r.target() else {
            continue;
        };
        let sym = file.symbol_by_index(si).map_err(|e| bad(e.to_string()))?;
        let place = match sym.section() {
            SymbolSection::Section(i) => index_of.get(&i).map(|&s| Place {
                section: s,
                offset: sym.address().wrapping_add(r.addend() as u64),
            }),
            _ => None,
        };
        let name = sym.name().unwrap_or("").to_string();
        fields.insert(offset, (name, r.addend() as u64, place));
    }
    let mut params = Vec::new();
    for i in 0..n {
        let at = i * klp.param_size;
        let field = |off: u64| fields.get(&(at + off));
        let name = field(klp.param_name)
            .and_then(|(_, _, p)| *p)
            .and_then(|p| c_string(sections, p))
            .ok_or_else(|| bad(format!("__param entry {i} has no name")))?;
        let ops = field(klp.param_ops)
            .map(|f| f.0.clone())
            .unwrap_or_default();
        params.push(Param {
            kind: Kind::of_ops(&ops),
            ops,
            var: field(klp.param_arg).and_then(|f| f.2),
            name,
        });
    }
    Ok(params)
}

fn c_string(sections: &[Section], p: Place) -> Option<String> {
    let tail = sections.get(p.section)?.bytes.get(p.offset as usize..)?;
    let len = tail.iter().position(|&b| b == 0).filter(|&l| l <= 256)?;
    Some(String::from_utf8_lossy(&tail[..len]).into_owned())
}

/// Write each `NAME=VALUE` of `given` into its variable; returns the values set, by
/// name (as they were given).
pub fn set(
    sections: &mut [Section],
    params: &[Param],
    given: &[String],
) -> Result<Vec<(String, String)>, ParseError> {
    let mut set = Vec::new();
    for g in given {
        let (name, value) = g
            .split_once('=')
            .ok_or_else(|| bad(format!("'{g}': want NAME=VALUE")))?;
        let p = params.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            bad(format!(
                "the module has no parameter '{name}' (it has: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })?;
        let (Some(kind), Some(var)) = (p.kind, p.var) else {
            return Err(bad(format!(
                "'{name}' is set by {}, which lpvmm does not set (numbers and booleans only)",
                p.ops
            )));
        };
        let bytes = kind
            .encode(value)
            .ok_or_else(|| bad(format!("'{value}' is not a value of {name} ({})", p.ops)))?;
        write(sections, var, &bytes)?;
        set.push((name.to_string(), value.to_string()));
    }
    Ok(set)
}

/// Write `bytes` at `at`: a zero-filled section becomes data to hold them.
fn write(sections: &mut [Section], at: Place, bytes: &[u8]) -> Result<(), ParseError> {
    let s = sections
        .get_mut(at.section)
        .ok_or_else(|| bad("a variable outside the module".into()))?;
    if s.kind == SectionKind::Bss {
        s.kind = SectionKind::Data;
        s.bytes = vec![0; s.size as usize];
    }
    let end = at.offset as usize + bytes.len();
    if s.kind == SectionKind::Code || s.kind == SectionKind::ReadOnly || end > s.bytes.len() {
        return Err(bad(format!(
            "its variable is not writable data ({})",
            s.name
        )));
    }
    s.bytes[at.offset as usize..end].copy_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_encoded_as_the_kernels_param_ops_store_them() {
        let int = Kind::of_ops("param_ops_int").unwrap();
        assert_eq!(int.encode("-19"), Some((-19i32).to_le_bytes().to_vec()));
        assert_eq!(int.encode("4294967296"), None, "out of range");
        assert_eq!(int.encode("x"), None);
        let byte = Kind::of_ops("param_ops_byte").unwrap();
        assert_eq!(byte.encode("0xff"), Some(vec![0xff]));
        assert_eq!(byte.encode("256"), None);
        assert_eq!(
            Kind::of_ops("param_ops_bool").unwrap().encode("Y"),
            Some(vec![1])
        );
        assert_eq!(Kind::of_ops("param_ops_charp"), None);
    }
}

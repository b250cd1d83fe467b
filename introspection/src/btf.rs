//! BTF, the kernel's compact type information (`__start_BTF` .. `__stop_BTF` in the
//! image, CONFIG_DEBUG_INFO_BTF). lpvmm reads every struct layout it needs from here,
//! so that no field offset is ever written in the source.
//!
//! Format: include/uapi/linux/btf.h. A header, then a type section of variable-length
//! records (type ids count from 1; 0 is void), then a string section.

use std::collections::HashMap;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF header is invalid: {0}")]
    BadHeader(String),
    #[error("BTF type {id} is truncated or malformed: {why}")]
    BadType { id: u32, why: String },
    #[error("BTF has no struct '{0}'")]
    NoStruct(String),
    #[error("BTF: struct {strukt} has no field '{field}'")]
    NoField { strukt: String, field: String },
    #[error("BTF: type {0} has no size")]
    NoSize(u32),
}

const MAGIC: u16 = 0xeb9f;
/// Limits for a hostile blob: more types or members than any kernel has.
const MAX_TYPES: usize = 1 << 21;
/// Qualifier / typedef chains longer than this are treated as a loop.
const MAX_CHAIN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(k: u32) -> Option<Kind> {
        use Kind::*;
        Some(match k {
            1 => Int,
            2 => Ptr,
            3 => Array,
            4 => Struct,
            5 => Union,
            6 => Enum,
            7 => Fwd,
            8 => Typedef,
            9 => Volatile,
            10 => Const,
            11 => Restrict,
            12 => Func,
            13 => FuncProto,
            14 => Var,
            15 => Datasec,
            16 => Float,
            17 => DeclTag,
            18 => TypeTag,
            19 => Enum64,
            _ => return None,
        })
    }

    /// Bytes of kind-specific data after the common 12-byte record.
    fn extra(self, vlen: usize) -> usize {
        use Kind::*;
        match self {
            Int | Var | DeclTag => 4,
            Array => 12,
            Struct | Union | Datasec | Enum64 => 12 * vlen,
            Enum | FuncProto => 8 * vlen,
            _ => 0,
        }
    }
}

#[derive(Clone, Debug)]
struct Type {
    kind: Kind,
    name_off: u32,
    /// `size` for sized kinds, the referenced type for the others.
    size_or_type: u32,
    /// Structs and unions: range in `Btf::members`. Arrays: (element type, count).
    first: u32,
    count: u32,
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bit_size: u32,
}

/// One named constant of an enum (`BTF_KIND_ENUM` or `BTF_KIND_ENUM64`), as the
/// unsigned bits of its value: lpvmm reads flag masks this way, never from the source.
#[derive(Clone, Copy, Debug)]
struct Enumerator {
    name_off: u32,
    value: u64,
}

/// A field located in a struct: where it is, and its (unqualified) type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Offset from the start of the outer struct, in bits.
    pub bit_offset: u64,
    /// Non-zero for bitfields.
    pub bit_size: u32,
    pub type_id: u32,
    /// Size of the field's type in bytes (of the storage unit for bitfields).
    pub size: u64,
}

impl Field {
    /// Byte offset (bitfields: of the byte holding their first bit).
    pub fn offset(&self) -> u64 {
        self.bit_offset / 8
    }
}

#[derive(Clone, Debug)]
pub struct Btf {
    types: Vec<Type>,
    members: Vec<Member>,
    enumerators: Vec<Enumerator>,
    strings: Vec<u8>,
    /// Struct and union names to their type ids, in id order.
    composites: HashMap<String, Vec<u32>>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The type and string sections a BTF blob's header points to, both inside the blob.
fn sections(blob: &[u8]) -> Result<(&[u8], &[u8]), BtfError> {
    let bad = |m: &str| BtfError::BadHeader(m.to_string());
    if blob.len() < 24 {
        return Err(bad("shorter than a header"));
    }
    let magic = u16::from_le_bytes([blob[0], blob[1]]);
    if magic != MAGIC {
        return Err(bad(&format!("magic {magic:#x}, want {MAGIC:#x}")));
    }
    if blob[2] != 1 {
        return Err(bad(&format!("version {}", blob[2])));
    }
    let word = |i| u32_at(blob, i).unwrap_or(0) as usize;
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (word(4), word(8), word(12), word(16), word(20));
    let section = |off: usize, len: usize, what: &str| {
        hdr_len
            .checked_add(off)
            .and_then(|s| Some((s, s.checked_add(len)?)))
            .filter(|&(_, e)| e <= blob.len())
            .map(|(s, e)| &blob[s..e])
            .ok_or_else(|| bad(&format!("{what} section outside the blob")))
    };
    Ok((
        section(type_off, type_len, "type")?,
        section(str_off, str_len, "string")?,
    ))
}

/// A struct's or union's members: 12-byte records (name, type, offset); with `kflag`
/// the offset word also holds a bitfield's size.
fn push_members(records: &[u8], kflag: bool, members: &mut Vec<Member>) {
    for r in records.chunks_exact(12) {
        let off = u32_at(r, 8).unwrap_or(0);
        let (bit_offset, bit_size) = if kflag {
            (off & 0x00ff_ffff, off >> 24)
        } else {
            (off, 0)
        };
        members.push(Member {
            name_off: u32_at(r, 0).unwrap_or(0),
            type_id: u32_at(r, 4).unwrap_or(0),
            bit_offset,
            bit_size,
        });
    }
}

/// An enum's values: 8-byte records (name, value), or 12-byte ones for `Enum64` (name,
/// low and high halves).
fn push_enumerators(records: &[u8], kind: Kind, enumerators: &mut Vec<Enumerator>) {
    let step = if kind == Kind::Enum { 8 } else { 12 };
    for r in records.chunks_exact(step) {
        let lo = u64::from(u32_at(r, 4).unwrap_or(0));
        let hi = match kind {
            Kind::Enum64 => u64::from(u32_at(r, 8).unwrap_or(0)),
            _ => 0,
        };
        enumerators.push(Enumerator {
            name_off: u32_at(r, 0).unwrap_or(0),
            value: hi << 32 | lo,
        });
    }
}

impl Btf {
    pub fn parse(blob: &[u8]) -> Result<Btf, BtfError> {
        let (type_sec, strings) = sections(blob)?;
        let strings = strings.to_vec();

        let mut types = vec![Type {
            kind: Kind::Int, // id 0: void; never looked at as a real type
            name_off: 0,
            size_or_type: 0,
            first: 0,
            count: 0,
        }];
        let mut members = Vec::new();
        let mut enumerators = Vec::new();
        let mut at = 0usize;
        while at < type_sec.len() {
            let id = types.len() as u32;
            if types.len() > MAX_TYPES {
                return Err(BtfError::BadType {
                    id,
                    why: "too many types".into(),
                });
            }
            let bad_type = |why: String| BtfError::BadType { id, why };
            let (Some(name_off), Some(info), Some(size_or_type)) = (
                u32_at(type_sec, at),
                u32_at(type_sec, at + 4),
                u32_at(type_sec, at + 8),
            ) else {
                return Err(bad_type("record cut short".into()));
            };
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 != 0;
            let kind = Kind::from_raw((info >> 24) & 0x1f)
                .ok_or_else(|| bad_type(format!("unknown kind {}", (info >> 24) & 0x1f)))?;
            let body = at + 12;
            let end = body + kind.extra(vlen);
            if end > type_sec.len() {
                return Err(bad_type("record cut short".into()));
            }
            let mut t = Type {
                kind,
                name_off,
                size_or_type,
                first: 0,
                count: 0,
            };
            match kind {
                Kind::Struct | Kind::Union => {
                    t.first = members.len() as u32;
                    t.count = vlen as u32;
                    push_members(&type_sec[body..end], kflag, &mut members);
                }
                Kind::Array => {
                    t.first = u32_at(type_sec, body).unwrap_or(0);
                    t.count = u32_at(type_sec, body + 8).unwrap_or(0);
                }
                Kind::Enum | Kind::Enum64 => {
                    t.first = enumerators.len() as u32;
                    t.count = vlen as u32;
                    push_enumerators(&type_sec[body..end], kind, &mut enumerators);
                }
                _ => {}
            }
            types.push(t);
            at = end;
        }

        let mut btf = Btf {
            types,
            members,
            enumerators,
            strings,
            composites: HashMap::new(),
        };
        btf.index_composites();
        Ok(btf)
    }

    /// Every named struct and union by name (a name may have several).
    fn index_composites(&mut self) {
        for id in 1..self.types.len() as u32 {
            let t = &self.types[id as usize];
            if matches!(t.kind, Kind::Struct | Kind::Union) && t.name_off != 0 {
                let name = self.str_at(t.name_off).to_string();
                self.composites.entry(name).or_default().push(id);
            }
        }
    }

    pub fn type_count(&self) -> usize {
        self.types.len() - 1
    }

    fn str_at(&self, off: u32) -> &str {
        let tail = self.strings.get(off as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        if id == 0 {
            return None;
        }
        self.types.get(id as usize)
    }

    pub fn kind(&self, id: u32) -> Option<Kind> {
        self.ty(id).map(|t| t.kind)
    }

    /// Follow typedefs and qualifiers to the underlying type.
    pub fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..MAX_CHAIN {
            match self.ty(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        Kind::Typedef
                            | Kind::Const
                            | Kind::Volatile
                            | Kind::Restrict
                            | Kind::TypeTag
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => return id,
            }
        }
        id
    }

    /// Size in bytes of a type.
    pub fn size_of(&self, id: u32) -> Result<u64, BtfError> {
        let id = self.resolve(id);
        let t = self.ty(id).ok_or(BtfError::NoSize(id))?;
        match t.kind {
            Kind::Int | Kind::Struct | Kind::Union | Kind::Enum | Kind::Enum64 | Kind::Float => {
                Ok(u64::from(t.size_or_type))
            }
            Kind::Ptr => Ok(8),
            Kind::Array => {
                // The element type may itself be an array; bounded by MAX_CHAIN.
                let mut elem = t.first;
                let mut count = u64::from(t.count);
                for _ in 0..MAX_CHAIN {
                    let e = self.resolve(elem);
                    match self.ty(e) {
                        Some(inner) if inner.kind == Kind::Array => {
                            count = count.saturating_mul(u64::from(inner.count));
                            elem = inner.first;
                        }
                        Some(_) => {
                            return Ok(count.saturating_mul(self.size_of_scalar(e)?));
                        }
                        None => return Err(BtfError::NoSize(id)),
                    }
                }
                Err(BtfError::NoSize(id))
            }
            _ => Err(BtfError::NoSize(id)),
        }
    }

    fn size_of_scalar(&self, id: u32) -> Result<u64, BtfError> {
        let t = self.ty(id).ok_or(BtfError::NoSize(id))?;
        match t.kind {
            Kind::Ptr => Ok(8),
            Kind::Int | Kind::Struct | Kind::Union | Kind::Enum | Kind::Enum64 | Kind::Float => {
                Ok(u64::from(t.size_or_type))
            }
            _ => Err(BtfError::NoSize(id)),
        }
    }

    /// Element count of an array type (after typedefs).
    pub fn array_len(&self, id: u32) -> Option<u64> {
        let t = self.ty(self.resolve(id))?;
        (t.kind == Kind::Array).then_some(u64::from(t.count))
    }

    /// Type ids of the structs (not unions) with this name.
    fn structs(&self, name: &str) -> Vec<u32> {
        self.composites
            .get(name)
            .map(|ids| {
                ids.iter()
                    .copied()
                    .filter(|&id| self.kind(id) == Some(Kind::Struct))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Size of `struct name`.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        let id = *self
            .structs(name)
            .first()
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        self.size_of(id)
    }

    /// Locate `path` (`member` or `member.member...`) in `struct strukt`. Members of
    /// anonymous structs and unions are found as if they were direct members, as in C.
    /// When BTF has several structs of that name, the first that has the path wins.
    pub fn field(&self, strukt: &str, path: &str) -> Result<Field, BtfError> {
        let candidates = self.structs(strukt);
        if candidates.is_empty() {
            return Err(BtfError::NoStruct(strukt.into()));
        }
        for id in candidates {
            if let Some(f) = self.field_in(id, path) {
                return Ok(f);
            }
        }
        Err(BtfError::NoField {
            strukt: strukt.into(),
            field: path.into(),
        })
    }

    /// Every constant of the enum that defines `name` (anonymous enums included), by
    /// name, with the unsigned bits of its value; `None` if no enum defines it.
    pub fn enum_of(&self, name: &str) -> Option<Vec<(String, u64)>> {
        let found = self
            .enumerators
            .iter()
            .position(|e| self.str_at(e.name_off) == name)? as u32;
        let t = self.types.iter().find(|t| {
            matches!(t.kind, Kind::Enum | Kind::Enum64)
                && (t.first..t.first.saturating_add(t.count)).contains(&found)
        })?;
        let range = t.first as usize..(t.first as usize).checked_add(t.count as usize)?;
        Some(
            self.enumerators
                .get(range)?
                .iter()
                .map(|e| (self.str_at(e.name_off).to_string(), e.value))
                .collect(),
        )
    }

    /// The value of enum constant `name`.
    pub fn enumerator(&self, name: &str) -> Option<u64> {
        self.enum_of(name)?
            .into_iter()
            .find_map(|(n, v)| (n == name).then_some(v))
    }

    /// True if `struct strukt` has the field.
    pub fn has_field(&self, strukt: &str, path: &str) -> bool {
        self.field(strukt, path).is_ok()
    }

    fn field_in(&self, id: u32, path: &str) -> Option<Field> {
        let mut container = id;
        let mut base = 0u64;
        let mut found = None;
        for part in path.split('.') {
            let (off, member) = self.member(container, part, 0)?;
            base += off;
            let type_id = self.resolve(member.type_id);
            found = Some(Field {
                bit_offset: base,
                bit_size: member.bit_size,
                type_id,
                size: self.size_of(type_id).unwrap_or(0),
            });
            container = type_id;
        }
        found
    }

    /// Find a member by name in a struct/union, descending into anonymous members.
    /// Returns its bit offset from the start of `id` and the member.
    fn member(&self, id: u32, name: &str, depth: usize) -> Option<(u64, Member)> {
        if depth > MAX_CHAIN {
            return None;
        }
        let t = self.ty(self.resolve(id))?;
        if !matches!(t.kind, Kind::Struct | Kind::Union) {
            return None;
        }
        let range = t.first as usize..(t.first as usize).checked_add(t.count as usize)?;
        let members = self.members.get(range)?;
        for m in members {
            if m.name_off != 0 && self.str_at(m.name_off) == name {
                return Some((u64::from(m.bit_offset), *m));
            }
        }
        for m in members.iter().filter(|m| m.name_off == 0) {
            if let Some((off, inner)) = self.member(m.type_id, name, depth + 1) {
                return Some((u64::from(m.bit_offset) + off, inner));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::btf::BtfBuilder;

    fn sample() -> Vec<u8> {
        let mut b = BtfBuilder::new();
        let long = b.int("long unsigned int", 8);
        let int = b.int("int", 4);
        let chr = b.int("char", 1);
        let comm = b.array(chr, 16);
        let ptr = b.ptr(0);
        let thread = b.strukt("thread_struct", 16, &[("sp", long, 64)]);
        let anon = b.strukt("", 8, &[("a", int, 0), ("b", int, 32)]);
        let cint = b.konst(int);
        let tint = b.typedef("pid_t", cint);
        b.strukt(
            "task_struct",
            96,
            &[
                ("stack", ptr, 0),
                ("", anon, 64),
                ("pid", tint, 128),
                ("comm", comm, 160),
                ("thread", thread, 384),
            ],
        );
        b.bitfields(
            "orc_entry",
            6,
            &[("sp_reg", int, 32, 4), ("type", int, 40, 3)],
        );
        b.finish()
    }

    #[test]
    fn finds_fields_through_anonymous_members_typedefs_and_nesting() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.field("task_struct", "pid").unwrap().offset(), 16);
        assert_eq!(btf.field("task_struct", "pid").unwrap().size, 4);
        assert_eq!(btf.field("task_struct", "b").unwrap().offset(), 12);
        assert_eq!(btf.field("task_struct", "thread.sp").unwrap().offset(), 56);
        let comm = btf.field("task_struct", "comm").unwrap();
        assert_eq!((comm.offset(), comm.size), (20, 16));
        assert_eq!(btf.array_len(comm.type_id), Some(16));
        assert_eq!(btf.struct_size("task_struct").unwrap(), 96);
        let ty = btf.field("orc_entry", "type").unwrap();
        assert_eq!((ty.bit_offset, ty.bit_size), (40, 3));
        assert!(matches!(
            btf.field("task_struct", "nope"),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(btf.field("nope", "x"), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn finds_enum_constants_of_anonymous_and_64_bit_enums() {
        let mut b = BtfBuilder::new();
        b.enumeration("", 8, &[("FL_ENABLED", 1 << 31), ("FL_DISABLED", 1 << 25)]);
        b.enumeration("wide", 8, &[("W_TOP", 1 << 40), ("W_LOW", 2)]);
        let btf = Btf::parse(&b.finish()).unwrap();
        assert_eq!(btf.enumerator("FL_ENABLED"), Some(1 << 31));
        assert_eq!(btf.enumerator("FL_DISABLED"), Some(1 << 25));
        assert_eq!(btf.enumerator("W_TOP"), Some(1 << 40));
        let all = btf.enum_of("W_LOW").unwrap();
        assert_eq!(all, vec![("W_TOP".into(), 1 << 40), ("W_LOW".into(), 2)]);
        assert_eq!(btf.enumerator("NOPE"), None);
    }

    #[test]
    fn rejects_bad_headers_and_truncation_without_panicking() {
        let good = sample();
        assert!(Btf::parse(&good[..10]).is_err());
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        assert!(Btf::parse(&bad_magic).is_err());
        for cut in (24..good.len()).step_by(7) {
            let _ = Btf::parse(&good[..cut]);
        }
        let mut huge = good.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Btf::parse(&huge).is_err());
    }
}

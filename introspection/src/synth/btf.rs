//! Writes BTF blobs for tests: the same encoding the kernel's pahole output uses.

pub struct BtfBuilder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Default for BtfBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BtfBuilder {
    pub fn new() -> Self {
        BtfBuilder {
            types: Vec::new(),
            strings: vec![0],
            next_id: 1,
        }
    }

    fn string(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }

    fn record(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size_or_type: u32) -> u32 {
        let name_off = self.string(name);
        let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
        for w in [name_off, info, size_or_type] {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn words(&mut self, words: &[u32]) {
        for w in words {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
    }

    pub fn int(&mut self, name: &str, size: u32) -> u32 {
        let id = self.record(name, 1, 0, false, size);
        self.words(&[size * 8]);
        id
    }

    pub fn ptr(&mut self, to: u32) -> u32 {
        self.record("", 2, 0, false, to)
    }

    pub fn array(&mut self, elem: u32, n: u32) -> u32 {
        let id = self.record("", 3, 0, false, 0);
        self.words(&[elem, elem, n]);
        id
    }

    pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
        self.record(name, 8, 0, false, to)
    }

    pub fn konst(&mut self, to: u32) -> u32 {
        self.record("", 10, 0, false, to)
    }

    /// A struct whose members are (name, type, bit offset).
    pub fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let id = self.record(name, 4, members.len() as u32, false, size);
        for &(m, ty, bits) in members {
            let n = self.string(m);
            self.words(&[n, ty, bits]);
        }
        id
    }

    /// A union whose members are (name, type, bit offset).
    pub fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let id = self.record(name, 5, members.len() as u32, false, size);
        for &(m, ty, bits) in members {
            let n = self.string(m);
            self.words(&[n, ty, bits]);
        }
        id
    }

    /// A struct of (name, type, bit offset, bit size) members, kind_flag set as pahole
    /// does for structs with bitfields.
    pub fn bitfields(&mut self, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
        let id = self.record(name, 4, members.len() as u32, true, size);
        for &(m, ty, bits, width) in members {
            let n = self.string(m);
            self.words(&[n, ty, (width << 24) | bits]);
        }
        id
    }

    /// An enum of (name, value): `BTF_KIND_ENUM64` if a value needs more than 32 bits,
    /// else `BTF_KIND_ENUM`, as pahole chooses.
    pub fn enumeration(&mut self, name: &str, size: u32, values: &[(&str, u64)]) -> u32 {
        let wide = values.iter().any(|&(_, v)| v > u64::from(u32::MAX));
        let kind = if wide { 19 } else { 6 };
        let id = self.record(name, kind, values.len() as u32, false, size);
        for &(n, v) in values {
            let n = self.string(n);
            if wide {
                self.words(&[n, v as u32, (v >> 32) as u32]);
            } else {
                self.words(&[n, v as u32]);
            }
        }
        id
    }

    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            self.types.len() as u32,
            self.types.len() as u32,
            self.strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

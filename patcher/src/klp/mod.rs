//! Kernel livepatch modules, applied from outside (issue 28, DESIGN.md §14): a `.ko`
//! whose static `struct klp_patch` describes a live patch (the kernel's
//! samples/livepatch, its selftests' modules, kpatch-build's output) is read as an lpvmm
//! patch, without running its init or loading anything in the guest, and applied by
//! the same engine as a `.kp`:
//!
//! - [`read`]: the `klp_patch` (objects, functions with `old_name`, `new_func` and
//!   `old_sympos`, callbacks, states, `replace`) becomes the patch's manifest; the patch's
//!   name is the module's;
//! - [`params`]: module parameters given as on insmod's command line, set in the
//!   module's data first;
//! - [`build`]: `kp build --kernel` of such a source, with lpvmm's shadow-variable
//!   runtime linked in under the kernel's `klp_shadow_*` names;
//! - [`sym`]: kpatch-build's and klp-convert's `.klp.sym.*` symbols and `.klp.rela.*`
//!   sections.
//!
//! The module's init (which only calls `klp_enable_patch`) and exit code are not loaded;
//! its `struct module` is laid out zero-filled, for `THIS_MODULE` to point at. Its
//! callbacks get their `struct klp_object`, whose `mod` lpvmm keeps pointing at the
//! guest's own `struct module` of a loaded target (NULL for vmlinux), as the kernel
//! does.

pub mod build;
pub mod params;
pub mod read;
pub mod sym;

use crate::load::link::Linked;
use crate::load::object::{aligned_copy, open_elf, Body, Flavour, PatchObject};
use crate::load::objects::ObjectModule;
use crate::patch::{KlpObjectAt, ObjectName};
use crate::ParseError;
use introspection::layout::KlpLayout;

pub use crate::load::object::{KlpParts, THIS_MODULE_SECTION};

/// The `name=` and `livepatch=` entries of `.modinfo`: a livepatch module's name, or
/// `None` for an object that is not one.
pub fn livepatch_module_name(data: &[u8]) -> Option<String> {
    let (buf, at) = aligned_copy(data);
    modinfo_name(&open_elf(&buf[at..]).ok()?)
}

/// [`livepatch_module_name`] of an opened object.
fn modinfo_name(file: &object::File) -> Option<String> {
    let info = object::Object::section_by_name(file, ".modinfo")?;
    let info = object::ObjectSection::data(&info).ok()?;
    let entries: Vec<&[u8]> = info.split(|&b| b == 0).collect();
    let livepatch = entries.iter().any(|e| *e == b"livepatch=Y");
    let name = entries.iter().find_map(|e| e.strip_prefix(b"name="))?;
    let name = std::str::from_utf8(name).ok()?;
    (livepatch && crate::load::manifest::valid_patch_name(name)).then(|| name.to_string())
}

impl PatchObject {
    /// A livepatch module (`.ko`) as a patch, its `klp_patch` read with the guest
    /// kernel's `klp` layout, its parameters set to `params` (`NAME=VALUE`).
    pub fn parse_livepatch(
        data: &[u8],
        klp: &KlpLayout,
        params: &[String],
    ) -> Result<PatchObject, ParseError> {
        let (buf, at) = aligned_copy(data);
        let file = open_elf(&buf[at..])?;
        let name = modinfo_name(&file).ok_or_else(|| {
            ParseError::Manifest(
                "neither an lpvmm patch (no .lpvmm.manifest) nor a kernel livepatch module \
                 (no livepatch=Y and name= in .modinfo)"
                    .into(),
            )
        })?;
        let mut body = Body::read(&file, Flavour::Livepatch)?;
        if let Some(shadow) = body.imports.iter().find(|i| i.starts_with("klp_shadow_")) {
            return Err(ParseError::Unsupported(format!(
                "{name} calls {shadow}, which lpvmm serves with its own shadow-variable \
                 runtime (the guest's would keep the variables where lpvmm cannot see or free \
                 them): build the module with lpvmm kp build --kernel RELEASE, which links the \
                 runtime in"
            )));
        }
        let declared = params::read(&file, &body.index_of, &body.sections, klp)?;
        let set = params::set(&mut body.sections, &declared, params)?;
        let this_module = body
            .sections
            .iter()
            .position(|s| s.name == THIS_MODULE_SECTION)
            .ok_or_else(|| ParseError::Manifest(format!("no {THIS_MODULE_SECTION} section")))?;
        let (mut manifest, objects) =
            read::describe(&body.sections, &body.functions, klp, this_module, &name)?;
        // What the module's init would do with a `replace` parameter (the kernel's
        // selftests: `patch.replace = replace`).
        if let Some((_, v)) = set.iter().find(|(n, _)| n == "replace") {
            manifest.atomic_replace = v != "0";
        }
        body.into_object(
            manifest,
            Some(KlpParts {
                objects,
                params: params.to_vec(),
            }),
        )
    }
}

/// Where each object's `struct klp_object` of a livepatch module was linked.
pub(crate) fn objects_at(obj: &PatchObject, linked: &Linked) -> Vec<KlpObjectAt> {
    let Some(k) = &obj.klp else {
        return Vec::new();
    };
    k.objects
        .iter()
        .filter_map(|(name, place)| {
            Some(KlpObjectAt {
                object: name.clone().map_or(ObjectName::Vmlinux, ObjectName::Module),
                addr: linked.section_addrs.get(place.section)? + place.offset,
            })
        })
        .collect()
}

/// Point each object's `klp_object.mod` at the guest's `struct module` of that module,
/// in the linked data, for the modules loaded now (the kernel sets it when it links
/// the object; NULL, as compiled, for vmlinux and modules not loaded).
pub(crate) fn set_loaded_mods(
    linked: &mut Linked,
    at: &[KlpObjectAt],
    loaded: &[ObjectModule],
    klp: Option<&KlpLayout>,
) -> Result<(), crate::KpError> {
    let Some(klp) = klp else {
        return Ok(());
    };
    for k in at {
        let ObjectName::Module(name) = &k.object else {
            continue;
        };
        let Some(m) = loaded.iter().find(|m| &m.name == name) else {
            continue;
        };
        let off = (k.addr + klp.object_mod).wrapping_sub(linked.data.addr) as usize;
        let field = linked.data.bytes.get_mut(off..off + 8).ok_or_else(|| {
            crate::KpError::State(format!("klp_object of {name} is not in the patch's data"))
        })?;
        field.copy_from_slice(&m.addr.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests;

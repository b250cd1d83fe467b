//! A PCI configuration space (mechanism #1, ports 0xcf8/0xcfc) holding one host bridge
//! at 00:00.0 and nothing else.
//!
//! No guest device needs PCI, but Linux only lists e820 "reserved" ranges above 1 MiB in
//! /proc/iomem from its PCI resource survey (`e820__reserve_resources_late`). With a
//! host bridge present the guest runs that survey and shows the patch area as
//! `Reserved`, as it would on real firmware. The bridge also satisfies the kernel's
//! conf1 sanity check, which wants to find a host bridge on bus 0.

pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;
/// Every port the config mechanism owns (0xcf8..0xcff).
pub const PORTS: std::ops::RangeInclusive<u16> = CONFIG_ADDRESS..=0xcff;

const ENABLE: u32 = 1 << 31;
/// Red Hat, Inc. / "QEMU PCIe host bridge": IDs guests already know to be a plain bridge.
const VENDOR_ID: u16 = 0x1b36;
const DEVICE_ID: u16 = 0x0008;
/// Class 06 (bridge), subclass 00 (host bridge), prog-if 00.
const CLASS_HOST_BRIDGE: u32 = 0x0600_0000;

#[derive(Default)]
pub struct PciConfig {
    address: u32,
}

impl PciConfig {
    /// The 32-bit config register of the selected function, if it exists.
    fn selected_register(&self) -> Option<u32> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let devfn = (self.address >> 8) & 0xff;
        if bus != 0 || devfn != 0 {
            return None;
        }
        Some(match self.address & 0xfc {
            0x00 => u32::from(VENDOR_ID) | (u32::from(DEVICE_ID) << 16),
            0x08 => CLASS_HOST_BRIDGE, // revision 0
            _ => 0,                    // header type 0, no BARs, no capabilities
        })
    }

    /// Returns true when the port belongs to the PCI config mechanism.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                data.copy_from_slice(&self.address.to_le_bytes());
                true
            }
            CONFIG_DATA..=0xcff => {
                // Absent functions read as all-ones, as on a real bus.
                let reg = self.selected_register().unwrap_or(u32::MAX).to_le_bytes();
                let off = usize::from(port - CONFIG_DATA);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = reg.get(off + i).copied().unwrap_or(0xff);
                }
                true
            }
            _ => false,
        }
    }

    /// A 32-bit write to CONFIG_ADDRESS selects a register; every other write to the
    /// config ports is accepted and ignored: the bridge has nothing to configure.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(p: &PciConfig, reg: u32, devfn: u32) -> u32 {
        let mut p2 = PciConfig { address: p.address };
        p2.write(CONFIG_ADDRESS, &(ENABLE | (devfn << 8) | reg).to_le_bytes());
        let mut b = [0u8; 4];
        p2.read(CONFIG_DATA, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn only_the_host_bridge_exists() {
        let p = PciConfig::default();
        assert_eq!(read32(&p, 0, 0), 0x0008_1b36);
        assert_eq!(read32(&p, 8, 0) >> 8, 0x06_0000);
        assert_eq!(read32(&p, 0, 1 << 3), u32::MAX);
    }

    #[test]
    fn address_latch_reads_back_and_byte_reads_work() {
        let mut p = PciConfig::default();
        p.write(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        assert!(p.read(CONFIG_ADDRESS, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        let mut one = [0u8; 1];
        p.read(CONFIG_DATA + 1, &mut one);
        assert_eq!(one[0], 0x1b);
        assert!(!p.read(0x60, &mut one));
    }
}

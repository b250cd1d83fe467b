//! virtio-net (virtio 1.x §5.1) on a tap interface the host already has, `--net
//! TAP[,mac=MAC]`: frames the guest sends go to the tap, frames the tap has go to the
//! guest. No offloads are offered (the guest checksums and segments itself), so a frame
//! is at most one MTU; the 12-byte virtio-net header travels with it through the tap
//! (`IFF_VNET_HDR`, header size 12), as firecracker does.
//!
//! The tap is the host's to make and own (`ip tuntap add TAP mode tap`, addresses,
//! bridges, firewall): lpvmm only attaches to it, and refuses a name that is not an
//! existing tap rather than creating one.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::mmio::F_VERSION_1;
use super::{DeviceError, VirtioDevice};

const DEVICE_TYPE: u32 = 1;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;

/// The virtio-net header with VIRTIO_F_VERSION_1 (`num_buffers` included).
const HDR: usize = 12;
/// The largest frame (header included) lpvmm moves: a 64 KiB IP packet on Ethernet.
const MAX_FRAME: usize = HDR + 65_550;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `--net TAP[,mac=MAC]` as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("--net '{0}': {1}")]
    Spec(String, String),
    #[error(
        "--net {0}: no such network interface (lpvmm attaches to a tap the host made: \
         ip tuntap add {0} mode tap)"
    )]
    NoInterface(String),
    #[error("--net {0}: is a network interface but not a tap")]
    NotTap(String),
    #[error("--net {tap}: cannot attach to it: {source}")]
    Attach {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("at most {0} network interfaces")]
    TooMany(usize),
}

impl std::str::FromStr for NetSpec {
    type Err = NetError;

    fn from_str(s: &str) -> Result<NetSpec, NetError> {
        let bad = |why: &str| NetError::Spec(s.to_string(), why.to_string());
        let mut parts = s.split(',');
        let tap = parts.next().unwrap_or_default().to_string();
        if tap.is_empty() || tap.len() > 15 || tap.contains('/') || tap.starts_with('.') {
            return Err(bad("not an interface name (1 to 15 characters, no '/')"));
        }
        let mut mac = None;
        for opt in parts {
            match opt.strip_prefix("mac=") {
                Some(m) => {
                    mac = Some(
                        parse_mac(m)
                            .ok_or_else(|| bad("mac= wants 6 hex bytes, aa:bb:cc:dd:ee:ff"))?,
                    )
                }
                None => return Err(bad(&format!("unknown option '{opt}' (expected mac=MAC)"))),
            }
        }
        Ok(NetSpec { tap, mac })
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// A MAC for a NIC given none: locally administered, unicast, from the tap's name, so
/// that a guest keeps its address across lpvmm runs.
fn default_mac(tap: &str) -> [u8; 6] {
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// An attached tap.
pub struct Tap {
    file: File,
    spec: NetSpec,
}

impl Tap {
    /// Attach to the existing tap `spec.tap`, non-blocking, with 12-byte virtio headers.
    pub fn open(spec: &NetSpec) -> Result<Tap, NetError> {
        let sys = std::path::Path::new("/sys/class/net").join(&spec.tap);
        if !sys.exists() {
            return Err(NetError::NoInterface(spec.tap.clone()));
        }
        if !sys.join("tun_flags").exists() {
            return Err(NetError::NotTap(spec.tap.clone()));
        }
        let attach = |source| NetError::Attach {
            tap: spec.tap.clone(),
            source,
        };
        // SAFETY: open(2) of a constant NUL-terminated path; the descriptor is owned by
        // the File below at once.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = [0u8; 40]; // struct ifreq: name[16], flags, padding
        req[..spec.tap.len()].copy_from_slice(spec.tap.as_bytes());
        req[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte ifreq, which `req` is.
        if unsafe { libc::ioctl(fd, TUNSETIFF, req.as_mut_ptr()) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        let size: libc::c_int = HDR as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            spec: spec.clone(),
        })
    }
}

/// The network device model.
pub struct Net {
    tap: Tap,
    name: String,
    mac: [u8; 6],
    config: [u8; 8],
    /// A frame read from the tap that no guest buffer took yet (`rx_len` bytes).
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    /// Frames dropped: too long for the guest's buffer, or the tap full.
    dropped: u64,
}

impl Net {
    /// `name`: the guest's name for it (eth0...).
    pub fn new(tap: Tap, name: String) -> Net {
        let mac = tap.spec.mac.unwrap_or_else(|| default_mac(&tap.spec.tap));
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        Net {
            tap,
            name,
            mac,
            config,
            rx: vec![0; MAX_FRAME],
            rx_len: 0,
            tx: Vec::with_capacity(MAX_FRAME),
            dropped: 0,
        }
    }

    /// Send every frame the guest made available on the TX queue.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(|e| DeviceError::Ring(e.to_string()))?
            .collect();
        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            self.tx.clear();
            for d in chain {
                if d.is_write_only() {
                    return Err(DeviceError::Chain(
                        "a transmit buffer the device may only write".into(),
                    ));
                }
                let room = MAX_FRAME - self.tx.len();
                let take = (d.len() as usize).min(room);
                let start = self.tx.len();
                self.tx.resize(start + take, 0);
                mem.read_slice(&mut self.tx[start..], d.addr())
                    .map_err(|_| {
                        DeviceError::Chain("a transmit buffer outside guest RAM".into())
                    })?;
            }
            if self.tx.len() > HDR && self.tap.file.write(&self.tx).is_err() {
                self.dropped += 1;
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|e| DeviceError::Ring(e.to_string()))?;
            used = true;
        }
        Ok(used)
    }

    /// Give the guest every frame the tap has, while it has receive buffers.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut used = false;
        loop {
            if self.rx_len == 0 && !self.read_frame()? {
                return Ok(used);
            }
            let chain = queue
                .iter(mem)
                .map_err(|e| DeviceError::Ring(e.to_string()))?
                .next();
            let Some(chain) = chain else {
                return Ok(used); // the frame waits for the guest's next buffers
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for d in chain {
                if !d.is_write_only() {
                    return Err(DeviceError::Chain(
                        "a receive buffer the device may not write".into(),
                    ));
                }
                let n = (d.len() as usize).min(self.rx_len - written);
                mem.write_slice(&self.rx[written..written + n], d.addr())
                    .map_err(|_| DeviceError::Chain("a receive buffer outside guest RAM".into()))?;
                written += n;
            }
            let len = if written == self.rx_len {
                written as u32
            } else {
                self.dropped += 1; // too long for the buffer: the guest sees nothing
                0
            };
            self.rx_len = 0;
            queue
                .add_used(mem, head, len)
                .map_err(|e| DeviceError::Ring(e.to_string()))?;
            used = true;
        }
    }

    /// Read the tap's next frame, if it has one.
    fn read_frame(&mut self) -> Result<bool, DeviceError> {
        match self.tap.file.read(&mut self.rx) {
            Ok(n) if n > HDR => {
                // The tap writes the 10-byte header of old and leaves num_buffers: one.
                self.rx[10..12].copy_from_slice(&1u16.to_le_bytes());
                self.rx_len = n;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(DeviceError::Backend(format!(
                "reading tap {}: {e}",
                self.tap.spec.tap
            ))),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        match (index, queues) {
            (RX, [rx, _]) => self.receive(rx, mem),
            (TX, [_, tx]) => self.transmit(tx, mem),
            _ => Ok(false),
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.tap.file.as_raw_fd()]
    }

    fn backend_ready(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        match queues {
            [rx, _] if rx.ready() => self.receive(rx, mem),
            _ => Ok(false),
        }
    }

    fn describe(&self) -> String {
        let m = self.mac;
        format!(
            "virtio-net {} (tap {}, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, {} frame(s) dropped)",
            self.name, self.tap.spec.tap, m[0], m[1], m[2], m[3], m[4], m[5], self.dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as D, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    /// A device whose "tap" is one end of a SOCK_SEQPACKET pair (frames keep their
    /// bounds, as a tap's do); the other end is the host's side.
    fn net() -> (Net, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writing two descriptors into `fds`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors were just made and are owned here only.
        let (ours, theirs) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let tap = Tap {
            file: ours,
            spec: "tap0".parse().unwrap(),
        };
        (Net::new(tap, "eth0".into()), theirs)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// Queues 0 (RX) and 1 (TX) in guest memory, each with `chain` made available.
    fn queues<'a>(
        m: &'a GuestMemoryMmap,
        rx: &[(u64, u32, u16)],
        tx: &[(u64, u32, u16)],
    ) -> (
        MockSplitQueue<'a, GuestMemoryMmap>,
        MockSplitQueue<'a, GuestMemoryMmap>,
    ) {
        let make = |at: u64, chain: &[(u64, u32, u16)]| {
            let vq = MockSplitQueue::create(m, GuestAddress(at), 16);
            let descs: Vec<RawDescriptor> = chain
                .iter()
                .enumerate()
                .map(|(i, &(a, l, f))| RawDescriptor::from(D::new(a, l, f, i as u16 + 1)))
                .collect();
            if !descs.is_empty() {
                vq.add_desc_chains(&descs, 0).unwrap();
            }
            vq
        };
        (make(0, rx), make(0x1_0000, tx))
    }

    #[test]
    fn a_transmitted_frame_reaches_the_tap_header_and_all() {
        let m = mem();
        let frame: Vec<u8> = (0..200u8).collect();
        m.write_slice(&[0u8; HDR], GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&frame, GuestAddress(0x11_0000)).unwrap();
        let (rxq, txq) = queues(
            &m,
            &[],
            &[(0x10_0000, HDR as u32, NEXT), (0x11_0000, 200, 0)],
        );
        let (mut n, mut host) = net();
        let mut qs = [
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
        ];
        assert!(n.process(TX, &mut qs, &m).unwrap());
        let mut got = vec![0u8; 1000];
        let len = host.read(&mut got).unwrap();
        assert_eq!(len, HDR + 200);
        assert_eq!(&got[HDR..len], &frame[..]);
    }

    #[test]
    fn a_frame_waits_for_receive_buffers_and_then_arrives_whole() {
        let m = mem();
        let (mut n, mut host) = net();
        let mut frame = vec![0u8; HDR];
        frame.extend((0..100u8).map(|b| b ^ 0x5a));
        host.write_all(&frame).unwrap();
        // No receive buffer yet: nothing used, the frame kept.
        let (rxq, txq) = queues(&m, &[], &[]);
        let mut qs = [
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
        ];
        assert!(!n.backend_ready(&mut qs, &m).unwrap());
        assert_eq!(n.rx_len, frame.len());
        // The guest adds a buffer and notifies: the frame is in it, num_buffers 1.
        let (rxq, _) = queues(&m, &[(0x20_0000, 2048, WRITE)], &[]);
        qs[RX] = rxq.create_queue::<Queue>().unwrap();
        assert!(n.process(RX, &mut qs, &m).unwrap());
        assert_eq!(
            rxq.used().ring().ref_at(0).unwrap().load().len() as usize,
            frame.len()
        );
        let mut got = vec![0u8; frame.len()];
        m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&got[HDR..], &frame[HDR..]);
        assert_eq!(&got[10..12], &1u16.to_le_bytes());
    }

    #[test]
    fn a_frame_too_long_for_the_buffer_is_dropped_and_counted() {
        let m = mem();
        let (mut n, mut host) = net();
        host.write_all(&vec![7u8; HDR + 1500]).unwrap();
        let (rxq, txq) = queues(&m, &[(0x20_0000, 512, WRITE)], &[]);
        let mut qs = [
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
        ];
        assert!(n.backend_ready(&mut qs, &m).unwrap());
        assert_eq!(rxq.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert!(
            n.describe().contains("1 frame(s) dropped"),
            "{}",
            n.describe()
        );
    }

    #[test]
    fn buffers_in_the_wrong_direction_break_the_device() {
        let m = mem();
        let (mut n, mut host) = net();
        host.write_all(&[1u8; HDR + 60]).unwrap();
        let (rxq, txq) = queues(&m, &[(0x20_0000, 2048, 0)], &[(0x10_0000, 64, WRITE)]);
        let mut qs = [
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
        ];
        let e = n.process(RX, &mut qs, &m).unwrap_err();
        assert!(
            e.to_string()
                .contains("receive buffer the device may not write"),
            "{e}"
        );
        let e = n.process(TX, &mut qs, &m).unwrap_err();
        assert!(
            e.to_string()
                .contains("transmit buffer the device may only write"),
            "{e}"
        );
    }

    #[test]
    fn net_specs_and_their_errors() {
        let s: NetSpec = "tap0,mac=52:54:00:aa:bb:0c".parse().unwrap();
        assert_eq!(
            (s.tap.as_str(), s.mac),
            ("tap0", Some([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]))
        );
        assert_eq!("tap1".parse::<NetSpec>().unwrap().mac, None);
        for (bad, why) in [
            ("tap0,mac=52:54:00", "mac= wants 6 hex bytes"),
            ("tap0,mac=zz:54:00:aa:bb:0c", "mac= wants 6 hex bytes"),
            ("tap0,queues=2", "unknown option 'queues=2'"),
            ("a-name-far-too-long", "not an interface name"),
            ("../x", "not an interface name"),
        ] {
            let e = bad.parse::<NetSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = Tap::open(&"lpvmm-none9".parse().unwrap()).err().unwrap();
        assert!(e.to_string().contains("no such network interface"), "{e}");
        let e = Tap::open(&"lo".parse().unwrap()).err().unwrap();
        assert!(e.to_string().contains("not a tap"), "{e}");
    }

    #[test]
    fn a_default_mac_is_local_unicast_and_stable() {
        let m = default_mac("tap0");
        assert_eq!(m, default_mac("tap0"));
        assert_ne!(m, default_mac("tap1"));
        assert_eq!(m[0] & 0b11, 0b10, "locally administered, unicast");
    }
}

//! The Debian system of guest-images/debian.sh as the harness boots it: its command
//! line, its initrd and disk as the test host sees them, the tap its NIC is attached to.
//! One place, so that the tests (tests/system.rs), the demo and the benchmarks boot
//! the same system.

use std::path::PathBuf;

use crate::{images_dir, Guest, GuestSpec, TestHost};

/// Its root file system on lpvmm's first disk.
pub const CMDLINE: &str = "console=ttyS0 root=/dev/vda rw reboot=k panic=1 loglevel=5";
/// The test host's end of the NIC; the image gives the guest 192.168.77.2.
pub const HOST_IP: &str = "192.168.77.1";
pub const GUEST_IP: &str = "192.168.77.2";

/// The image as built (the host gets a copy of its own: [`TestHost::start_with_disks`]).
pub fn disk_image() -> PathBuf {
    images_dir().join("debian/disk.img")
}

/// Where the host has the initramfs the image made for `series`.
pub fn initrd_on_host(series: &str) -> String {
    format!("/images/debian/{series}/initrd.img")
}

/// The initrds of `series`, as files to give the host.
pub fn host_files(series: &[&str]) -> Result<Vec<(PathBuf, String)>, String> {
    series
        .iter()
        .map(|s| {
            let initrd = images_dir().join(format!("debian/{s}/initrd.img"));
            match initrd.exists() {
                true => Ok((initrd, initrd_on_host(s))),
                false => Err(format!(
                    "missing {}: build the Debian image with guest-images/debian.sh",
                    initrd.display()
                )),
            }
        })
        .collect()
}

/// Make the tap `tap` on the host, with [`HOST_IP`] (replacing one left behind).
pub fn tap_up(host: &mut TestHost, tap: &str) -> Result<(), String> {
    host.exec(&format!(
        "ip link del {tap} 2>/dev/null; tunctl -t {tap} >/dev/null && \
         ip addr add {HOST_IP}/24 dev {tap} && ip link set {tap} up"
    ))
    .map(|_| ())
}

/// Boot the system of `series` as `name` on the host's disk `disk` with its NIC on
/// `tap` (made with [`tap_up`]), 2 vCPUs and 1 GiB, and `extra` options; returns the
/// guest once its console's ready line (multi-user reached) came, and that line.
pub fn boot<'h>(
    host: &'h mut TestHost,
    name: &str,
    series: &str,
    (disk, tap): (usize, &str),
    extra: &str,
) -> Result<(Guest<'h>, String), String> {
    let initrd = host.file(&initrd_on_host(series));
    let extra = format!("--memory 1G --disk {} --net {tap} {extra}", host.disk(disk));
    let spec = GuestSpec {
        series,
        vcpus: 2,
        initrd: &initrd,
        cmdline: CMDLINE,
        extra: &extra,
    };
    host.boot_guest_spec(name, &spec)
}

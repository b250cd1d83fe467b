#!/usr/bin/env bash
# debian-customize.sh ROOT: mmdebstrap's customize hook for debian.sh. Makes the
# freshly installed system into the guest debian.sh describes (its contract is there).
set -Eeuo pipefail
root=$1
in_root() { chroot "$root" "$@"; }

echo debian >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n' >"$root/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
in_root passwd --delete root >/dev/null

# Root logged in on the serial console (the getty systemd starts for console=ttyS0).
d=$root/etc/systemd/system/serial-getty@ttyS0.service.d
mkdir -p "$d"
cat >"$d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
UNIT

# The login shell on the console: once the boot is done, the ready line, then a plain
# prompt (the harness's contract). Other logins get the usual shell.
cat >"$root/root/.bash_profile" <<'PROFILE'
if [ "$(tty)" = /dev/ttyS0 ]; then
	state=$(systemctl is-system-running --wait 2>/dev/null)
	echo "LPVMM-GUEST-READY nproc=$(nproc) release=$(uname -r) modules=$(wc -l </proc/modules) system=$state"
	export PS1='guest# ' TERM=vt100
	unset PROMPT_COMMAND
fi
PROFILE

# No bracketed-paste escapes around each command's output (readline's default): a
# program reading the console gets the text alone.
echo 'set enable-bracketed-paste off' >"$root/root/.inputrc"

# Ground truth for introspection: real addresses in /proc/kallsyms and /proc/PID/stack.
printf '%s\n' kernel.kptr_restrict=0 kernel.dmesg_restrict=0 kernel.printk='4 4 1 7' \
	>"$root/etc/sysctl.d/90-lpvmm.conf"

# The first virtio NIC: a static address, no DHCP wait.
cat >"$root/etc/systemd/network/10-virtio.network" <<'NET'
[Match]
Type=ether

[Network]
Address=192.168.77.2/24
Gateway=192.168.77.1
LinkLocalAddressing=no
IPv6AcceptRA=no
NET
in_root systemctl enable --quiet systemd-networkd
# Nothing waits for an address: the link may have no carrier in a test without a peer.
in_root systemctl mask --quiet systemd-networkd-wait-online.service

# Units that only cost boot time in a guest with no clock source to sync, no
# periodic jobs wanted under test, and no graphical or rescue use.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
	fstrim.timer systemd-timesyncd.service; do
	in_root systemctl mask --quiet "$u"
done

# lpvmm's virtio devices are on virtio-mmio: the initramfs loads its driver and the
# disk's, whatever initramfs-tools finds on the build machine.
printf '%s\n' virtio_mmio virtio_blk virtio_net ext4 >>"$root/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >/dev/null

#!/usr/bin/env bash
# build.sh: fetch the Debian kernels, busybox and a static bash, build the
# lpvmm guest and test-host images. Idempotent and cached; see README.md.
#
# Output (in $LPVMM_IMAGES, default ${XDG_CACHE_HOME:-~/.cache}/lpvmm/images):
#   guest-6.1/{vmlinuz,release,config}    guest-6.12/{vmlinuz,release,config}
#   guest-initrd.cpio.gz                  host/{vmlinuz,base.cpio}
#   manifest.txt
# Downloaded .debs: $LPVMM_DEBS, default ${XDG_CACHE_HOME:-~/.cache}/lpvmm/debs.
#
# Kernel versions are never hard-coded: they come from the meta packages
# (linux-image-cloud-amd64 = 6.1 series, linux-image-6.12-cloud-amd64 = 6.12)
# through apt-cache, so a new Debian kernel rotates in by itself.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/lpvmm
IMAGES=${LPVMM_IMAGES:-$CACHE_ROOT/images}
DEBS=${LPVMM_DEBS:-$CACHE_ROOT/debs}
export PATH=$PATH:/usr/sbin:/sbin   # depmod, modprobe for non-root users

# series name -> meta package naming the current kernel of that series
declare -A META=(
	[6.1]=linux-image-cloud-amd64
	[6.12]=linux-image-6.12-cloud-amd64
)
SERIES=(6.1 6.12)
# user-space packages, extracted (not installed): key -> package
declare -A USERPKG=(
	[busybox]=busybox-static   # every tool, and the shell that runs the /init scripts
	[bash]=bash-static         # the guest's interactive console shell (see rootfs/guest-init)
)
USERKEYS=(busybox bash)
HOST_SERIES=6.1             # the test host runs this kernel
HOST_MODULES=(kvm_amd tun virtio_pci virtio_blk)  # loaded in the test host, with their dependencies (tun: the taps of --net; virtio_pci, virtio_blk: the disks tests give it, TestHost::disk)
# Loaded in the guest at boot (rootfs/guest-init), with their dependencies, from
# each guest kernel's own package: a guest with no module loaded is not a
# realistic guest, and lpvmm's introspection (module list, addresses in module
# space, [module] frames in stacks) and patching must meet module code.
# Chosen to be small, to load without any device behind them, and to be what
# a cloud guest really runs: tun (a task can sleep in it: programs/tunblock.c),
# dummy (creates dummy0 on load), veth, virtio_net (a dependency chain:
# failover, net_failover, and on 6.1 virtio and virtio_ring), overlay and
# isofs (file systems; isofs brings cdrom), and virtio_mmio and virtio_blk, which
# drive lpvmm's `--disk` (a guest without one loads them and they find nothing).
GUEST_MODULES=(tun dummy veth virtio_net overlay isofs virtio_mmio virtio_blk)
# module parameters, written into the lpvmm-modules lists (host and guest)
declare -A MODULE_PARAMS=([kvm_amd]="nested=0")
# glibc runtime for a dynamically linked Rust binary; host-payload.sh adds
# whatever else `ldd` reports for the real binary.
# The host's console shell: dash from this machine (dynamic; its libraries
# are among HOST_LIBS). Why not busybox ash: see rootfs/host-init.
HOST_SHELL=/bin/dash
HOST_LIBS=(
	/lib64/ld-linux-x86-64.so.2
	/lib/x86_64-linux-gnu/libc.so.6
	/lib/x86_64-linux-gnu/libm.so.6
	/lib/x86_64-linux-gnu/libgcc_s.so.1
	/lib/x86_64-linux-gnu/libpthread.so.0
	/lib/x86_64-linux-gnu/libdl.so.2
	/lib/x86_64-linux-gnu/librt.so.1
)

die() {
	echo "build.sh: error: $*" >&2
	exit 1
}
trap 'die "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

# --- tools -----------------------------------------------------------------------

APT_UPDATED=0
apt_update_once() {
	((APT_UPDATED)) && return 0
	[ "$(id -u)" = 0 ] || die "apt package lists need updating; run 'sudo apt-get update' and retry"
	echo "running apt-get update"
	apt-get update -qq >&2 || die "apt-get update failed"
	APT_UPDATED=1
}

# ensure PKG... are installed (only those whose check fails are installed)
# usage: ensure "cmd:package" ... ; a check starting with / is a file path
ensure() {
	local want=() pair check pkg
	for pair in "$@"; do
		check=${pair%%:*} pkg=${pair#*:}
		if [[ $check == /* ]]; then
			[ -e "$check" ] && continue
		else
			command -v "$check" >/dev/null 2>&1 && continue
		fi
		want+=("$pkg")
	done
	((${#want[@]})) || return 0
	mapfile -t want < <(printf '%s\n' "${want[@]}" | sort -u)
	[ "$(id -u)" = 0 ] || die "missing packages: ${want[*]} (install them: sudo apt-get install ${want[*]})"
	apt_update_once
	echo "installing ${want[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >&2 ||
		die "apt-get install ${want[*]} failed"
}

ensure apt-get:apt apt-cache:apt dpkg-deb:dpkg dpkg-query:dpkg cpio:cpio gzip:gzip \
	gcc:gcc strip:binutils /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev \
	depmod:kmod modprobe:kmod sha256sum:coreutils flock:util-linux ldd:libc-bin "$HOST_SHELL:dash"

# --- locking, scratch space ----------------------------------------------------------

mkdir -p "$IMAGES" "$DEBS"
exec 8>"$IMAGES/.lock"
flock 8 || die "cannot lock $IMAGES/.lock"
mkdir -p "$IMAGES/.work" "$IMAGES/.stamps"
WORK=$(mktemp -d "$IMAGES/.work/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- version resolution ------------------------------------------------------------------

# `apt-cache show --no-all-versions` prints the candidate version's record only.
# Prints "PACKAGE<TAB>VERSION<TAB>DEPENDS" per package; fails if one is unknown.
apt_records() {
	apt-cache show --no-all-versions "$@" 2>/dev/null | awk -F': ' '
		$1 == "Package" { p = $2 }
		$1 == "Version" { v[p] = $2 }
		$1 == "Depends" { d[p] = $2 }
		END { for (p in v) printf "%s\t%s\t%s\n", p, v[p], d[p] }'
}

# Sets PKG[series], VER[series] (the image package each meta package depends
# on, at its candidate version) and PKG/VER[key] of the USERPKG packages.
declare -A PKG VER DEB
resolve_all() {
	local s meta p v d dep ver out
	local -A rv rd
	out=$(apt_records "${META[@]}" "${USERPKG[@]}") || return 1
	while IFS=$'\t' read -r p v d; do
		rv[$p]=$v rd[$p]=$d
	done <<<"$out"
	for s in "${SERIES[@]}"; do
		meta=${META[$s]}
		[ -n "${rv[$meta]:-}" ] || return 1
		# first linux-image-* alternative of Depends, e.g.
		# "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
		dep=$(tr ',|' '\n' <<<"${rd[$meta]}" | sed 's/^ *//' | grep -m1 '^linux-image-') || return 1
		ver=$(sed -n 's/.*(= *\([^)]*\)).*/\1/p' <<<"$dep")
		dep=${dep%% *}
		if [ -z "$ver" ]; then # no exact pin: take the image package's candidate
			ver=$(apt_records "$dep" | cut -f2) || return 1
		fi
		[ -n "$ver" ] || return 1
		PKG[$s]=$dep VER[$s]=$ver
	done
	for s in "${USERKEYS[@]}"; do
		PKG[$s]=${USERPKG[$s]}
		VER[$s]=${rv[${USERPKG[$s]}]:-}
		[ -n "${VER[$s]}" ] || return 1
	done
}

# apt-cache takes ~0.4 s a call where apt keeps no binary cache; remember the
# answer until the package lists or apt configuration change.
lists_key() {
	find /var/lib/apt/lists /etc/apt -maxdepth 2 -printf '%p %T@ %s\n' 2>/dev/null |
		LC_ALL=C sort | sha256sum | cut -c1-16
}
RESOLVED=$IMAGES/.stamps/resolved
load_resolved() {
	local k v
	[ "$(head -n1 "$RESOLVED" 2>/dev/null)" = "lists $(lists_key)" ] || return 1
	while read -r k v; do
		case "$k" in
		pkg.*) PKG[${k#pkg.}]=$v ;;
		ver.*) VER[${k#ver.}]=$v ;;
		esac
	done < <(tail -n +2 "$RESOLVED")
	for k in "${SERIES[@]}" "${USERKEYS[@]}"; do
		[ -n "${VER[$k]:-}" ] || return 1
	done
}
save_resolved() {
	local k
	{
		echo "lists $(lists_key)"
		for k in "${SERIES[@]}" "${USERKEYS[@]}"; do
			echo "pkg.$k ${PKG[$k]}"
			echo "ver.$k ${VER[$k]}"
		done
	} >"$RESOLVED"
}

if ! load_resolved; then
	if ! resolve_all; then
		apt_update_once
		resolve_all || die "cannot resolve ${META[*]} ${USERPKG[*]} with apt-cache (is Debian bookworm, with bookworm-security, in the apt sources?)"
	fi
	save_resolved
fi

# --- downloads (keyed by package + version) ----------------------------------------------------

# apt-get download names files PKG_VERSION_ARCH.deb with ':' (epoch) as %3a
deb_path() { # PACKAGE VERSION -> existing cached .deb path, or nothing
	local f
	for f in "$DEBS/${1}_${2//:/%3a}_"*.deb; do
		[ -f "$f" ] && { echo "$f"; return 0; }
	done
	return 0
}

fetch() { # KEY: download PKG[KEY]=VER[KEY] unless cached; sets DEB[KEY]
	local key=$1 pkg=${PKG[$1]} ver=${VER[$1]} f tmp old
	f=$(deb_path "$pkg" "$ver")
	if [ -n "$f" ]; then
		echo "cached: $pkg $ver"
	else
		echo "fetching $pkg $ver"
		tmp=$(mktemp -d "$DEBS/.dl.XXXXXX")
		# as root, apt drops to user _apt, which cannot write here: stay root
		if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" "$pkg=$ver" >&2); then
			rm -rf "$tmp"
			return 1
		fi
		mv "$tmp"/*.deb "$DEBS/"
		rm -rf "$tmp"
		f=$(deb_path "$pkg" "$ver")
		[ -n "$f" ] || die "apt-get download $pkg=$ver produced no .deb in $DEBS"
		# a new version replaces the old ones of the same package
		for old in "$DEBS/${pkg}_"*.deb; do
			[ "$old" = "$f" ] && continue
			[ -f "$old" ] || continue
			echo "pruned: $(basename "$old")"
			rm -f "$old"
		done
	fi
	DEB[$key]=$f
}

fetch_all() {
	local k
	exec 7>"$DEBS/.lock"
	flock 7
	for k in "${SERIES[@]}" "${USERKEYS[@]}"; do
		fetch "$k" || return 1
	done
	exec 7>&-
}

if ! fetch_all; then
	# stale package lists name versions that the mirror no longer has
	((APT_UPDATED)) && die "download failed"
	echo "download failed; refreshing package lists"
	apt_update_once
	resolve_all || die "cannot resolve kernel versions after apt-get update"
	save_resolved
	fetch_all || die "download failed (see apt messages above)"
fi

# --- helpers ------------------------------------------------------------------------------------

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
SELF_HASH=$(hash_of "${BASH_SOURCE[0]}")

# up_to_date NAME KEY FILE...: stamp matches and every output exists
up_to_date() {
	local name=$1 key=$2 f
	shift 2
	[ "$(cat "$IMAGES/.stamps/$name" 2>/dev/null)" = "$key" ] || return 1
	for f in "$@"; do [ -e "$f" ] || return 1; done
}
stamp() { echo "$2" >"$IMAGES/.stamps/$1"; }

# replace directory or file $2 by $1 (same file system, so mv is cheap)
install_output() {
	rm -rf "$2.old"
	[ -e "$2" ] && mv "$2" "$2.old"
	mv "$1" "$2"
	rm -rf "$2.old"
}

# The newc header of an entry without data (directory or device node).
# Written by hand so that device nodes need no mknod (no root needed).
newc_entry() { # NAME MODE(octal) RDEVMAJOR RDEVMINOR INO
	local name=$1 mode=$((8#$2)) namesize=$((${#1} + 1)) pad
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$5" "$mode" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0
	printf '%s\0' "$name"
	pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}

# write an uncompressed newc archive of directory $1 to $2: /dev and
# /dev/console first (the kernel opens /dev/console before running /init),
# then the tree, owned by root, entries sorted.
make_cpio() {
	local dir=$1 out=$2
	{
		newc_entry dev 040755 0 0 900001
		newc_entry dev/console 020600 5 1 900002
		(cd "$dir" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
			cpio -o -H newc -R 0:0 --reproducible --quiet)
	} >"$out"
}

# common skeleton: busybox (applet links are made by /init) + dirs + /etc basics
skeleton() { # DIR
	local d=$1
	mkdir -p "$d"/{bin,sbin,usr/bin,usr/sbin,proc,sys,tmp,run,root,etc}
	deb_file busybox ./bin/busybox "$d/bin/busybox"
	ln -s busybox "$d/bin/sh"
	echo 'root:x:0:0:root:/root:/bin/sh' >"$d/etc/passwd"
	echo 'root:x:0:' >"$d/etc/group"
}

deb_file() { # KEY PATH-IN-DEB DEST: one file of a downloaded package
	local x=$WORK/deb-$1
	mkdir -p "$x"
	[ -e "$x/$2" ] || dpkg-deb --fsys-tarfile "${DEB[$1]}" | tar -x -C "$x" "$2"
	install -m 0755 "$x/$2" "$3"
}

# extract PATTERN... of the kernel package of SERIES into DIR (a tar of the .deb)
extract_kernel() { # SERIES DIR PATTERN...
	local s=$1 dir=$2
	shift 2
	mkdir -p "$dir"
	dpkg-deb --fsys-tarfile "${DEB[$s]}" | tar -x -C "$dir" --wildcards "$@"
}

# kernel release of an extracted package: from boot/vmlinuz-<release>
release_of() {
	local v
	for v in "$1"/boot/vmlinuz-*; do
		[ -f "$v" ] && { echo "${v##*/vmlinuz-}"; return 0; }
	done
	die "no boot/vmlinuz-* in $(basename "${DEB[$2]}")"
}

# --- kernel modules -------------------------------------------------------------------------------

# Modules always come from the package of the kernel that loads them (same
# build: vermagic, symbol versions and signatures match). Used for the test
# host (HOST_MODULES) and for every guest series (GUEST_MODULES).

# module_tree SERIES: extract the package's vmlinuz and its whole module tree
# into $WORK/modtree-SERIES (once per run) and run depmod on it: the package
# ships no modules.dep (dpkg's postinst makes it), and modprobe needs one to
# compute dependencies, which depmod can only do from the whole tree.
# Sets MODTREE[SERIES] (the extracted package: MODTREE/boot/vmlinuz-RELEASE),
# MODBASE[SERIES] (the -b/-d base directory) and MODREL[SERIES] (the release).
declare -A MODTREE MODBASE MODREL
module_tree() { # SERIES
	local s=$1 x base rel
	[ -n "${MODREL[$s]:-}" ] && return 0
	x=$WORK/modtree-$s
	# ('*lib/modules/*' matches ./lib/modules and merged-/usr ./usr/lib/modules)
	extract_kernel "$s" "$x" './boot/vmlinuz-*' '*lib/modules/*'
	rel=$(release_of "$x" "$s")
	base=$x
	[ -d "$x/lib/modules/$rel" ] || base=$x/usr   # merged-/usr style packages
	[ -d "$base/lib/modules/$rel" ] || die "no lib/modules/$rel in ${PKG[$s]}"
	depmod -b "$base" "$rel"
	MODTREE[$s]=$x MODBASE[$s]=$base MODREL[$s]=$rel
}

# install_modules SERIES ROOT MODULE...: put MODULE... of the kernel package
# of SERIES, and every module they depend on, into ROOT/lib/modules/RELEASE/
# (at their paths in the package), and write ROOT/lib/modules/RELEASE/lpvmm-modules:
# one "relative/path.ko [params]" line per module, in load order (dependencies
# first, each module once; params from MODULE_PARAMS). The /init scripts
# insmod that list line by line: the images carry neither modprobe nor
# modules.dep, and busybox insmod loads exactly the file it is given.
# Modules are stored decompressed (.ko): busybox insmod may not read .ko.xz or
# .ko.zst (that is a build option), and the initramfs is compressed as a whole
# anyway. The decompressed file is still the signed module (Debian signs
# before it compresses), so loading it does not taint the kernel.
install_modules() { # SERIES ROOT MODULE...
	local s=$1 root=$2 m deps kind path rp ko name dir list base rel
	local -A seen=()
	shift 2
	module_tree "$s"
	base=${MODBASE[$s]} rel=${MODREL[$s]}
	dir=$root/lib/modules/$rel
	list=$dir/lpvmm-modules
	mkdir -p "$dir"
	: >"$list"
	for m in "$@"; do
		deps=$(modprobe -d "$base" -S "$rel" --show-depends "$m") ||
			die "module $m not found for $rel"
		# one "insmod /abs/path.ko[.xz] [params]" per module, dependencies
		# first; "builtin NAME" for what is built in: nothing to load
		while read -r kind path _; do
			[ "$kind" = insmod ] || continue
			rp=${path#"$base/lib/modules/$rel/"}
			ko=${rp%.ko*}.ko
			[ -n "${seen[$ko]:-}" ] && continue   # a dependency of an earlier one
			seen[$ko]=1
			mkdir -p "$(dirname "$dir/$ko")"
			case "$rp" in
			*.ko) cp "$path" "$dir/$ko" ;;
			*.ko.xz) ensure xz:xz-utils; xz -dc "$path" >"$dir/$ko" ;;
			*.ko.zst) ensure zstd:zstd; zstd -qdc "$path" >"$dir/$ko" ;;
			*.ko.gz) gzip -dc "$path" >"$dir/$ko" ;;
			*) die "unexpected module file $path" ;;
			esac
			name=$(basename "$ko" .ko | tr - _)
			echo "$ko ${MODULE_PARAMS[$name]:-}" >>"$list"
		done <<<"$deps"
	done
}

# module names of an lpvmm-modules list, in load order, on one line
module_names() { # LIST
	awk '{ n = $1; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n); printf "%s%s", s, n; s = " " } END { print "" }' "$1"
}

# --- guest kernels ------------------------------------------------------------------------------

for s in "${SERIES[@]}"; do
	out=$IMAGES/guest-$s
	key="$(basename "${DEB[$s]}") $SELF_HASH"
	if up_to_date "guest-$s" "$key" "$out/vmlinuz" "$out/release"; then
		echo "cached: guest-$s ($(cat "$out/release"))"
		continue
	fi
	echo "building guest-$s from ${PKG[$s]}"
	x=$WORK/kernel-$s
	extract_kernel "$s" "$x" './boot/vmlinuz-*' './boot/config-*'
	rel=$(release_of "$x" "$s")
	mkdir -p "$WORK/guest-$s"
	cp "$x/boot/vmlinuz-$rel" "$WORK/guest-$s/vmlinuz"
	cp "$x/boot/config-$rel" "$WORK/guest-$s/config"
	echo "$rel" >"$WORK/guest-$s/release"
	install_output "$WORK/guest-$s" "$out"
	stamp "guest-$s" "$key"
done

# --- guest initramfs -----------------------------------------------------------------------------

GUEST_INPUTS=("$HERE/rootfs/guest-init" "$HERE"/programs/*.c)
GCC_VER=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)
LIBC_VER=$(dpkg-query -W -f='${Version}' libc6 2>/dev/null || echo unknown)
# The initrd carries modules of every guest kernel: a new kernel package of any
# series, or another module list, means a new initrd.
kernel_debs=
for s in "${SERIES[@]}"; do kernel_debs+="$(basename "${DEB[$s]}") "; done
key="$kernel_debs$(basename "${DEB[busybox]}") $(basename "${DEB[bash]}") modules=$(IFS=,; echo "${GUEST_MODULES[*]}") gcc-$GCC_VER libc-$LIBC_VER $SELF_HASH $(hash_of "${GUEST_INPUTS[@]}")"
if up_to_date guest-initrd "$key" "$IMAGES/guest-initrd.cpio.gz"; then
	echo "cached: guest-initrd.cpio.gz"
else
	echo "building guest-initrd.cpio.gz"
	r=$WORK/guest-root
	skeleton "$r"
	install -m 0755 "$HERE/rootfs/guest-init" "$r/init"
	deb_file bash ./bin/bash-static "$r/bin/bash"
	for c in "$HERE"/programs/*.c; do
		name=$(basename "$c" .c)
		gcc -static -O2 -Wall -Wextra -o "$r/usr/bin/$name" "$c" -lm ||
			die "compiling programs/$name.c failed"
		strip "$r/usr/bin/$name"
	done
	# One initrd serves both series: each kernel finds its own modules under
	# /lib/modules/$(uname -r) and ignores the other's.
	for s in "${SERIES[@]}"; do
		install_modules "$s" "$r" "${GUEST_MODULES[@]}"
		echo "guest-$s modules: $(module_names "$r/lib/modules/${MODREL[$s]}/lpvmm-modules")"
	done
	make_cpio "$r" "$WORK/guest-initrd.cpio"
	gzip -9 -n "$WORK/guest-initrd.cpio"
	install_output "$WORK/guest-initrd.cpio.gz" "$IMAGES/guest-initrd.cpio.gz"
	stamp guest-initrd "$key"
fi

# --- test host: kernel + base initramfs -----------------------------------------------------------------

# HOST_LIBS that exist here, plus whatever the shell needs
mapfile -t host_libs < <(
	for l in "${HOST_LIBS[@]}"; do [ -e "$l" ] && echo "$l"; done
	ldd "$HOST_SHELL" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
)
mapfile -t host_libs < <(printf '%s\n' "${host_libs[@]}" | sort -u)
key="$(basename "${DEB[$HOST_SERIES]}") $(basename "${DEB[busybox]}") $SELF_HASH $(hash_of "$HERE/rootfs/host-init" "$HOST_SHELL" "${host_libs[@]}")"
if up_to_date host "$key" "$IMAGES/host/vmlinuz" "$IMAGES/host/base.cpio"; then
	echo "cached: host (vmlinuz, base.cpio)"
else
	echo "building host/base.cpio from ${PKG[$HOST_SERIES]}"
	r=$WORK/host-root
	skeleton "$r"
	install -m 0755 "$HERE/rootfs/host-init" "$r/init"
	install_modules "$HOST_SERIES" "$r" "${HOST_MODULES[@]}"
	x=${MODTREE[$HOST_SERIES]} rel=${MODREL[$HOST_SERIES]}
	list=$r/lib/modules/$rel/lpvmm-modules
	install -m 0755 "$(realpath "$HOST_SHELL")" "$r/bin/dash"
	# glibc runtime, at its usual paths, symlinks resolved
	for l in "${host_libs[@]}"; do
		mkdir -p "$r$(dirname "$l")"
		cp -L "$l" "$r$l"
	done
	mkdir -p "$WORK/host"
	cp "$x/boot/vmlinuz-$rel" "$WORK/host/vmlinuz"
	make_cpio "$r" "$WORK/host/base.cpio"
	install_output "$WORK/host" "$IMAGES/host"
	stamp host "$key"
	echo "host modules: $(module_names "$list")"
fi

# --- manifest -----------------------------------------------------------------------------------------

{
	for k in "${SERIES[@]}" "${USERKEYS[@]}"; do
		echo "${PKG[$k]} ${VER[$k]}"
	done
	for p in libc6 libgcc-s1 dash; do
		echo "$p $(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo unknown)"
	done
	echo "gcc $GCC_VER"
} >"$WORK/manifest.txt"
cmp -s "$WORK/manifest.txt" "$IMAGES/manifest.txt" || mv "$WORK/manifest.txt" "$IMAGES/manifest.txt"

echo "images ready in $IMAGES"

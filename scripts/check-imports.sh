#!/usr/bin/env bash
# Import circles inside a crate: fails when the modules of patcher/ or vmm/ (or of any
# crate named on the command line) import each other in a circle.
#
#   scripts/check-imports.sh [CRATE_DIR...]      # default: patcher vmm
#
# A module is a file under CRATE/src (a folder's mod.rs is the folder). An edge is a
# path that starts with `crate::` or `super::` in non-test code: each file is read up to
# its first `#[cfg(test)] mod`, tests.rs files are left out, and comment lines (doc links
# included) do not count (nor do `mod` lines, which declare a folder's parts). A path
# names the longest module it starts with. The check is tsort's: a circle is reported
# as tsort reports a loop, with the modules on it.
set -euo pipefail
cd "$(dirname "$0")/.."

# The module a file is: patcher/src/engine.rs -> engine, vmm/src/cli/mod.rs -> cli.
module_of() {
	local rel=${1#"$2"/src/}
	rel=${rel%.rs}
	rel=${rel%/mod}
	echo "${rel//\//::}"
}

# The crate::/super:: paths of one file's non-test code, one per line.
paths_in() {
	perl -0777 -ne '
		s/^\s*#\[cfg\(test\)\]\s*\n\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s.*//ms;   # test modules, to the end
		s{^\s*//.*$}{}mg;                # comment lines
		# Spell out groups, innermost first: a::{b, c::{d}} -> a::b, a::c::d.
		sub spell { my ($pre, $items) = @_; join ", ", map { my $t = $_; $t =~ s/^\s+|\s+$//g;
			$t eq "self" ? substr($pre, 0, -2) : "$pre$t" } grep { /\S/ } split /,/, $items }
		1 while s{((?:[A-Za-z_][A-Za-z0-9_]*::)+)\{([^{}]*)\}}{spell($1, $2)}ge;
		print "$1\n" while /\b((?:crate|super)::(?:[a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*|[A-Z][A-Za-z0-9_]*))/g;
	' "$1"
}

# Every edge FROM TO of one crate, one per line.
edges() {
	local crate=$1 f from parent path target
	local -A known=()
	local -A reexported=()
	while IFS= read -r f; do known[$(module_of "$f" "$crate")]=1; done < <(find "$crate/src" -name '*.rs')
	# What lib.rs re-exports (`pub use engine::{Engine, Patch};`): crate::Engine is engine.
	local m names n
	while read -r m names; do
		for n in $names; do reexported[$n]=$m; done
	done < <(tr '\n' ' ' <"$crate/src/lib.rs" | grep -oE 'pub use [a-z_]+::(\{[^}]*\}|[A-Za-z_]+)' |
		sed -E 's/pub use ([a-z_]+)::\{?([^}]*)\}?/\1 \2/; s/,/ /g')
	while IFS= read -r f; do
		case $f in */tests.rs | */main.rs) continue ;; esac
		from=$(module_of "$f" "$crate")
		[ "$from" = lib ] && continue
		parent=${from%::*}
		[ "$parent" = "$from" ] && parent=""
		# Up to the first #[cfg(test)], without comment lines, groups spelled out
		# (`use crate::{a::{B, C}, d}` is crate::a::B, crate::a::C, crate::d).
		paths_in "$f" | sort -u |
			while IFS= read -r path; do
				case $path in
				crate::[A-Z]*) path=${reexported[${path#crate::}]:-lib} ;;
				crate::*) path=${path#crate::} ;;
				super::*) path=${path#super::}; [ -n "$parent" ] && path=$parent::$path ;;
				esac
				# The longest known module the path starts with.
				target=""
				while [ -n "$path" ]; do
					if [ -n "${known[$path]:-}" ]; then target=$path; break; fi
					[ "${path%::*}" = "$path" ] && break
					path=${path%::*}
				done
				[ -z "$target" ] || [ "$target" = "$from" ] || [ "$target" = lib ] && continue
				echo "$from $target"
			done
	done < <(find "$crate/src" -name '*.rs' | sort)
}

crates=("$@")
[ ${#crates[@]} -gt 0 ] || crates=(patcher vmm)
status=0
for c in "${crates[@]}"; do
	found=$(edges "$c" | sort -u)
	if ! circles=$(tsort 2>&1 >/dev/null <<<"$found"); then :; fi
	if [ -n "$circles" ]; then
		echo "check-imports: $c: modules import each other in a circle:" >&2
		echo "$circles" | sed 's/^tsort: /  /' >&2
		status=1
	else
		echo "check-imports: $c: no import circle ($(grep -c . <<<"$found") edges)"
	fi
done
exit $status

#!/usr/bin/env bash
# Functions short enough to read at once: fails on a function of more than 80 lines in
# the non-test code of vmm/, patcher/ and introspection/ (or the folders named), unless
# a comment just above it says why it must be long (a line with the word "long").
#
#   scripts/check-function-length.sh [DIR...]     # default: vmm/src patcher/src introspection/src
#
# Non-test code: tests.rs files, introspection's synthetic guest (src/synth/) and each
# file from its first `#[cfg(test)] mod` on are left out. A function runs from its `fn`
# line to the line that closes its body, braces counted outside strings and comments.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=80
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(vmm/src patcher/src introspection/src)

long=$(find "${dirs[@]}" -name '*.rs' ! -name tests.rs ! -path '*/synth/*' | sort |
	xargs perl -e '
	my $limit = shift @ARGV;
	for my $f (@ARGV) {
		open my $fh, "<", $f or die "$f: $!";
		my $text = do { local $/; <$fh> };
		$text =~ s/^\s*#\[cfg\(test\)\]\s*\n\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s.*//ms;
		my @l = split /\n/, $text, -1;
		my ($depth, $in_fn, $start, $name, $fn_depth, $why) = (0, 0, 0, "", 0, 0);
		for my $i (0 .. $#l) {
			my $code = $l[$i];
			$code =~ s{//.*$}{};
			$code =~ s{"(?:[^"\\]|\\.)*"}{""}g;
			$code =~ s{\x27(?:[^\x27\\]|\\.)\x27}{\x27\x27}g;
			if (!$in_fn && $code =~ /\bfn\s+([A-Za-z_][A-Za-z0-9_]*)/) {
				($in_fn, $start, $name, $fn_depth, $why) = (1, $i, $1, $depth, 0);
				for (my $k = $i - 1; $k >= 0 && $l[$k] =~ m{^\s*(//|#\[)}; $k--) {
					$why = 1 if $l[$k] =~ /\blong\b/i;
				}
			}
			my $opens = () = $code =~ /\{/g;
			my $closes = () = $code =~ /\}/g;
			$depth += $opens - $closes;
			if ($in_fn && $depth == $fn_depth && ($closes > 0 || $code =~ /;\s*$/)) {
				my $n = $i - $start + 1;
				print "  $f:", $start + 1, ": fn $name is $n lines\n" if $n > $limit && !$why;
				$in_fn = 0;
			}
		}
	}' "$LIMIT")
if [ -n "$long" ]; then
	echo "check-function-length: functions over $LIMIT lines (split them, or say above why one must be long):" >&2
	echo "$long" >&2
	exit 1
fi
echo "check-function-length: no function over $LIMIT lines in ${dirs[*]}"

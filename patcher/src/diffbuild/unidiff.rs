//! The source diff a diff build starts from: a unified diff (`git diff`, `git
//! format-patch`, `diff -u`) read and applied by lpvmm itself, exactly (no fuzz; a hunk
//! may sit at another line than its header says, as in a backport), so that the
//! "after" source is known line by line.
//!
//! Applying writes a `#line N` after every change that moves the lines below it, so each
//! unchanged line keeps its original number: code that embeds `__LINE__` (`WARN_ON`,
//! `might_sleep`, `BUG_ON`) below a change then compiles to the same bytes as the running
//! kernel's, and only the functions the diff really changes differ.

/// One file's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDiff {
    /// The path in the tree (`fs/proc/cmdline.c`: the `a/`/`b/` prefix taken off).
    pub path: String,
    pub hunks: Vec<Hunk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    /// The header's first line of the old text (1-based; 0 for an empty old range).
    pub old_start: usize,
    pub lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Context(String),
    Removed(String),
    Added(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DiffError(pub String);

/// Every file a diff changes, in order. Files created, deleted or renamed are refused
/// (a diff build rebuilds objects the release already has).
pub fn parse(text: &str) -> Result<Vec<FileDiff>, DiffError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut files = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with("--- ") && i + 1 < lines.len() && lines[i + 1].starts_with("+++ ") {
            let path = file_path(lines[i], lines[i + 1])?;
            let (hunks, next) = parse_hunks(&lines, i + 2, &path)?;
            if hunks.is_empty() {
                return Err(DiffError(format!("{path}: no hunk")));
            }
            files.push(FileDiff { path, hunks });
            i = next;
        } else {
            if let Some(what) = ["rename from ", "deleted file mode", "new file mode"]
                .iter()
                .find(|p| lines[i].starts_with(**p))
            {
                return Err(DiffError(format!(
                    "the diff has a '{}' line: a diff build changes files the release has, \
                     it does not create, delete or rename them",
                    what.trim()
                )));
            }
            i += 1;
        }
    }
    if files.is_empty() {
        return Err(DiffError(
            "no file changes in the diff (want a unified diff: ---/+++/@@ lines)".into(),
        ));
    }
    Ok(files)
}

/// The tree path of a `---`/`+++` pair (with `git diff`'s `a/` and `b/` taken off).
fn file_path(old: &str, new: &str) -> Result<String, DiffError> {
    let name = |l: &str| l[4..].split('\t').next().unwrap_or("").trim().to_string();
    let (old, new) = (name(old), name(new));
    if old == "/dev/null" || new == "/dev/null" {
        return Err(DiffError(format!(
            "{} is created or deleted by the diff: a diff build changes files the release \
             has, it does not create or delete them",
            if old == "/dev/null" { &new } else { &old }
        )));
    }
    let strip = |p: &str| {
        p.strip_prefix("a/")
            .or_else(|| p.strip_prefix("b/"))
            .unwrap_or(p)
            .to_string()
    };
    let (old, new) = (strip(&old), strip(&new));
    if old != new {
        return Err(DiffError(format!(
            "the diff renames {old} to {new}: a diff build changes files in place"
        )));
    }
    if new.starts_with('/') || new.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(DiffError(format!(
            "{new}: not a path inside the kernel tree"
        )));
    }
    Ok(new)
}

/// The hunks from `lines[i]` on, and the index after them.
fn parse_hunks(lines: &[&str], mut i: usize, path: &str) -> Result<(Vec<Hunk>, usize), DiffError> {
    let mut hunks = Vec::new();
    while i < lines.len() && lines[i].starts_with("@@") {
        let (old_start, old_len, new_len) = hunk_header(lines[i])
            .ok_or_else(|| DiffError(format!("{path}: bad hunk header '{}'", lines[i])))?;
        i += 1;
        let (mut old, mut new) = (0, 0);
        let mut hunk = Hunk {
            old_start,
            lines: Vec::new(),
        };
        while old < old_len || new < new_len {
            let l = *lines
                .get(i)
                .ok_or_else(|| DiffError(format!("{path}: hunk at line {old_start} ends early")))?;
            i += 1;
            let line = match l.chars().next() {
                Some(' ') | None => Line::Context(l.get(1..).unwrap_or("").to_string()),
                Some('-') => Line::Removed(l[1..].to_string()),
                Some('+') => Line::Added(l[1..].to_string()),
                Some('\\') => continue,
                _ => {
                    return Err(DiffError(format!(
                        "{path}: hunk at line {old_start}: unexpected line '{l}'"
                    )))
                }
            };
            match line {
                Line::Context(_) => (old, new) = (old + 1, new + 1),
                Line::Removed(_) => old += 1,
                Line::Added(_) => new += 1,
            }
            hunk.lines.push(line);
        }
        if old != old_len || new != new_len {
            return Err(DiffError(format!(
                "{path}: hunk at line {old_start} has other line counts than its header"
            )));
        }
        while lines.get(i).is_some_and(|l| l.starts_with('\\')) {
            i += 1;
        }
        hunks.push(hunk);
    }
    Ok((hunks, i))
}

/// `@@ -OLD[,N] +NEW[,N] @@`: (old start, old count, new count).
fn hunk_header(l: &str) -> Option<(usize, usize, usize)> {
    let mut parts = l.strip_prefix("@@ ")?.split(' ');
    let range = |s: &str| -> Option<(usize, usize)> {
        match s.split_once(',') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => Some((s.parse().ok()?, 1)),
        }
    };
    let (os, ol) = range(parts.next()?.strip_prefix('-')?)?;
    let (_, nl) = range(parts.next()?.strip_prefix('+')?)?;
    Some((os, ol, nl))
}

/// `original` with `diff` applied, a `#line` after each change that moves the lines
/// below it. Each hunk must match exactly, at its header's line or, searching outwards,
/// the nearest place after the previous hunk.
pub fn apply(original: &str, diff: &FileDiff) -> Result<String, DiffError> {
    let old: Vec<&str> = original.lines().collect();
    let mut out: Vec<String> = Vec::new();
    let mut at = 0; // next old line (0-based) not yet copied
    for h in &diff.hunks {
        let want: Vec<&str> = h
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Context(s) | Line::Removed(s) => Some(s.as_str()),
                Line::Added(_) => None,
            })
            .collect();
        let start = find(&old, &want, at, h.old_start.saturating_sub(1)).ok_or_else(|| {
            DiffError(format!(
                "{}: the hunk at line {} does not apply to the release's source (was the \
                 diff made for another version? lpvmm applies hunks exactly)",
                diff.path, h.old_start
            ))
        })?;
        out.extend(old[at..start].iter().map(|s| s.to_string()));
        copy_hunk(h, start, &mut out);
        at = start + want.len();
    }
    out.extend(old[at..].iter().map(|s| s.to_string()));
    let mut text = out.join("\n");
    if original.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// The first index `>= from` where `want` matches `old`, nearest to `hint`.
fn find(old: &[&str], want: &[&str], from: usize, hint: usize) -> Option<usize> {
    let fits =
        |s: usize| s >= from && s + want.len() <= old.len() && old[s..s + want.len()] == *want;
    let hint = hint.max(from);
    (0..=old.len()).find_map(|d| {
        [hint.checked_add(d), hint.checked_sub(d)]
            .into_iter()
            .flatten()
            .find(|&s| fits(s))
    })
}

/// The hunk's new lines, with `#line N` (N: the original number of the next line)
/// after each run of changes that leaves the numbering off, where a directive may stand.
fn copy_hunk(h: &Hunk, start: usize, out: &mut Vec<String>) {
    let mut old_line = start; // 0-based index of the next old line
    let mut shift: isize = 0; // output numbering minus original numbering
    let mut owed = false; // a #line is owed before the next context line
    for l in &h.lines {
        match l {
            Line::Context(s) => {
                if owed && shift != 0 && directive_may_follow(out) {
                    out.push(format!("#line {}", old_line + 1));
                    shift = 0;
                    owed = false;
                }
                out.push(s.clone());
                old_line += 1;
            }
            Line::Removed(_) => {
                old_line += 1;
                shift -= 1;
                owed = true;
            }
            Line::Added(s) => {
                out.push(s.clone());
                shift += 1;
                owed = true;
            }
        }
    }
    if owed && shift != 0 && directive_may_follow(out) {
        out.push(format!("#line {}", old_line + 1));
    }
}

/// Whether a preprocessor directive may be the next line: not inside a macro
/// continuation or a block comment.
fn directive_may_follow(out: &[String]) -> bool {
    if out.last().is_some_and(|l| l.trim_end().ends_with('\\')) {
        return false;
    }
    // In a block comment if the last "/*" is after the last "*/" (strings ignored: a
    // kernel source line rarely has either in a literal).
    for l in out.iter().rev() {
        let open = l.rfind("/*");
        let close = l.rfind("*/");
        match (open, close) {
            (Some(o), Some(c)) => return c > o,
            (Some(_), None) => return false,
            (None, Some(_)) => return true,
            (None, None) => continue,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str =
        "int a(void)\n{\n\treturn 1;\n}\n\nint b(void)\n{\n\tWARN_ON(1);\n\treturn 2;\n}\n";

    fn diff(body: &str) -> String {
        format!("diff --git a/x.c b/x.c\nindex 1..2 100644\n--- a/x.c\n+++ b/x.c\n{body}")
    }

    #[test]
    fn an_added_line_is_followed_by_a_line_directive_that_keeps_the_numbers_below() {
        let d = parse(&diff(
            "@@ -1,4 +1,5 @@\n int a(void)\n {\n+\tfoo();\n \treturn 1;\n }\n",
        ))
        .unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].path, "x.c");
        let after = apply(ORIGINAL, &d[0]).unwrap();
        let lines: Vec<&str> = after.lines().collect();
        assert_eq!(lines[2], "\tfoo();");
        // `return 1;` was line 3 and still is.
        assert_eq!(lines[3], "#line 3");
        assert_eq!(lines[4], "\treturn 1;");
        assert!(after.ends_with("return 2;\n}\n"));
    }

    #[test]
    fn a_change_that_keeps_the_line_count_needs_no_directive() {
        let d = parse(&diff("@@ -3 +3 @@\n-\treturn 1;\n+\treturn 3;\n")).unwrap();
        let after = apply(ORIGINAL, &d[0]).unwrap();
        assert_eq!(after, ORIGINAL.replace("return 1;", "return 3;"));
    }

    #[test]
    fn a_hunk_is_found_away_from_its_header_line_but_never_fuzzily() {
        let moved = format!("/* one */\n/* two */\n{ORIGINAL}");
        let d = parse(&diff(
            "@@ -8,2 +8,2 @@\n-\tWARN_ON(1);\n+\tWARN_ON(0);\n \treturn 2;\n",
        ))
        .unwrap();
        assert!(apply(&moved, &d[0]).unwrap().contains("WARN_ON(0)"));
        let d = parse(&diff(
            "@@ -8,2 +8,2 @@\n-\tWARN_ON(2);\n+\tWARN_ON(0);\n \treturn 2;\n",
        ))
        .unwrap();
        let e = apply(ORIGINAL, &d[0]).unwrap_err().to_string();
        assert!(e.contains("x.c: the hunk at line 8 does not apply"), "{e}");
    }

    #[test]
    fn new_deleted_and_renamed_files_are_refused() {
        let e = parse("--- /dev/null\n+++ b/y.c\n@@ -0,0 +1 @@\n+x\n").unwrap_err();
        assert!(e.0.contains("y.c is created or deleted"), "{e}");
        let e = parse("--- a/x.c\n+++ b/y.c\n@@ -1 +1 @@\n-x\n+y\n").unwrap_err();
        assert!(e.0.contains("renames x.c to y.c"), "{e}");
        let e = parse("--- a/../x.c\n+++ b/../x.c\n@@ -1 +1 @@\n-x\n+y\n").unwrap_err();
        assert!(e.0.contains("not a path inside"), "{e}");
        assert!(parse("just text\n").is_err());
        let e = parse(&diff("@@ -1,3 +1,3 @@\n a\n")).unwrap_err();
        assert!(e.0.contains("ends early"), "{e}");
    }

    #[test]
    fn no_directive_inside_a_macro_continuation_or_a_comment() {
        let orig = "#define X \\\n\t1\nint y;\n/* a\n b */\nint z;\n";
        let d = parse(&diff(
            "@@ -1,3 +1,4 @@\n #define X \\\n+\t2 + \\\n \t1\n int y;\n",
        ))
        .unwrap();
        let after = apply(orig, &d[0]).unwrap();
        // The directive waits for the end of the macro.
        assert_eq!(after.lines().nth(2), Some("\t1"));
        assert_eq!(after.lines().nth(3), Some("#line 3"));
        let d = parse(&diff("@@ -4,2 +4,3 @@\n /* a\n+ c\n  b */\n")).unwrap();
        let after = apply(orig, &d[0]).unwrap();
        assert!(after.contains("b */\n#line 6\nint z;"), "{after}");
    }
}

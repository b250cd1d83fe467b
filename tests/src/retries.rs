//! Every retry the harness makes, filed with its evidence, and the run's budget of them.
//!
//! A suite run (scripts/test.sh) sets `LPVMM_TEST_LOG_DIR` to a folder of its own; each
//! test binary files there one file per retry (`retry-N-TEST.txt`: the test, the
//! signature the decision named, then the whole evidence: VMM stderr with lpvmm's
//! post-mortem, the test host's trace, the guest console's tail). A run gets
//! [`RETRY_BUDGET`] retries in all: past that, a failure that would have been retried
//! fails, and scripts/test.sh fails the run and lists every file. A test binary run on
//! its own files into a folder of its own process.

use std::io::Write;
use std::path::PathBuf;

/// Retries one suite run may make (boot retries and test retries together).
pub const RETRY_BUDGET: usize = 3;

/// The folder this run files its retries in.
pub fn log_dir() -> PathBuf {
    match std::env::var_os("LPVMM_TEST_LOG_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("lpvmm-test-logs-{}", std::process::id())),
    }
}

fn filed(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("retry-"))
                .count()
        })
        .unwrap_or(0)
}

/// File a retry of `test` (with `signature`, and the `evidence`) in `dir`, or say why it
/// may not be made: the budget is spent, or the evidence cannot be kept.
pub fn file_retry_in(
    dir: &std::path::Path,
    test: &str,
    signature: &str,
    evidence: &str,
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let safe: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    loop {
        let n = filed(dir);
        if n >= RETRY_BUDGET {
            return Err(format!(
                "this run has made its {RETRY_BUDGET} retries already (their evidence is in {}): \
                 no more",
                dir.display()
            ));
        }
        let path = dir.join(format!("retry-{}-{safe}.txt", n + 1));
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path);
        match created {
            Ok(mut f) => {
                write!(f, "test: {test}\nsignature: {signature}\n\n{evidence}\n")
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                return Ok(path);
            }
            // Another test binary filed number n+1 meanwhile: count again.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
    }
}

/// How many retries this run has filed so far.
pub fn filed_retries() -> usize {
    filed(&log_dir())
}

/// [`file_retry_in`] this run's [`log_dir`].
pub fn file_retry(test: &str, signature: &str, evidence: &str) -> Result<PathBuf, String> {
    file_retry_in(&log_dir(), test, signature, evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_retry_is_filed_until_the_budget_is_spent() {
        let dir = std::env::temp_dir().join(format!("lpvmm-retries-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for n in 1..=RETRY_BUDGET {
            let path = file_retry_in(&dir, "some_test_6_1", "sig", "evidence").unwrap();
            assert_eq!(
                path.file_name().unwrap().to_string_lossy(),
                format!("retry-{n}-some_test_6_1.txt")
            );
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("test: some_test_6_1\nsignature: sig\n"),
                "{text}"
            );
        }
        let e = file_retry_in(&dir, "another", "sig", "evidence").unwrap_err();
        assert!(e.contains("retries already"), "{e}");
        assert_eq!(filed(&dir), RETRY_BUDGET);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

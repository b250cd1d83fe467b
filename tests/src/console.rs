//! A byte stream (serial port socket or child pipe) read by a background thread into a
//! buffer that tests wait on with timeouts.

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Buffer {
    data: Vec<u8>,
    /// Bytes before this offset were consumed by earlier waits.
    consumed: usize,
    closed: bool,
}

pub struct Console {
    buf: Arc<(Mutex<Buffer>, Condvar)>,
    writer: Box<dyn Write + Send>,
    /// Label for messages and the log echo.
    label: String,
}

impl Console {
    pub fn new(
        label: &str,
        mut reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
    ) -> Console {
        let buf: Arc<(Mutex<Buffer>, Condvar)> = Arc::default();
        let b = buf.clone();
        let echo = std::env::var_os("LPVMM_TEST_ECHO").is_some();
        let tag = label.to_string();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                let n = reader.read(&mut chunk).unwrap_or(0);
                let (m, cv) = &*b;
                let mut g = m.lock().unwrap();
                if n == 0 {
                    g.closed = true;
                    cv.notify_all();
                    return;
                }
                if echo {
                    eprint!("[{tag}] {}", String::from_utf8_lossy(&chunk[..n]));
                }
                g.data.extend_from_slice(&chunk[..n]);
                cv.notify_all();
            }
        });
        Console {
            buf,
            writer: Box::new(writer),
            label: label.to_string(),
        }
    }

    pub fn send(&mut self, s: &str) -> Result<(), String> {
        self.writer
            .write_all(s.as_bytes())
            .and_then(|_| self.writer.flush())
            .map_err(|e| format!("{}: write failed: {e}", self.label))
    }

    /// Wait until `find` locates something in the unconsumed output; consume up to the
    /// end of the match and return (text before the match, the match).
    pub fn wait_for<F>(
        &self,
        what: &str,
        timeout: Duration,
        find: F,
    ) -> Result<(String, String), String>
    where
        F: Fn(&str) -> Option<(usize, usize)>,
    {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.buf;
        let mut g = m.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&g.data[g.consumed..]).into_owned();
            if let Some((start, end)) = find(&text) {
                let before = text[..start].to_string();
                let matched = text[start..end].to_string();
                g.consumed += text[..end].len();
                return Ok((before, matched));
            }
            if g.closed {
                // A kernel report (the test host's own panic, say) is shown from its start.
                let report = ["------------[ cut here ]", "BUG:", "Oops", "Kernel panic"]
                    .iter()
                    .filter_map(|m| text.find(m))
                    .min();
                let shown = match report {
                    Some(i) => tail(&text[i..], 20000),
                    None => tail(&text, 3000),
                };
                return Err(format!(
                    "{}: stream closed while waiting for {what}; last output:\n{shown}",
                    self.label
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{}: timed out after {timeout:?} waiting for {what}; last output:\n{}",
                    self.label,
                    tail(&text, 3000)
                ));
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Wait for a literal string.
    pub fn wait_str(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for(needle, timeout, |t| {
            t.find(needle).map(|i| (i, i + needle.len()))
        })
        .map(|(before, _)| before)
    }

    /// Wait for a line starting with `prefix`; return the whole line.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for(prefix, timeout, |t| {
            let i = t.find(prefix)?;
            let end = t[i..].find('\n')? + i;
            Some((i, end + 1))
        })
        .map(|(_, line)| line.trim().to_string())
    }

    /// How many bytes the stream has delivered so far (to tell a silent one).
    pub fn received(&self) -> usize {
        self.buf.0.lock().unwrap().data.len()
    }

    /// The last `n` bytes received, consumed or not (consumes nothing): what a console
    /// showed last, as evidence.
    pub fn last(&self, n: usize) -> String {
        let g = self.buf.0.lock().unwrap();
        let from = g.data.len().saturating_sub(n);
        String::from_utf8_lossy(&g.data[from..]).into_owned()
    }

    /// Everything received and not yet consumed (consumes it).
    pub fn drain(&self) -> String {
        let (m, _) = &*self.buf;
        let mut g = m.lock().unwrap();
        let text = String::from_utf8_lossy(&g.data[g.consumed..]).into_owned();
        g.consumed = g.data.len();
        text
    }
}

/// The first `n` bytes of `s` (at a character boundary).
pub fn head(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

//! qmp-cycles: pause and resume a QEMU guest through QMP, the peer of `lpvmm bench
//! pause` in `bench pause-deaths` (tests/src/bin/bench/pause_deaths.rs). It runs on the test host.
//!
//!   qmp-cycles SOCK CYCLES   connect to QEMU's QMP socket, then CYCLES times `stop`
//!                            and `cont`, each waiting for its `{"return": {}}`; prints
//!                            `qmp-cycles: OK cycles=N median_stop_us=... median_cont_us=...`
//!                            or what went wrong, and exits 1 then.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use lpvmm_tests::stats::median_of;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [sock, cycles] => cycles
            .parse()
            .map_err(|e| format!("CYCLES: {e}"))
            .and_then(|n| run(sock, n)),
        _ => Err("usage: qmp-cycles SOCK CYCLES".into()),
    };
    match result {
        Ok(line) => println!("qmp-cycles: OK {line}"),
        Err(e) => {
            println!("qmp-cycles: FAILED {e}");
            std::process::exit(1);
        }
    }
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(sock: &str) -> Result<Qmp, String> {
        let s = UnixStream::connect(sock).map_err(|e| format!("connect {sock}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = q.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities")?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => Err("QEMU closed the QMP socket".into()),
            Ok(_) => Ok(l),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Run one command; events (STOP, RESUME) that come before its return are skipped.
    fn execute(&mut self, cmd: &str) -> Result<(), String> {
        writeln!(self.writer, "{{\"execute\":\"{cmd}\"}}").map_err(|e| e.to_string())?;
        for _ in 0..16 {
            let l = self.line()?;
            if l.contains("\"return\"") {
                return Ok(());
            }
            if l.contains("\"error\"") {
                return Err(format!("{cmd}: {}", l.trim()));
            }
        }
        Err(format!("{cmd}: no return after 16 lines"))
    }
}

/// The median of `v` in µs (the upper middle value of an even count; 0 when empty).
fn median_us(v: &[Duration]) -> u128 {
    median_of(v).map_or(0, |d| d.as_micros())
}

fn run(sock: &str, cycles: u32) -> Result<String, String> {
    let mut q = Qmp::connect(sock)?;
    let (mut stops, mut conts) = (Vec::new(), Vec::new());
    for i in 0..cycles {
        let t = Instant::now();
        q.execute("stop").map_err(|e| format!("cycle {i}: {e}"))?;
        stops.push(t.elapsed());
        let t = Instant::now();
        q.execute("cont").map_err(|e| format!("cycle {i}: {e}"))?;
        conts.push(t.elapsed());
    }
    Ok(format!(
        "cycles={cycles} median_stop_us={} median_cont_us={}",
        median_us(&stops),
        median_us(&conts)
    ))
}

//! ctl-probe: a hostile client of lpvmm's control socket, for the control-socket tests
//! (tests/tests/control.rs). It runs on the test host and prints what the server did;
//! the tests judge it.
//!
//!   ctl-probe send SOCK HEXLINE...   send each line (hex of its bytes, without the
//!                                    newline), print each response or CLOSED
//!   ctl-probe flood SOCK             one line that never ends, as fast as the server
//!                                    reads: print the bytes written and the response
//!   ctl-probe dribble SOCK SECS      one byte every 10 ms for SECS, no newline: print
//!                                    whether the server kept the connection
//!   ctl-probe many SOCK N            N connections open at once, a status request on
//!                                    each: print how many were answered
//!   ctl-probe as-uid UID SOCK        as user UID (needs root), a status request: print
//!                                    the connect error, CLOSED, or the response

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const STATUS: &[u8] = b"{\"v\":1,\"op\":\"status\"}\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["send", sock, lines @ ..] => send(sock, lines),
        ["flood", sock] => flood(sock),
        ["dribble", sock, secs] => secs
            .parse()
            .map_err(|e| format!("SECS: {e}"))
            .and_then(|s| dribble(sock, s)),
        ["many", sock, n] => n
            .parse()
            .map_err(|e| format!("N: {e}"))
            .and_then(|n| many(sock, n)),
        ["as-uid", uid, sock] => uid
            .parse()
            .map_err(|e| format!("UID: {e}"))
            .and_then(|u| as_uid(u, sock)),
        _ => Err("usage: see the header of tests/src/bin/ctl-probe.rs".into()),
    };
    if let Err(e) = result {
        eprintln!("ctl-probe: {e}");
        std::process::exit(2);
    }
}

fn connect(sock: &str) -> Result<UnixStream, String> {
    let s = UnixStream::connect(sock).map_err(|e| format!("connect {sock}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// One response line, or None when the server closed the connection first.
fn response(reader: &mut impl BufRead) -> Result<Option<String>, String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(line.trim_end().to_string())),
        // A reset after the server closed on us counts as closed.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(format!("reading a response: {e}")),
    }
}

fn unhex(h: &str) -> Result<Vec<u8>, String> {
    if !h.len().is_multiple_of(2) {
        return Err(format!("odd hex {h}"));
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).map_err(|e| format!("hex {h}: {e}")))
        .collect()
}

fn send(sock: &str, lines: &[&str]) -> Result<(), String> {
    let mut s = connect(sock)?;
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    for hex in lines {
        let mut line = unhex(hex)?;
        line.push(b'\n');
        if s.write_all(&line).is_err() {
            println!("CLOSED");
            return Ok(());
        }
        match response(&mut reader)? {
            Some(r) => println!("{r}"),
            None => {
                println!("CLOSED");
                return Ok(());
            }
        }
    }
    Ok(())
}

fn flood(sock: &str) -> Result<(), String> {
    let s = connect(sock)?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || {
        let chunk = [b'a'; 65536];
        let mut wrote: u64 = 0;
        // Until the server closes (EPIPE/ECONNRESET), or a bound far past its limit.
        while wrote < 1 << 30 {
            match w.write(&chunk) {
                Ok(n) => wrote += n as u64,
                Err(_) => break,
            }
        }
        wrote
    });
    let got = response(&mut BufReader::new(s))?;
    let wrote = writer.join().map_err(|_| "writer thread panicked")?;
    println!("wrote={wrote}");
    println!("{}", got.as_deref().unwrap_or("CLOSED"));
    Ok(())
}

fn dribble(sock: &str, secs: u64) -> Result<(), String> {
    let mut s = connect(sock)?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        if s.write_all(b"x").is_err() {
            println!("closed-by-server after {sent} bytes");
            return Ok(());
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    // The server holds an unfinished line; nothing came back for it.
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            println!("still-open after {sent} bytes")
        }
        Ok(0) => println!("closed-by-server after {sent} bytes"),
        other => println!("unexpected {other:?} after {sent} bytes"),
    }
    Ok(())
}

fn many(sock: &str, n: usize) -> Result<(), String> {
    let conns: Vec<UnixStream> = (0..n).map(|_| connect(sock)).collect::<Result<_, _>>()?;
    let mut answered = 0;
    for c in &conns {
        (&*c).write_all(STATUS).map_err(|e| format!("send: {e}"))?;
    }
    for c in &conns {
        let mut r = BufReader::new(c);
        if let Some(line) = response(&mut r)? {
            if line.contains("\"ok\":true") {
                answered += 1;
            }
        }
    }
    println!("answered={answered} of {n}");
    Ok(())
}

fn as_uid(uid: u32, sock: &str) -> Result<(), String> {
    // SAFETY: setgid/setuid change this process's credentials; nothing else runs yet.
    let dropped = unsafe { libc::setgid(uid) == 0 && libc::setuid(uid) == 0 };
    if !dropped {
        return Err(format!(
            "cannot become uid {uid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut s = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-error: {e}");
            return Ok(());
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    if s.write_all(STATUS).is_err() {
        println!("CLOSED");
        return Ok(());
    }
    match response(&mut BufReader::new(s))? {
        Some(r) => println!("response: {r}"),
        None => println!("CLOSED"),
    }
    Ok(())
}

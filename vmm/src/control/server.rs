//! The VMM side of the control socket, driven by the main event loop.

use std::collections::HashMap;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::rundir;
use crate::devices::StopReason;
use crate::proto::{
    ErrorKind, Request, RequestLine, ResponseLine, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};
use crate::session::patching::TransitionArgs;
use crate::session::Session;

/// The bound socket file; removed when dropped, so that no stale socket outlives the VM.
pub struct SocketFile {
    path: PathBuf,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Refuse a name whose socket answers; clear a stale socket nobody answers on.
pub fn claim_name(name: &str) -> Result<PathBuf> {
    rundir::validate_name(name)?;
    let dir = rundir::runtime_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create runtime directory {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    let path = rundir::socket_path(name);
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            bail!(
                "a VM named '{name}' is already running (socket {}); choose another --name \
                 or stop it with `lpvmm stop {name}`",
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    Ok(path)
}

/// Bind the control socket with mode 0600 from the start (umask around bind).
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile)> {
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("cannot bind {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
        },
    ))
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

pub struct ControlServer {
    listener: UnixListener,
    conns: HashMap<RawFd, Conn>,
    session: Arc<Mutex<Session>>,
    uid: u32,
}

impl ControlServer {
    pub fn new(listener: UnixListener, session: Arc<Mutex<Session>>) -> Self {
        ControlServer {
            listener,
            conns: HashMap::new(),
            session,
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            match peer_uid(&stream) {
                Some(uid) if uid == self.uid || uid == 0 => {}
                other => {
                    tracing::warn!("refused control connection from uid {other:?}");
                    continue;
                }
            }
            let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.conns.insert(
                    fd,
                    Conn {
                        stream,
                        buf: Vec::new(),
                    },
                );
            }
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(conn) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::new(&conn.stream, EventSet::IN));
        }
    }

    /// Read what is there; answer every complete line. Returns false to close.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 65536];
        let n = match conn.stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e)
                if e.kind() == IoErrorKind::WouldBlock || e.kind() == IoErrorKind::Interrupted =>
            {
                return true
            }
            Err(_) => return false,
        };
        // Only the new bytes can hold a newline: scanning the whole buffer at every read
        // made a never-ending line cost time quadratic in its length (the api thread
        // spent minutes on one 8 MiB line under nested TCG).
        let mut from = conn.buf.len();
        conn.buf.extend_from_slice(&chunk[..n]);
        while let Some(off) = conn.buf[from..].iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=from + off).collect();
            from = 0;
            let resp = handle_line(&self.session, &line);
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            if conn.stream.write_all(&out).is_err() {
                return false;
            }
        }
        if conn.buf.len() > MAX_REQUEST_BYTES {
            let resp = ResponseLine::err(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            );
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = conn.stream.write_all(&out);
            return false;
        }
        true
    }
}

fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length on a valid socket fd.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// One request line in, one response out. Never panics on any input.
pub fn handle_line(session: &Mutex<Session>, line: &[u8]) -> ResponseLine {
    let parsed: RequestLine = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return ResponseLine::err(ErrorKind::BadRequest, format!("bad request: {e}")),
    };
    if parsed.v != PROTOCOL_VERSION {
        return ResponseLine::err(
            ErrorKind::BadRequest,
            format!(
                "protocol version {} not supported (this lpvmm speaks {PROTOCOL_VERSION})",
                parsed.v
            ),
        );
    }
    let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
    dispatch(&mut s, parsed.request)
}

fn reply<T: serde::Serialize, E: Into<anyhow::Error>>(r: Result<T, E>) -> ResponseLine {
    match r.map_err(Into::into) {
        Ok(v) => ResponseLine::ok(v),
        Err(e) => {
            // Refusals of the patch engine are about the VM's state, not failures.
            let refused = e
                .downcast_ref::<patcher::KpError>()
                .is_some_and(patcher::KpError::is_refusal);
            let kind = match refused {
                true => ErrorKind::BadState,
                false => ErrorKind::Failed,
            };
            ResponseLine::err(kind, crate::error_line(e.as_ref()))
        }
    }
}

fn dispatch(s: &mut Session, request: Request) -> ResponseLine {
    let bad_state = |e: String| ResponseLine::err(ErrorKind::BadState, e);
    let args = |consistency, timeout_ms| TransitionArgs {
        consistency,
        timeout_ms,
    };
    match request {
        Request::Status => ResponseLine::ok(s.vm.status()),
        Request::Pause => {
            if s.vm.is_paused() {
                return bad_state(format!("VM '{}' is already paused", s.vm.config.name));
            }
            reply(s.vm.pause())
        }
        Request::Resume => {
            if !s.vm.is_paused() {
                return bad_state(format!("VM '{}' is not paused", s.vm.config.name));
            }
            reply(s.vm.resume())
        }
        Request::Regs => reply(s.vm.regs()),
        Request::Vmcoreinfo => reply(s.vm.vmcoreinfo()),
        Request::Kernel { reattach } => reply(s.kernel_info(reattach)),
        Request::Sym { query } => reply(s.sym(query)),
        Request::Tasks => reply(s.tasks()),
        Request::Modules => reply(s.modules()),
        Request::Shadow => reply(s.shadow()),
        Request::Stack { pid } => reply(s.stack(pid)),
        Request::Disasm { symbol, sympos } => reply(s.disasm(&symbol, sympos)),
        Request::PatchLoad {
            kp_hex,
            params,
            enable,
            timeout_ms,
            consistency,
        } => reply(s.patch_load(&kp_hex, &params, enable, args(consistency, timeout_ms))),
        Request::KpInspect { kp_hex, params } => reply(s.kp_inspect(&kp_hex, &params)),
        Request::PatchEnable {
            name,
            timeout_ms,
            consistency,
        } => reply(s.patch_transition(&name, patcher::Op::Enable, args(consistency, timeout_ms))),
        Request::PatchDisable {
            name,
            timeout_ms,
            consistency,
        } => reply(s.patch_transition(&name, patcher::Op::Disable, args(consistency, timeout_ms))),
        Request::PatchReverse => reply(s.patch_request(patcher::Request::Reverse)),
        Request::PatchForce => reply(s.patch_request(patcher::Request::Force)),
        Request::PatchUnload { name } => reply(s.patch_unload(&name)),
        Request::PatchStatus => ResponseLine::ok(s.patch_status()),
        Request::Checksum { what } => reply(s.checksum(what)),
        Request::ReadPhys { addr, len } => {
            if !s.vm.is_paused() {
                return bad_state(format!(
                    "VM '{}' must be paused to read its memory",
                    s.vm.config.name
                ));
            }
            reply(s.vm.read_phys(addr, len))
        }
        Request::Stop => {
            s.vm.devices.request_stop(StopReason::Requested(
                "stop requested over the control socket".into(),
            ));
            ResponseLine::ok(serde_json::json!({ "stopping": true }))
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("cannot watch the control socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let keep = events.event_set().contains(EventSet::IN) && self.serve(fd);
        if !keep {
            self.close(fd, ops);
        }
    }
}

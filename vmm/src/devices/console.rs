//! The guest's serial console on lpvmm's stdin/stdout.
//!
//! Input is read from stdin into a bounded queue and fed into the 16550's receive FIFO
//! as the guest drains it. When stdin is a terminal it is put in raw mode (restored
//! exactly on exit) so that the guest's shell gets every key, Ctrl-C included; the
//! escape `Ctrl-A x` ends the VM, as in QEMU.

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{Devices, StopReason};

const ESCAPE: u8 = 0x01; // Ctrl-A
const PENDING_MAX: usize = 64 * 1024;

/// Restores the terminal's original settings when dropped.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; a no-op otherwise.
    pub fn enter() -> RawTerminal {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        unsafe {
            if libc::isatty(fd) != 1 {
                return RawTerminal { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return RawTerminal { saved: None };
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
            RawTerminal { saved: Some(saved) }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restoring settings read from the same fd.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }
}

pub struct Console {
    devices: Arc<Devices>,
    drained: EventFd,
    pending: VecDeque<u8>,
    stdin_watched: bool,
    saw_escape: bool,
    interactive: bool,
}

impl Console {
    pub fn new(devices: Arc<Devices>, drained: EventFd, interactive: bool) -> Self {
        Console {
            devices,
            drained,
            pending: VecDeque::new(),
            stdin_watched: false,
            saw_escape: false,
            interactive,
        }
    }

    fn stdin_events() -> Events {
        Events::new_raw(libc::STDIN_FILENO, EventSet::IN)
    }

    /// Move as much pending input into the serial FIFO as it has room for.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut serial = self
            .devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let room = serial.fifo_capacity();
        if room == 0 {
            return;
        }
        let n = room.min(self.pending.len());
        let chunk: Vec<u8> = self.pending.iter().take(n).copied().collect();
        if let Ok(accepted) = serial.enqueue_raw_bytes(&chunk) {
            self.pending.drain(..accepted);
        }
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 4096];
        let n = match std::io::stdin().lock().read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(_) => 0,
        };
        if n == 0 {
            // End of input: the guest keeps running without a keyboard.
            let _ = ops.remove(Self::stdin_events());
            self.stdin_watched = false;
            return;
        }
        for &b in &buf[..n] {
            if self.interactive && self.saw_escape {
                self.saw_escape = false;
                match b {
                    b'x' | b'X' => {
                        self.devices
                            .request_stop(StopReason::Requested("Ctrl-A x on the console".into()));
                        return;
                    }
                    ESCAPE => {} // Ctrl-A Ctrl-A sends one Ctrl-A
                    _ => continue,
                }
            } else if self.interactive && b == ESCAPE {
                self.saw_escape = true;
                continue;
            }
            if self.pending.len() < PENDING_MAX {
                self.pending.push_back(b);
            }
        }
        self.flush();
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        self.stdin_watched = ops.add(Self::stdin_events()).is_ok();
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            tracing::error!("cannot watch the serial input queue: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.flush();
        } else if events.fd() == libc::STDIN_FILENO {
            if events.event_set().contains(EventSet::IN) {
                self.read_stdin(ops);
            } else if self.stdin_watched {
                let _ = ops.remove(Self::stdin_events());
                self.stdin_watched = false;
            }
        }
    }
}

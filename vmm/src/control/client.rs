//! The CLI side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;

use super::rundir;
use crate::proto::{Request, RequestLine, ResponseLine, PROTOCOL_VERSION};

pub struct Client {
    name: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(name: &str) -> Result<Self> {
        rundir::validate_name(name)?;
        let path = rundir::socket_path(name);
        let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "no VM named '{name}' ({} does not exist; `lpvmm ls` lists running VMs)",
                path.display()
            ),
            std::io::ErrorKind::ConnectionRefused => anyhow!(
                "VM '{name}' is not running (stale socket {})",
                path.display()
            ),
            _ => anyhow!("cannot connect to VM '{name}' at {}: {e}", path.display()),
        })?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .context("socket timeout")?;
        Ok(Client {
            name: name.to_string(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Send one request; return the raw response.
    pub fn call_raw(&mut self, request: Request) -> Result<ResponseLine> {
        let mut line = serde_json::to_string(&RequestLine {
            v: PROTOCOL_VERSION,
            request,
        })?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("sending to VM '{}'", self.name))?;
        let mut resp = String::new();
        let n = self
            .reader
            .read_line(&mut resp)
            .with_context(|| format!("reading from VM '{}'", self.name))?;
        if n == 0 {
            bail!("VM '{}' closed the connection without answering", self.name);
        }
        serde_json::from_str(&resp).with_context(|| format!("bad response from VM '{}'", self.name))
    }

    /// Send one request; a refusal becomes an error with the server's message.
    pub fn call<T: DeserializeOwned>(&mut self, request: Request) -> Result<T> {
        let resp = self.call_raw(request)?;
        if !resp.ok {
            let e = resp.error.map(|e| e.message).unwrap_or_default();
            bail!("VM '{}': {e}", self.name);
        }
        serde_json::from_value(resp.result.unwrap_or_default())
            .with_context(|| format!("unexpected result from VM '{}'", self.name))
    }
}

//! A blocking client of the local API for the daemon's own requests (plugins, status),
//! used by `strata`, tests and benchmarks. Its errors are the client library's
//! ([`strata_client::ClientError`]); chunk spaces have their own typed client there.

use super::{Reply, Request};
use std::os::unix::net::UnixStream;
use std::path::Path;
use strata_client::frame::exchange;
pub use strata_client::ClientError;

/// A connection to `stratad`.
pub struct Client {
    s: UnixStream,
    path: std::path::PathBuf,
}

impl Client {
    /// Connect to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Client {
            s,
            path: path.to_owned(),
        })
    }

    /// Send a request (with a payload) and read the reply; an error reply becomes `Err`.
    pub fn request(&mut self, req: &Request, payload: &[u8]) -> Result<Reply, ClientError> {
        let mut r = &self.s;
        let (mut reply, _): (Reply, Vec<u8>) = exchange(&mut &self.s, &mut r, req, payload)?;
        if matches!(&reply, Reply::Error(e) if e.kind == "idle") {
            // closed for idleness before the request was read: connect again, send again
            self.s = Client::connect(&self.path)?.s;
            let mut r = &self.s;
            (reply, _) = exchange(&mut &self.s, &mut r, req, payload)?;
        }
        match reply {
            Reply::Error(e) => Err(ClientError::Api(strata_client::ApiError {
                kind: e.kind,
                fault: serde_json::to_value(e.fault)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                message: e.message,
                errno: e.errno,
            })),
            r => Ok(r),
        }
    }
}

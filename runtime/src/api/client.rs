//! A blocking client of the local API (used by `strata`, tests and benchmarks).

use super::{read_frame, write_frame, ApiError, FrameError, Reply, Request};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon could not be reached.
    #[error("cannot reach stratad at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("connection to stratad failed: {0}")]
    Frame(#[from] FrameError),
    /// The daemon refused the request.
    #[error("{0}")]
    Api(ApiError),
}

/// A connection to `stratad`.
pub struct Client {
    s: UnixStream,
}

impl Client {
    /// Connect to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Client { s })
    }

    /// Send a request (with a payload) and read the reply; an error reply becomes `Err`.
    pub fn request(&mut self, req: &Request, payload: &[u8]) -> Result<Reply, ClientError> {
        write_frame(&mut self.s, req, payload).map_err(FrameError::Io)?;
        let (reply, _): (Reply, Vec<u8>) = read_frame(&mut self.s)?;
        match reply {
            Reply::Error(e) => Err(ClientError::Api(e)),
            r => Ok(r),
        }
    }
}

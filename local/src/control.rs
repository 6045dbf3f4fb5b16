//! The control socket `ROOT/control.sock`: domain management (docs/local-platform.md,
//! "Control socket").
//!
//! A line protocol (UTF-8, each line ends with `\n`, at most [`MAX_LINE`] bytes). The client
//! sends one request line and reads one reply before the next request; a connection may carry
//! any number of requests.
//!
//! | request | reply |
//! |---|---|
//! | `create [domid=N] [name=NAME]` | `ok N` |
//! | `destroy N` | `ok` |
//! | `list` | `ok K`, then `K` lines `N NAME` in domid order (dom0 included) |
//! | `ping` | `ok xenpv-local PID` |
//!
//! Any failure is answered `err MESSAGE` (one line, the message names the fix); a malformed or
//! over-long line is answered with `err` and the connection is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::{DomainInfo, Error, Result};

/// The longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 1024;

/// One request of the control protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create a domain: the given or the next free domid, the given or a default name.
    Create {
        /// The domid wanted.
        domid: Option<u32>,
        /// The name wanted.
        name: Option<String>,
    },
    /// Destroy a domain.
    Destroy(u32),
    /// List the domains.
    List,
    /// Is the daemon alive?
    Ping,
}

impl Request {
    /// Parses a request line (without its newline).
    pub fn parse(line: &str) -> std::result::Result<Request, String> {
        let mut words = line.split(' ').filter(|w| !w.is_empty());
        let verb = words.next().ok_or("empty request")?;
        let num = |w: &str| {
            w.parse::<u32>()
                .map_err(|_| format!("{w:?} is not a domain id"))
        };
        let req = match verb {
            "create" => {
                let (mut domid, mut name) = (None, None);
                for w in words.by_ref() {
                    if let Some(v) = w.strip_prefix("domid=") {
                        domid = Some(num(v)?);
                    } else if let Some(v) = w.strip_prefix("name=") {
                        name = Some(v.to_owned());
                    } else {
                        return Err(format!("create: unknown argument {w:?}"));
                    }
                }
                Request::Create { domid, name }
            }
            "destroy" => Request::Destroy(num(words.next().ok_or("destroy: which domid?")?)?),
            "list" => Request::List,
            "ping" => Request::Ping,
            v => {
                return Err(format!(
                    "unknown request {v:?} (create, destroy, list, ping)"
                ))
            }
        };
        match words.next() {
            Some(w) => Err(format!("{verb}: unexpected {w:?}")),
            None => Ok(req),
        }
    }

    /// The request line (without its newline).
    pub fn to_line(&self) -> String {
        match self {
            Request::Create { domid, name } => {
                let mut s = String::from("create");
                if let Some(d) = domid {
                    s.push_str(&format!(" domid={d}"));
                }
                if let Some(n) = name {
                    s.push_str(&format!(" name={n}"));
                }
                s
            }
            Request::Destroy(d) => format!("destroy {d}"),
            Request::List => "list".into(),
            Request::Ping => "ping".into(),
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at end of file.
pub(crate) fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    r.by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.pop() != Some(b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes or cut short"),
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "line is not UTF-8"))
}

/// A client of a running daemon's control socket.
#[derive(Debug)]
pub struct Control {
    root: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// Connects to the daemon at state directory `root`.
    pub fn connect(root: &Path) -> Result<Control> {
        let not_running = |source| Error::NotRunning {
            root: root.to_path_buf(),
            source,
        };
        let s = UnixStream::connect(crate::control_path(root)).map_err(not_running)?;
        let writer = s.try_clone().map_err(not_running)?;
        Ok(Control {
            root: root.to_path_buf(),
            reader: BufReader::new(s),
            writer,
        })
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io {
            what: "talk to the daemon over",
            path: crate::control_path(&self.root),
            source,
        }
    }

    /// Sends `req`, returns the words after `ok`.
    fn call(&mut self, req: &Request) -> Result<String> {
        let line = format!("{}\n", req.to_line());
        if line.len() > MAX_LINE {
            return Err(Error::Protocol(format!(
                "request longer than {MAX_LINE} bytes"
            )));
        }
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))?;
        let reply = read_line(&mut self.reader)
            .map_err(|e| self.io(e))?
            .ok_or_else(|| Error::Protocol("the daemon hung up".into()))?;
        if let Some(rest) = reply.strip_prefix("ok") {
            Ok(rest.trim_start().to_owned())
        } else if let Some(msg) = reply.strip_prefix("err ") {
            Err(Error::Remote(msg.to_owned()))
        } else {
            Err(Error::Protocol(format!("unexpected reply {reply:?}")))
        }
    }

    /// Creates a domain; returns its domid.
    pub fn create(&mut self, domid: Option<u32>, name: Option<&str>) -> Result<u32> {
        let r = self.call(&Request::Create {
            domid,
            name: name.map(str::to_owned),
        })?;
        r.parse()
            .map_err(|_| Error::Protocol(format!("create answered {r:?}")))
    }

    /// Destroys a domain.
    pub fn destroy(&mut self, domid: u32) -> Result<()> {
        self.call(&Request::Destroy(domid)).map(drop)
    }

    /// The domains, dom0 included, in domid order.
    pub fn list(&mut self) -> Result<Vec<DomainInfo>> {
        let r = self.call(&Request::List)?;
        let n: usize = r
            .parse()
            .map_err(|_| Error::Protocol(format!("list answered {r:?}")))?;
        let mut out = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let line = read_line(&mut self.reader)
                .map_err(|e| self.io(e))?
                .ok_or_else(|| Error::Protocol("the daemon hung up in a list".into()))?;
            let (d, name) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let domid = d
                .parse()
                .map_err(|_| Error::Protocol(format!("list line {line:?}")))?;
            out.push(DomainInfo {
                domid,
                name: name.to_owned(),
            });
        }
        Ok(out)
    }

    /// The daemon's pid.
    pub fn ping(&mut self) -> Result<u32> {
        let r = self.call(&Request::Ping)?;
        r.strip_prefix("xenpv-local ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Error::Protocol(format!("ping answered {r:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Create {
                domid: None,
                name: None,
            },
            Request::Create {
                domid: Some(7),
                name: Some("g1".into()),
            },
            Request::Destroy(3),
            Request::List,
            Request::Ping,
        ] {
            assert_eq!(Request::parse(&r.to_line()), Ok(r));
        }
        assert!(Request::parse("").is_err());
        assert!(Request::parse("create bogus").is_err());
        assert!(Request::parse("destroy").is_err());
        assert!(Request::parse("destroy x").is_err());
        assert!(Request::parse("list 1").is_err());
        assert!(Request::parse("reboot").is_err());
    }

    #[test]
    fn lines_are_bounded() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut r = std::io::Cursor::new(long);
        assert!(read_line(&mut r).is_err());
        let mut r = std::io::Cursor::new(b"list\nping\n".to_vec());
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("list"));
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("ping"));
        assert_eq!(read_line(&mut r).unwrap(), None);
    }
}

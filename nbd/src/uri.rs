//! NBD URIs (the subset of the `nbd:` URI scheme this crate connects to).

use crate::proto::DEFAULT_PORT;
use std::path::PathBuf;

/// A URI that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The scheme is not one we handle.
    #[error("unsupported NBD URI {0:?}: use nbd://host[:port]/export or nbd+unix:///export?socket=/path")]
    Scheme(String),
    /// A Unix URI without `socket=`.
    #[error("NBD URI {0:?} has no socket=/path query parameter (nbd+unix:///export?socket=/path)")]
    NoSocket(String),
    /// A bad port, host or escape.
    #[error("malformed NBD URI {uri:?}: {what}")]
    Malformed {
        /// The URI.
        uri: String,
        /// What was wrong.
        what: &'static str,
    },
}

/// Where an NBD server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A TCP host and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI: where, and which export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uri {
    /// The server.
    pub address: Address,
    /// The export name (`""` is the default export).
    pub export: String,
}

impl std::str::FromStr for Uri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Uri, Error> {
        Uri::parse(s)
    }
}

impl Uri {
    /// Parse `nbd://host[:port][/export]` or `nbd+unix:///[export]?socket=/path`.
    pub fn parse(uri: &str) -> Result<Uri, Error> {
        let bad = |what| Error::Malformed {
            uri: uri.to_string(),
            what,
        };
        let (rest, unix) = if let Some(r) = uri.strip_prefix("nbd+unix://") {
            (r, true)
        } else if let Some(r) = uri.strip_prefix("nbd://") {
            (r, false)
        } else {
            return Err(Error::Scheme(uri.to_string()));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        if unix {
            if !authority.is_empty() {
                return Err(bad(
                    "a Unix URI has no host (nbd+unix:///export?socket=...)",
                ));
            }
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| Error::NoSocket(uri.to_string()))?;
            let socket = decode(socket).ok_or_else(|| bad("bad %-escape in the socket path"))?;
            return Ok(Uri {
                address: Address::Unix(PathBuf::from(socket)),
                export,
            });
        }
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
        };
        Ok(Uri {
            address: Address::Tcp {
                host: host.to_string(),
                port,
            },
            export,
        })
    }
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            Uri::parse("nbd://127.0.0.1:1234/disk").unwrap(),
            Uri {
                address: Address::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1234
                },
                export: "disk".into()
            }
        );
        assert_eq!(
            Uri::parse("nbd://example.org").unwrap().address,
            Address::Tcp {
                host: "example.org".into(),
                port: 10809
            }
        );
        assert_eq!(
            Uri::parse("nbd://[::1]:99/").unwrap().address,
            Address::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        let u = Uri::parse("nbd+unix:///?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/a b.sock".into()));
        assert_eq!(u.export, "");
        let u = Uri::parse("nbd+unix:///exp?socket=/s").unwrap();
        assert_eq!(u.export, "exp");
    }

    #[test]
    fn rejects() {
        assert!(matches!(Uri::parse("http://x"), Err(Error::Scheme(_))));
        assert!(matches!(
            Uri::parse("nbd+unix:///x"),
            Err(Error::NoSocket(_))
        ));
        assert!(Uri::parse("nbd://h:notaport/").is_err());
        assert!(Uri::parse("nbd:///x").is_err());
        assert!(Uri::parse("nbd://h/%zz").is_err());
    }
}

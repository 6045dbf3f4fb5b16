//! `xenpv-blkback`'s status file (`--status-file`, or `status_file` in its configuration): one
//! line per device it serves, `BACKEND_PATH key=value ...` with its statistics, or
//! `BACKEND_PATH starting` before the device is connected. The daemon rewrites it every second
//! (write to a temporary file, then rename), so a reader never sees half a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Where the packaged configuration (`deploy/blkback.toml`) has the daemon write it.
pub const DEFAULT_PATH: &str = "/run/xenpv-blkback/status";

/// A status file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error(
        "cannot read blkback's status file {path}: {source} (is xenpv-blkback running with \
         --status-file {path}?)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `PATH starting` or `PATH key=count ...`.
    #[error("blkback's status file {path}, line {line}: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
}

/// One device's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Served, not connected yet: no statistics.
    Starting,
    /// The counters, in the order the daemon wrote them.
    Counters(Vec<(String, u64)>),
}

impl Entry {
    /// The counter `key`, if the line has it.
    pub fn get(&self, key: &str) -> Option<u64> {
        match self {
            Entry::Starting => None,
            Entry::Counters(c) => c.iter().find(|(k, _)| k == key).map(|&(_, v)| v),
        }
    }
}

/// A status file read whole.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Per backend path (`/local/domain/0/backend/vbd/1/51712`).
    pub devices: HashMap<String, Entry>,
    /// How long ago the daemon last wrote it (`None` if the clock or the file system cannot
    /// tell).
    pub age: Option<Duration>,
}

impl Status {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Status, Error> {
        let read = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(read)?;
        let age = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        let devices = parse(&text).map_err(|(line, what)| Error::Malformed {
            path: path.to_path_buf(),
            line,
            what,
        })?;
        Ok(Status { devices, age })
    }

    /// The line of the device whose backend directory is `backend_path`.
    pub fn device(&self, backend_path: &str) -> Option<&Entry> {
        self.devices.get(backend_path)
    }
}

/// The statistics `xenpv list` shows: from `explicit` (the user's `--status-file`), whose
/// failure is the command's; or else from `default` when it exists, whose failure is only a
/// warning (returned), since the user asked for no statistics and the states still list.
pub fn for_list(
    explicit: Option<&Path>,
    default: &Path,
) -> Result<(Option<Status>, Option<String>), Error> {
    match explicit {
        Some(p) => Status::read(p).map(|s| (Some(s), None)),
        None if !default.exists() => Ok((None, None)),
        None => Ok(match Status::read(default) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(format!("{e}; listing without statistics"))),
        }),
    }
}

/// Parses the file's text; a bad line gives its 1-based number and what is wrong with it.
pub fn parse(text: &str) -> Result<HashMap<String, Entry>, (usize, String)> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let Some(path) = words.next() else {
            continue;
        };
        let rest: Vec<&str> = words.collect();
        let entry = if rest == ["starting"] {
            Entry::Starting
        } else if rest.is_empty() {
            return Err((i + 1, format!("`{path}` has no statistics")));
        } else {
            let mut counters = Vec::with_capacity(rest.len());
            for w in rest {
                let parsed = w
                    .split_once('=')
                    .and_then(|(k, v)| Some((k.to_string(), v.parse::<u64>().ok()?)));
                match parsed {
                    Some(kv) => counters.push(kv),
                    None => return Err((i + 1, format!("`{w}` is not key=count"))),
                }
            }
            Entry::Counters(counters)
        };
        out.insert(path.to_string(), entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_each_device_its_counters_or_starting() {
        let text = "/local/domain/0/backend/vbd/1/51712 reads=3 writes=0 errors=1\n\
                    /local/domain/0/backend/vbd/1/517120 starting\n\n";
        let s = parse(text).unwrap();
        let a = &s["/local/domain/0/backend/vbd/1/51712"];
        assert_eq!(a.get("reads"), Some(3));
        assert_eq!(a.get("errors"), Some(1));
        assert_eq!(a.get("flushes"), None);
        // A device whose path has the other's as a prefix is its own line.
        assert_eq!(s["/local/domain/0/backend/vbd/1/517120"], Entry::Starting);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_bad_line_is_named() {
        assert_eq!(
            parse("/a reads=1\n/b reads=x\n"),
            Err((2, "`reads=x` is not key=count".to_string()))
        );
        assert_eq!(parse("/a\n").unwrap_err().0, 1);
        assert_eq!(parse("/a reads\n").unwrap_err().0, 1);
    }

    #[test]
    fn a_missing_file_says_how_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = Status::read(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--status-file"), "{e}");
    }

    #[test]
    fn a_bad_default_file_is_a_warning_and_a_bad_named_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad, none) = (
            dir.path().join("good"),
            dir.path().join("bad"),
            dir.path().join("none"),
        );
        std::fs::write(&good, "/x reads=2\n").unwrap();
        std::fs::write(&bad, "/x reads=two\n").unwrap();

        let (s, w) = for_list(None, &good).unwrap();
        assert_eq!(
            s.unwrap().device("/x").and_then(|e| e.get("reads")),
            Some(2)
        );
        assert!(w.is_none());
        let (s, w) = for_list(None, &none).unwrap();
        assert!(
            s.is_none() && w.is_none(),
            "no default file: no statistics, no warning"
        );
        let (s, w) = for_list(None, &bad).unwrap();
        assert!(s.is_none());
        let w = w.unwrap();
        assert!(
            w.contains("line 1") && w.contains("without statistics"),
            "{w}"
        );

        assert!(matches!(
            for_list(Some(&bad), &good),
            Err(Error::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            for_list(Some(&none), &good),
            Err(Error::Read { .. })
        ));
    }

    #[test]
    fn reading_a_file_tells_its_age() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status");
        std::fs::write(&p, "/x reads=1\n").unwrap();
        let s = Status::read(&p).unwrap();
        assert!(s.age.is_some_and(|a| a < Duration::from_secs(60)));
        assert_eq!(s.device("/x").and_then(|e| e.get("reads")), Some(1));
    }
}
